"""Prefill and decode on an x86 core without a native bf16 multiply (AVX2 + FMA only: no AVX-512, no AMX), where
memfit's AVX-512 kernels don't build and benchmarks/prefill.py refuses to run: bf16 linears before and after
kernels/upcast.py, against transformers, with float32 as a reference for both.

Workload: benchmarks/prefill.py's (the 0.1B random-initialised Llama, one thread, --prompts prompts of --prompt-len
random tokens, one output token each), in bf16 and float32. Systems, timed interleaved round by round (round 0
warms each up with one prompt; medians of --reps rounds, process CPU time, wall beside it):

- memfit: the engine as configured by default (bf16: "upcast" chosen, kernels/upcast.py);
- memfit_previous: the same engine with `prepack=False`, plain F.linear: what "auto" chose here before upcast
  (memfit's kernels don't build and oneDNN refuses to pack bf16 on this core), i.e. aten's bf16 matmul;
- memfit_fp32: the default engine on a float32 copy of the checkpoint (oneDNN's float32 matmul);
- transformers_bf16 / transformers_fp32: LlamaForCausalLM (sdpa), all prompts in one forward, logits of the last
  token only.

The peak is this core's float32 FMA rate (avx2/bf16_linear.cpp's loop, CPU time, the best of the runs before and
after): with no bf16 multiply, a bf16 matmul here runs on that unit at best. Decode, at batch 1 and 8
(benchmarks/prefill.decode_steps's workload: prompts of 32 random tokens, greedy): memfit, memfit_previous and
memfit_fp32 held at once and stepped in turn, one decode step each per round, --decode-steps rounds; the median
CPU ms of a step, with the medians of each third of the rounds beside it (how much the load moved them).

    OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.prefill_avx2 --threads 1 --out benchmarks/results/prefill_avx2.json

Prints one JSON object; --out also writes it.
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
from benchmarks.decode_setup import SHAPES, make_model_dir
from benchmarks.prefill import Clock, matmul_macs, summarise


def fma_peak(reps: int = 5, iters: int = 4_000_000) -> float:
    """The core's float32 FMA multiply-adds per CPU second (best of `reps`)."""
    from memfit.llm.kernels.avx2_build import load_avx2

    lib = load_avx2()
    best = 0.0
    for _ in range(reps):
        t = time.process_time()
        lib.peak(iters, 2.0 ** -8, 2.0 ** -8, 1)
        best = max(best, iters * 96 / (time.process_time() - t))
    return best


def memfit_system(path: Path, dtype: str, prepack: bool):
    from memfit.llm.engine import EngineConfig, LLMEngine
    from memfit.llm.engine.params import SamplingParams

    eng = LLMEngine(EngineConfig(model=str(path), dtype=dtype, kv_budget="2GiB", max_num_seqs=64, max_model_len=1024,
                                 prepack=prepack))
    params = SamplingParams(max_tokens=1, temperature=0)

    def run(prompts: list[list[int]]) -> dict:
        for ids in prompts:
            eng.add_request(prompt_token_ids=ids, params=params)
        clock, firsts = Clock(), []
        while eng.has_unfinished_requests():
            firsts += [clock.read()] * len(eng.step())  # max_tokens=1: a request's output is its first token
        cpu, wall = clock.read()
        return {"cpu": cpu, "wall": wall, "ttft_cpu": statistics.mean(f[0] for f in firsts),
                "ttft_wall": statistics.mean(f[1] for f in firsts)}

    return run, eng.close, eng.backends.cpu_linear


