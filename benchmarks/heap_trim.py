"""What trimming the C heap under a memory budget (memfit/memory/heap.py) saves and costs.

The workload of tests/llm/engine/test_memory_budget.py: 32 requests of 900 prompt tokens and 48 greedy output
tokens on the bundled model, under a 56 MiB `--memory-budget`, in a fresh process per run. With the trimmer
as the engine builds it, and without it (the engine's `HeapTrimmer` removed after construction, nothing else
changed); the two alternate, `--reps` times each. Per run: the memory the process holds (HeldMemoryMeter:
anonymous + shared + the model's files) at its peak and, step by step, beside its committed KV, the heap
trims, and wall and CPU seconds of the workload. Medians.

    OMP_NUM_THREADS=1 python -m benchmarks.heap_trim --reps 3 --out benchmarks/results/heap_trim.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import emit, header

BUDGET = 56 * 2**20
MiB = 2**20


def run_once(trim: bool) -> dict:
    """One run in this (fresh) process."""
    import torch

    from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams
    from memfit.llm.models.loader import resolve_model_path
    from memfit.memory.measure import HeldMemoryMeter

    torch.set_num_threads(1)
    with HeldMemoryMeter(files_under=[resolve_model_path("memfit-tiny")]) as meter:
        engine = LLMEngine(EngineConfig(model="memfit-tiny", memory_budget=BUDGET, max_num_seqs=32,
                                        max_model_len=1024, max_num_batched_tokens=512))
        if not trim:
            engine._heap = None  # the baseline: the same engine without its trimmer
        params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
        for i in range(32):
            engine.add_request(prompt_token_ids=[(i * 31 + j * 7) % 4000 + 5 for j in range(900)], params=params)
        beside_kv, wall, cpu = 0, time.perf_counter(), time.process_time()
        while engine.has_unfinished_requests():
            engine.step()
            beside_kv = max(beside_kv, meter.held_bytes() - meter.baseline_bytes - engine.kv.committed_bytes)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"trim": trim, "peak_held_bytes": meter.peak_delta_bytes, "max_held_beside_kv_bytes": beside_kv,
            "heap_trims": engine.stats()["heap_trims"], "wall_s": wall, "cpu_s": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)  # internal: one run, JSON out
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_once(a.child == "on")))
        return 0
    runs = []
    for rep in range(a.reps):
        for mode in ("on", "off"):
            done = subprocess.run([sys.executable, "-m", "benchmarks.heap_trim", "--child", mode], check=True,
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"[heap_trim] rep {rep} trim {mode}: peak {runs[-1]['peak_held_bytes'] / MiB:.1f} MiB, beside KV "
                  f"{runs[-1]['max_held_beside_kv_bytes'] / MiB:.1f} MiB, {runs[-1]['cpu_s']:.2f} s CPU",
                  file=sys.stderr, flush=True)

    def median(trim: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["trim"] == trim)

    keys = ("peak_held_bytes", "max_held_beside_kv_bytes", "heap_trims", "wall_s", "cpu_s")
    summary = {("trim" if t else "no_trim"): {k: median(t, k) for k in keys} for t in (True, False)}
    emit({"benchmark": "heap_trim", **header(1), "budget_bytes": BUDGET, "runs": runs, "median": summary,
          "cpu_ratio": summary["trim"]["cpu_s"] / summary["no_trim"]["cpu_s"]}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
