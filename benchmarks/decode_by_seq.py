"""The per-layer KV layout's decode attention on AVX-512: head by head against one pass over every head of a
sequence (attend.h's attend_heads), and what the default picks, per shape, on this CPU.

    OMP_NUM_THREADS=1 python -m benchmarks.decode_by_seq --out benchmarks/results/decode_by_seq.json

cpu_decode.cpp chooses between the two by CPU vendor (`decode.by_seq_default`): on an Intel core by a sequence's
K + V against its L2, elsewhere by the step's K + V (tuned on Zen 4). This is the measurement behind that rule:
each cell a (Hq, Hkv, D) layer and batch x context, K/V in a per-layer tensor (a token's heads side by side), the
three variants interleaved, medians of process CPU time per call. AMX tiles off (their per-layer rule is its own).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import torch

from benchmarks.common import emit, header, interleave, pin_threads

# (Hq, Hkv, D, batch, context): the 1B layer around the Intel turn and at long contexts, the 0.1b layer, D 128
CELLS = [(32, 8, 64, 1, 1024), (32, 8, 64, 1, 1536), (32, 8, 64, 1, 2048), (32, 8, 64, 1, 4000),
         (32, 8, 64, 8, 512), (32, 8, 64, 8, 2048), (32, 8, 64, 8, 4000), (32, 8, 64, 32, 512),
         (12, 4, 64, 1, 1024), (12, 4, 64, 1, 2048), (12, 4, 64, 8, 2048), (32, 8, 128, 1, 1024)]
PATHS = {"head_by_head": 2**62, "one_pass": 0, "default": -1}  # set_by_seq_min_bytes


def cell(hq: int, hkv: int, d: int, batch: int, ctx: int, reps: int, ops) -> dict:
    from memfit.llm.kernels.build import load_cpu_linear
    from memfit.llm.kernels.decode import by_seq_default

    # The C library's own switch, called before each timed call: decode.set_by_seq_min_bytes checks the kernels'
    # availability first (about 7 us a call since build.py remembers its key; 0.6 ms before), time that is not
    # the kernel's.
    set_by_seq_min_bytes = load_cpu_linear().cdll.memfit_decode_set_by_seq_min_bytes
    set_by_seq_min_bytes.argtypes, set_by_seq_min_bytes.restype = [ctypes.c_int64], ctypes.c_int64

    g = torch.Generator().manual_seed(batch * 100000 + ctx + d)
    k = torch.randn(batch, ctx + 8, hkv, d, generator=g).to(torch.bfloat16)
    v = torch.randn(batch, ctx + 8, hkv, d, generator=g).to(torch.bfloat16)
    q = torch.randn(batch, hq, d, generator=g).to(torch.bfloat16)
    lens, slots = torch.full((batch,), ctx), torch.arange(batch)
    out = torch.empty(batch, hq, d, dtype=torch.bfloat16)

    def run(min_bytes: int):
        return lambda: (set_by_seq_min_bytes(min_bytes), ops.decode_attention(q, k, v, slots, lens, d ** -0.5, out=out))

    try:
        times = interleave({name: run(m) for name, m in PATHS.items()}, reps, warmup=2, clock=time.process_time)
    finally:
        set_by_seq_min_bytes(-1)
    us = {name: round(1e6 * statistics.median(t), 1) for name, t in times.items()}
    row_bytes = hkv * d * 2 * 2
    min_bytes, min_len = by_seq_default(row_bytes)
    takes_one_pass = ctx >= min_len and batch * ctx * row_bytes >= min_bytes
    return {"hq": hq, "hkv": hkv, "d": d, "batch": batch, "context": ctx, "kv_bytes_a_sequence": ctx * row_bytes,
            **{f"{n}_us": t for n, t in us.items()}, "head_by_head_over_one_pass": round(us["head_by_head"] / us["one_pass"], 3),
            "default_takes": "one_pass" if takes_one_pass else "head_by_head"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    from benchmarks.decode_setup import cpu_bf16_decode_ops
    from memfit.llm.kernels.decode import set_decode_amx

    ops = cpu_bf16_decode_ops()
    if ops is None:
        return 2
    old = set_decode_amx(False)
    try:
        rows = []
        for c in CELLS:
            rows.append(cell(*c, args.reps, ops))
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        set_decode_amx(old)
    result = {"benchmark": "decode_by_seq", "machine": header(args.threads), "dtype": "bfloat16",
              "timed": "the attention call alone, AVX-512; median of interleaved rounds, process CPU time",
              "reps": args.reps, "rows": rows,
              "default_picks_the_faster": sum((r["default_takes"] == "one_pass") == (r["head_by_head_over_one_pass"] > 1)
                                              for r in rows), "cells": len(rows)}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
