"""The virtual KV cache's write of a prefill step: one slice copy a run of sequences against one `index_put_` over
every row (kv/virtual_io.py's WRITE_SLICES_MAX picks between them), side by side.

The 0.1b shape's layer (4 KV heads of 64, bf16), steps of B sequences x T new rows each in consecutive slots (so
one run, one copy), as a prefill step's chunks (B x T <= 2048 rows, the offline step) and as a decode step
(T = 1, which keeps index_put_). Each figure is the median
process CPU time of one layer's K and V write, the two ways alternating round by round.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.kv_write --threads 1 --out benchmarks/results/kv_write.json

Prints one JSON object: per step shape, microseconds with slices and with index_put_, and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import memfit.llm.kv.virtual as virtual
import memfit.llm.kv.virtual_io as virtual_io
from benchmarks.common import emit, header, interleave, pin_threads
from memfit.llm.kv.base import KVLayout, SeqStep
from memfit.memory.budget import MemoryBudget

STEPS = [(4, 128), (2, 256), (8, 64), (16, 128), (8, 1)]  # (sequences, new rows each)


def measure(batch: int, rows: int, reps: int, inner: int) -> dict:
    layout = KVLayout(num_layers=1, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16, max_seq_len=2048)
    cache = virtual.VirtualKVCache(layout, MemoryBudget(1 << 30, name="kv_budget"), max_seqs=batch, prefault=False,
                                   eager_pages=0)
    for sid in range(batch):
        assert cache.try_allocate(sid, rows)
    plan = cache.plan_step([SeqStep(sid, 0, rows) for sid in range(batch)])
    k = torch.randn(batch * rows, 4, 64).to(torch.bfloat16)  # (B x T, Hkv, D)

    def run(slices_max: int):
        def call() -> None:
            virtual_io.WRITE_SLICES_MAX = slices_max
            for _ in range(inner):
                cache.write(0, plan, k, k)
        return call

    default = virtual_io.WRITE_SLICES_MAX
    try:
        t = interleave({"slices": run(default), "index_put": run(0)}, reps, warmup=2, clock=time.process_time)
    finally:
        virtual_io.WRITE_SLICES_MAX = default
        cache.close()
    us = {name: round(statistics.median(v) / inner * 1e6, 1) for name, v in t.items()}
    return {"sequences": batch, "rows_each": rows, "slices_us": us["slices"], "index_put_us": us["index_put"],
            "index_put_over_slices": round(us["index_put"] / us["slices"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    result = header(args.threads, benchmark="kv_write", reps=args.reps, inner=args.inner,
                    timer="process CPU time, median, one layer's K and V write")
    result["steps"] = [measure(b, t, args.reps, args.inner) for b, t in STEPS]
    emit(result, args.out)


if __name__ == "__main__":
    main()
