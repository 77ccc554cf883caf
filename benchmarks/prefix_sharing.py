"""Prefix sharing (issue 14): 16 requests with a common 2k-token prefix, on the 0.1B random-initialised Llama
(bf16, 4096 positions, one thread).

Workload: each prompt is the same --prefix random tokens followed by --suffix tokens of its own; --out-tokens
greedy tokens each. The first request runs alone until its first token is out (its prefill is done), then the
other 15 arrive at once. Per configuration, one engine, the same arrivals:

- virtual_shared: the virtual cache with prefix caching (the 15 map the first one's physical pages into their
  own slots and prefill only their suffix);
- virtual_plain: the virtual cache with --no-prefix-caching (every request prefills its whole prompt);
- paged_shared: the paged cache with vLLM-style block-hash prefix caching (shared blocks), the baseline;
- paged_plain: the paged cache without it.

Reported: committed KV (the ledger's `kv_committed_bytes`, its peak over the run; for the shared virtual cache
also the memfd's allocated blocks at that moment, the kernel's own count: each physical page once), the mean
TTFT over the 16 requests and over the 15 later ones (wall time from add_request to the first token), and
the whole run's wall time. Every configuration is warmed up first (a short run); then they run one after the
other, --reps times round-robin; medians. Greedy outputs are compared across configurations.

    OMP_NUM_THREADS=1 python -m benchmarks.prefix_sharing --out benchmarks/results/prefix_sharing.json

Prints one JSON object; --out also writes it and a PNG beside it.
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

CONFIGS = {
    "virtual_shared": dict(kv_cache="virtual", enable_prefix_caching=True),
    "virtual_plain": dict(kv_cache="virtual", enable_prefix_caching=False),
    "paged_shared": dict(kv_cache="paged", enable_prefix_caching=True),
    "paged_plain": dict(kv_cache="paged", enable_prefix_caching=False),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_once(path: Path, config: dict, args: argparse.Namespace) -> dict:
    from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", device="cpu", threads=args.threads,
                                    kv_budget=args.kv_budget, max_num_seqs=args.requests, max_model_len=4096,
                                    **config))
    g = torch.Generator().manual_seed(args.seed)
    vocab = engine.model_config.vocab_size
    prefix = torch.randint(0, vocab, (args.prefix,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, vocab, (args.suffix,), generator=g).tolist() for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.out_tokens, temperature=0, ignore_eos=True)
    arrival, first, cached = {}, {}, {}
    peak, peak_allocated = 0, None
    outputs: dict[str, list[int]] = {}

    def add(i: int) -> None:
        rid = f"r{i}"
        arrival[rid] = time.perf_counter()
        engine.add_request(prompt_token_ids=prompts[i], params=params, request_id=rid)

    def step() -> None:
        nonlocal peak, peak_allocated
        for o in engine.step():
            now = time.perf_counter()
            if o.request_id not in first and o.outputs[0].token_ids:
                first[o.request_id] = now
                cached[o.request_id] = o.num_cached_tokens
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids
        committed = engine.kv.committed_bytes
        if committed >= peak:
            peak = committed
            arena = getattr(engine.kv, "arena", None)
            if hasattr(arena, "allocated_bytes"):  # the memfd behind the shared virtual cache: the kernel's count
                peak_allocated = arena.allocated_bytes()

    t0 = time.perf_counter()
    add(0)
    while "r0" not in first:
        step()
    for i in range(1, args.requests):
        add(i)
    while engine.has_unfinished_requests():
        step()
    wall = time.perf_counter() - t0
    ttft = {rid: first[rid] - arrival[rid] for rid in arrival}
    stats = engine.stats()
    engine.close()
    later = [ttft[f"r{i}"] for i in range(1, args.requests)]
    return {
        "peak_kv_committed_bytes": peak, "peak_kv_memfd_allocated_bytes": peak_allocated,
        "mean_ttft_s": statistics.mean(ttft.values()), "mean_ttft_later_s": statistics.mean(later),
        "ttft_first_s": ttft["r0"], "wall_s": wall, "cached_tokens_later": statistics.mean(cached[f"r{i}"] for i in range(1, args.requests)),
        "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"], "outputs": outputs,
    }


def draw(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    mem = [result["configs"][n]["peak_kv_committed_bytes"] / 2**20 for n in names]
    ttft = [result["configs"][n]["mean_ttft_s"] for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, mem, color=["C0", "C0", "C1", "C1"])
    a.set_ylabel("peak committed KV (MiB)")
    b.bar(names, ttft, color=["C0", "C0", "C1", "C1"])
    b.set_ylabel("mean TTFT (s)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{result['requests']} requests, {result['prefix']}-token shared prefix, 0.1B bf16, 1 thread")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--suffix", type=int, default=64)
    ap.add_argument("--out-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--kv-budget", default="2GiB")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    names = args.configs.split(",")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir("0.1b", "bfloat16", Path(tmp))
        warm = argparse.Namespace(**{**vars(args), "prefix": 64, "suffix": 8, "requests": 2, "out_tokens": 2})
        for n in names:  # code paths, kernels and allocator pools warmed before anything is timed
            run_once(path, CONFIGS[n], warm)
        for rep in range(args.reps):
            for n in names:
                log(f"rep {rep + 1}/{args.reps}: {n} ...")
                runs[n].append(run_once(path, CONFIGS[n], args))
                r = runs[n][-1]
                log(f"  peak KV {r['peak_kv_committed_bytes'] / 2**20:.1f} MiB, mean TTFT {r['mean_ttft_s']:.2f} s, "
                    f"wall {r['wall_s']:.1f} s")
    configs = {}
    for n, rs in runs.items():
        configs[n] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "outputs" and rs[0][k] is not None}
        configs[n]["peak_kv_memfd_allocated_bytes"] = rs[0]["peak_kv_memfd_allocated_bytes"]
    ref = runs[names[0]][0]["outputs"]
    same = {n: runs[n][0]["outputs"] == ref for n in names}
    result = header(args.threads, args.seed, benchmark="prefix_sharing", shape="0.1b", dtype="bfloat16")
    result.update(requests=args.requests, prefix=args.prefix, suffix=args.suffix, out_tokens=args.out_tokens,
                  reps=args.reps, load_average_before=load_before, load_average_after=os.getloadavg(),
                  configs=configs, greedy_outputs_equal_to_first_config=same)
    if "virtual_shared" in configs and "virtual_plain" in configs:
        s, p = configs["virtual_shared"], configs["virtual_plain"]
        result["virtual_shared_vs_plain"] = {
            "committed_kv_ratio": p["peak_kv_committed_bytes"] / s["peak_kv_committed_bytes"],
            "mean_ttft_ratio": p["mean_ttft_s"] / s["mean_ttft_s"],
            "targets": {"committed_kv_ratio": 5.0, "mean_ttft_ratio": 3.0},
        }
    if "virtual_shared" in configs and "paged_shared" in configs:
        s, p = configs["virtual_shared"], configs["paged_shared"]
        result["virtual_shared_vs_paged_shared"] = {
            "committed_kv_ratio": p["peak_kv_committed_bytes"] / s["peak_kv_committed_bytes"],
            "mean_ttft_ratio": p["mean_ttft_s"] / s["mean_ttft_s"],
        }
    emit(result, args.out, draw)


if __name__ == "__main__":
    main()