def decode_interleaved(engines: dict[str, tuple[Path, str, bool]], batch: int, steps: int) -> dict:
    """Per-step CPU ms of each engine ((checkpoint, dtype, prepack) by name) decoding `batch` sequences, the engines
    stepped in turn so a change of load hits them all alike: median, and the medians of each third of the steps."""
    from memfit.llm.engine import EngineConfig, LLMEngine
    from memfit.llm.engine.params import SamplingParams

    live = {}
    for name, (path, dtype, prepack) in engines.items():
        eng = LLMEngine(EngineConfig(model=str(path), dtype=dtype, kv_budget="2GiB", max_num_seqs=batch,
                                     max_model_len=512, prepack=prepack))
        g = torch.Generator().manual_seed(batch)  # the same prompts for every engine
        for _ in range(batch):
            eng.add_request(prompt_token_ids=torch.randint(0, 32000, (32,), generator=g).tolist(),
                            params=SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True))
        for _ in range(4):  # prefill and warm-up
            eng.step()
        live[name] = eng
    times: dict[str, list[float]] = {n: [] for n in live}
    for _ in range(steps):
        for name, eng in live.items():
            t = time.process_time()
            eng.step()
            times[name].append((time.process_time() - t) * 1e3)
    for eng in live.values():
        eng.close()
    third = max(1, steps // 3)
    return {n: {"ms": round(statistics.median(v), 2),
                "thirds_ms": [round(statistics.median(v[i:i + third]), 2) for i in range(0, third * 3, third)]}
            for n, v in times.items()}


def transformers_system(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").eval()

    def run(prompts: list[list[int]]) -> dict:
        clock = Clock()
        with torch.inference_mode():
            model(input_ids=torch.tensor(prompts), logits_to_keep=1).logits[:, -1].argmax(-1)
        cpu, wall = clock.read()
        return {"cpu": cpu, "wall": wall, "ttft_cpu": cpu, "ttft_wall": wall}

    return run, lambda: None, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--decode-steps", type=int, default=48, help="decode rounds (one step of each engine a round)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    from memfit.llm.kernels import upcast

    if not upcast.available(torch.bfloat16):
        print('{"error": "this CPU has a native bf16 multiply (or lacks AVX2 + FMA): run benchmarks/prefill.py"}')
        return 1
    load_before, peaks = os.getloadavg(), [fma_peak()]
    g = torch.Generator().manual_seed(0)

    def prompts(n: int) -> list[list[int]]:
        return [torch.randint(0, 32000, (args.prompt_len,), generator=g).tolist() for _ in range(n)]

    with tempfile.TemporaryDirectory() as tmp:
        paths = {d: make_model_dir("0.1b", d, Path(tmp) / d) for d in ("bfloat16", "float32")}
        makers = {"memfit": lambda: memfit_system(paths["bfloat16"], "bfloat16", True),
                  "memfit_previous": lambda: memfit_system(paths["bfloat16"], "bfloat16", False),
                  "memfit_fp32": lambda: memfit_system(paths["float32"], "float32", True),
                  "transformers_bf16": lambda: transformers_system(paths["bfloat16"], torch.bfloat16),
                  "transformers_fp32": lambda: transformers_system(paths["float32"], torch.float32)}
        systems = {name: make() for name, make in makers.items()}
        batch: dict[str, list[dict]] = {n: [] for n in systems}
        one: dict[str, list[dict]] = {n: [] for n in systems}
        loads = []
        for rnd in range(args.reps + 1):  # round 0: one prompt each, to warm up
            work, single = prompts(args.prompts if rnd else 1), prompts(1)
            for name, (run, _, _) in systems.items():
                b, o = run(work), run(single)
                if rnd:
                    batch[name].append(b)
                    one[name].append(o)
            loads.append(round(os.getloadavg()[0], 2))
            print(f"round {rnd}/{args.reps} (load {loads[-1]}): "
                  + ", ".join(f"{n} {batch[n][-1]['cpu']:.2f}s" for n in systems if batch[n]), file=sys.stderr)
        chosen = {n: s[2] for n, s in systems.items() if n.startswith("memfit")}
        for _, close, _ in systems.values():
            close()
        decode = []
        engines = {"memfit": (paths["bfloat16"], "bfloat16", True),
                   "memfit_previous": (paths["bfloat16"], "bfloat16", False),
                   "memfit_fp32": (paths["float32"], "float32", True)}
        for b in () if args.no_decode else (1, 8):
            got = decode_interleaved(engines, b, args.decode_steps)
            row = {"batch": b, **{f"{n}_ms": r["ms"] for n, r in got.items()},
                   "thirds_ms": {n: r["thirds_ms"] for n, r in got.items()}, "load_avg": round(os.getloadavg()[0], 2)}
            row["previous_over_now"] = round(row["memfit_previous_ms"] / row["memfit_ms"], 3)
            row["fp32_over_now"] = round(row["memfit_fp32_ms"] / row["memfit_ms"], 3)
            decode.append(row)
            print(f"decode batch {b}: {row}", file=sys.stderr)
    peaks.append(fma_peak())
    peak = max(peaks)
    macs, tokens = matmul_macs(SHAPES["0.1b"], args.prompts, args.prompt_len), args.prompts * args.prompt_len
    rows = {n: summarise(batch[n], one[n], macs, tokens, peak) for n in systems}
    result = {"benchmark": "prefill_avx2", **header(args.threads),
              "machine_note": "x86 without AVX-512/avx512_bf16/AMX (AVX2 + FMA + F16C): no native bf16 multiply",
              "timer": "process CPU time, median (wall beside it)", "cpu_affinity": sorted(os.sched_getaffinity(0)),
              "load_avg_before": [round(x, 2) for x in load_before], "load_avg_rounds": loads,
              "load_avg_after": [round(x, 2) for x in os.getloadavg()],
              "prompts": args.prompts, "prompt_len": args.prompt_len, "reps": args.reps, "matmul_macs": macs,
              "peak": "float32 FMA (avx2/bf16_linear.cpp loop), best of the runs before and after",
              "peak_gmac_per_s": round(peak / 1e9, 1), "peak_runs_gmac_per_s": [round(p / 1e9, 1) for p in peaks],
              "cpu_linear": chosen, "systems": rows,
              "memfit_vs_previous": round(rows["memfit_previous"]["batch_s"] / rows["memfit"]["batch_s"], 3),
              "memfit_vs_transformers_bf16": round(rows["transformers_bf16"]["batch_s"] / rows["memfit"]["batch_s"], 3),
              "decode": decode}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
