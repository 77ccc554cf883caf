"""The CPU step size (max_num_batched_tokens): what a larger step buys in prefill and what it costs in memory and in
the latency of the decode rows that share the prefill's steps (issue 14).

For each step size, on the 0.1B random-initialised Llama in bf16, one thread, interleaved round by round:

- `batch`: 32 prompts of 128 tokens, one output token each (benchmarks/prefill.py's workload): process CPU s;
- `mix`: 8 sequences decoding (32-token prompts) when 4 prompts of 1024 tokens arrive together, as in a server:
  the decode rows' inter-token time while those prompts prefill (each step's CPU time is one inter-token gap for
  every decoding sequence: they are in every step, chunked prefill fills the rest), its median and worst, and the
  arriving prompts' time to first token;
- memory: the ledger's step reservation (what the engine sets aside for its largest step: activations, the step
  arena, the matmul scratch). What a step really takes against that figure is tests/llm/engine/test_arena_ledger.py's
  measure (a step's VmHWM); here the KV pages a round reuses from the last would hide it.

    OMP_NUM_THREADS=1 python -m benchmarks.step_size --threads 1 --reps 5 --out benchmarks/results/step_size.json
"""
from __future__ import annotations

from benchmarks.common import preset_threads

if __name__ == "__main__":
    preset_threads()  # --threads, read before torch and oneDNN start their thread pools

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, header, pin_threads
from benchmarks.decode_setup import make_model_dir

DECODERS, DECODE_PROMPT, ARRIVALS, ARRIVAL_LEN = 8, 32, 4, 1024


def build(path: Path, step: int):
    from memfit.llm.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", kv_budget="2GiB", max_num_seqs=64,
                                  max_model_len=2048, max_num_batched_tokens=step))


def run_batch(eng, prompts: list[list[int]]) -> dict:
    """The offline batch: CPU seconds until every prompt has its first token."""
    from memfit.llm.engine.params import SamplingParams

    t = time.process_time()
    for ids in prompts:
        eng.add_request(prompt_token_ids=ids, params=SamplingParams(max_tokens=1, temperature=0))
    while eng.has_unfinished_requests():
        eng.step()
    return {"cpu_s": time.process_time() - t}


def run_mix(eng, g: torch.Generator) -> dict:
    """Decoders running, then the long prompts arrive: the steps until every arrival has its first token."""
    from memfit.llm.engine.params import SamplingParams

    decode = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    ids = [eng.add_request(prompt_token_ids=torch.randint(0, 32000, (DECODE_PROMPT,), generator=g).tolist(),
                           params=decode) for _ in range(DECODERS)]
    for _ in range(3):  # the decoders' prefill, then pure decode steps
        eng.step()
    arrivals = [eng.add_request(prompt_token_ids=torch.randint(0, 32000, (ARRIVAL_LEN,), generator=g).tolist(),
                                params=SamplingParams(max_tokens=1, temperature=0)) for _ in range(ARRIVALS)]
    gaps, ttft, t0 = [], {}, time.process_time()
    while len(ttft) < ARRIVALS:
        t = time.process_time()
        outs = eng.step()
        now = time.process_time()
        gaps.append(now - t)
        for o in outs:
            if o.request_id in arrivals:
                ttft.setdefault(o.request_id, now - t0)
    for rid in ids:
        eng.abort(rid)
    while eng.has_unfinished_requests():
        eng.step()
    return {"gap_median_ms": statistics.median(gaps) * 1e3, "gap_max_ms": max(gaps) * 1e3, "steps": len(gaps),
            "ttft_mean_ms": statistics.mean(ttft.values()) * 1e3, "window_ms": sum(gaps) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", default="256,512,1024,2048", help="comma-separated step sizes (tokens)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    sizes = [int(s) for s in args.steps.split(",")]
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir("0.1b", "bfloat16", Path(tmp))
        engines = {s: build(path, s) for s in sizes}
        reserved = {s: {k: v for k, v in e.ledger.by_owner().items() if k in ("step", "step_scratch")}
                    for s, e in engines.items()}
        batch: dict[int, list[dict]] = {s: [] for s in sizes}
        mix: dict[int, list[dict]] = {s: [] for s in sizes}
        for rnd in range(args.reps + 1):  # round 0 warms every engine up (kernel choices, KV pages)
            prompts = [torch.randint(0, 32000, (128,), generator=g).tolist() for _ in range(32)]
            seed = int(torch.randint(0, 2**31, (1,), generator=g))
            for s, eng in engines.items():
                b, m = run_batch(eng, prompts), run_mix(eng, torch.Generator().manual_seed(seed))
                if rnd:
                    batch[s].append(b)
                    mix[s].append(m)
            if rnd:
                print(f"round {rnd}/{args.reps}: " + ", ".join(
                    f"{s}: batch {batch[s][-1]['cpu_s']:.2f}s gap {mix[s][-1]['gap_median_ms']:.0f}ms"
                    for s in sizes), file=sys.stderr)
        for eng in engines.values():
            eng.close()
    med = lambda rows, k: round(statistics.median(r[k] for r in rows), 4)  # noqa: E731
    result = {"benchmark": "step_size", **header(args.threads, 0, load_before=load_before, load_after=os.getloadavg(),
                    model="0.1b random-initialised Llama, bf16",
                    mix=dict(decoders=DECODERS, decode_prompt=DECODE_PROMPT, arrivals=ARRIVALS,
                             arrival_len=ARRIVAL_LEN))}
    result["sizes"] = {str(s): {
        "batch_cpu_s": med(batch[s], "cpu_s"), "batch_cpu_s_all": [round(r["cpu_s"], 4) for r in batch[s]],
        "step_reserved_bytes": sum(reserved[s].values()), "step_reserved_by_part": reserved[s],
        **{k: med(mix[s], k) for k in ("gap_median_ms", "gap_max_ms", "ttft_mean_ms", "window_ms", "steps")}}
        for s in sizes}
    emit(result, args.out, draw)
    return 0


def draw(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"])
    rows = [result["sizes"][s] for s in sizes]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].bar(sizes, [r["batch_cpu_s"] for r in rows])
    ax[0].set_title("32 x 128-token prefill, CPU s")
    ax[1].bar(sizes, [r["gap_max_ms"] for r in rows], label="worst")
    ax[1].bar(sizes, [r["gap_median_ms"] for r in rows], label="median")
    ax[1].set_title("decode inter-token gap during prefill, ms")
    ax[1].legend()
    ax[2].bar(sizes, [r["step_reserved_bytes"] / 2**20 for r in rows])
    ax[2].set_title("ledger's step reservation, MiB")
    for a in ax:
        a.set_xlabel("max_num_batched_tokens")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
