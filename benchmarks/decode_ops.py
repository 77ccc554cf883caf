"""Small CPU decode-step operations memfit chose between, timed side by side (medians, one process).

- decode attention in bf16 (`memfit.llm.kernels.decode_batch.decode_attention`) over a strided cache view: with the
  runner's persistent `Workspace` for the head-major K/V copies against a fresh buffer per call, and the
  float32 detour for short contexts against the bf16 matmuls;
- the K copy decode attention makes: head-major (B, Hkv, L, D) against the (B, Hkv, D, L) transpose that
  `matmul` makes of a permuted view;
- greedy selection over (B, vocab) bf16 logits: `max(dim)` against `argmax` and against widening to float32.

    OMP_NUM_THREADS=1 python -m benchmarks.decode_ops --threads 1

Prints one JSON object (times in microseconds, process CPU time, median of --reps); --out also writes it.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import memfit.llm.kernels.decode_batch as decode_batch
from benchmarks.common import cpu_us, emit, header, pin_threads
from memfit.llm.kernels.decode_batch import Workspace, decode_attention


def attention_rows(reps: int) -> list[dict]:
    hkv, g, d = 4, 3, 64  # the 0.1b shape's attention: 12 query heads over 4 KV heads of 64
    rows = []
    for b, length in ((1, 64), (1, 256), (1, 1024), (8, 1024), (8, 4096), (32, 128)):
        cache = torch.randn(b, 2, length + 64, hkv, d).to(torch.bfloat16)  # rows padded as in a cache
        k, v = cache[:, 0, :length], cache[:, 1, :length]  # (B, L, Hkv, D) strided views
        q = torch.randn(b, hkv * g, d).to(torch.bfloat16)
        lens = torch.full((b,), length) if b > 1 else None
        ws = Workspace()
        inner = max(1, 2000 // (b * length // 64 + 1))
        with torch.inference_mode():
            row = {"batch": b, "context": length,
                   "memfit_us": cpu_us(lambda: decode_attention(q, k, v, lens, 0.125, ws), reps, inner),
                   "fresh_buffers_us": cpu_us(lambda: decode_attention(q, k, v, lens, 0.125, Workspace()), reps, inner)}
            row["uses_float32_detour"] = b * length * hkv * d <= decode_batch.SMALL_ATTENTION_ELEMS
            saved, decode_batch.SMALL_ATTENTION_ELEMS = decode_batch.SMALL_ATTENTION_ELEMS, 0  # bf16 matmuls throughout
            try:
                row["bf16_matmuls_us"] = cpu_us(lambda: decode_attention(q, k, v, lens, 0.125, ws), reps, inner)
            finally:
                decode_batch.SMALL_ATTENTION_ELEMS = saved
            row["k_copy_head_major_us"] = cpu_us(lambda: k.transpose(1, 2).contiguous(), reps, inner)
            row["k_copy_transposed_us"] = cpu_us(lambda: k.permute(0, 2, 3, 1).contiguous(), reps, inner)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def greedy_rows(reps: int, vocab: int = 32000) -> list[dict]:
    rows = []
    for b in (1, 8, 32):
        x = torch.randn(b, vocab).to(torch.bfloat16)
        row = {"batch": b, "vocab": vocab,
               "max_dim_us": cpu_us(lambda: x.max(dim=-1).indices, reps, 20),
               "argmax_bf16_us": cpu_us(lambda: x.argmax(dim=-1), reps, 20),
               "float_then_argmax_us": cpu_us(lambda: x.float().argmax(dim=-1), reps, 20)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    pin_threads(args.threads)
    result = {"benchmark": "decode_ops", **header(args.threads, seed=None),
              "attention_bf16": attention_rows(args.reps), "greedy_bf16": greedy_rows(args.reps)}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
