"""Per-layer decode attention on AMX tiles against AVX-512, per shape: the measurement behind `auto`'s rule for the
per-layer layout (attend_amx.h's decode_amx_takes: the tiles where a KV head has at least AMX_PER_LAYER_G query heads,
read a sequence at a time or head by head, and for rows of at most AMX_RUN_ROW_MAX bytes a token read a sequence at
a time; the rest on AVX-512).

    OMP_NUM_THREADS=1 python -m benchmarks.decode_amx_rows --out benchmarks/results/decode_amx_rows.json

Each cell is a (Hq, Hkv, D) shape at batch x context, with `layers` per-layer K/V tensors (a token's heads side by
side) read in turn by one call of each variant, so the K/V come from memory as in an engine's step rather than from
the L3 (one layer of these shapes fits in it). Variants, interleaved round by round, medians of process CPU time:
the tiles and AVX-512 at the default read (a sequence at a time where the kernels' threshold says), both head by
head, and `auto` (what the default mode runs). Needs a core with AMX-BF16 (else it says so and exits 2).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import torch

from benchmarks.common import emit, header, interleave, pin_threads

# (Hq, Hkv, D, batch, context, layers): the 0.5B shape (256-byte rows), the 0.1b (512 B), the 1B (1 KiB), and at
# D 128 Qwen2.5-7B's (4 KV heads, G 7: 1 KiB) and Llama-3-8B's (8 KV heads, G 4: 2 KiB); long contexts read a
# sequence at a time, short ones (128 tokens), which every reader takes head by head, and, for the 1B shape, 512-1024
# tokens, where the tiles read a sequence at a time (from 256 tokens) and AVX-512 head by head (below ~1300)
CELLS = [(14, 2, 64, 8, 4096, 12), (14, 2, 64, 32, 2048, 6), (14, 2, 64, 8, 128, 12),
         (12, 4, 64, 8, 4000, 12), (12, 4, 64, 32, 512, 12), (12, 4, 64, 8, 128, 12),
         (32, 8, 64, 8, 2048, 12), (32, 8, 64, 8, 8192, 3), (32, 8, 64, 32, 8192, 1),
         (32, 8, 64, 8, 128, 12), (32, 8, 64, 8, 512, 12), (32, 8, 64, 1, 1024, 12),
         (28, 4, 128, 8, 2048, 6), (28, 4, 128, 32, 2048, 2), (28, 4, 128, 8, 128, 12),
         (32, 8, 128, 8, 2048, 4), (32, 8, 128, 32, 2048, 1), (32, 8, 128, 8, 128, 12),
         # fewer query heads a KV head (G 1-3) at 8 x 2048, where `auto` keeps wider rows on AVX-512: G decides more
         # than the row's width
         (2, 2, 64, 8, 2048, 12), (8, 8, 64, 8, 2048, 12), (4, 2, 64, 8, 2048, 12), (8, 4, 64, 8, 2048, 12),
         (16, 8, 64, 8, 2048, 12), (24, 8, 64, 8, 2048, 12)]
# variant -> (memfit_decode_set_amx mode: 0 AVX-512, 1 tiles, 2 auto; set_by_seq_min_bytes: -1 default, 2**62 head
# by head)
VARIANTS = {"tiles": (1, -1), "avx512": (0, -1), "tiles_head_by_head": (1, 2**62),
            "avx512_head_by_head": (0, 2**62), "auto": (2, -1)}


def cell(hq: int, hkv: int, d: int, batch: int, ctx: int, layers: int, reps: int, ops, lib) -> dict:
    g = torch.Generator().manual_seed(batch * 100000 + ctx + hkv)
    kv = [(torch.randn(batch, ctx + 8, hkv, d, generator=g).to(torch.bfloat16),
           torch.randn(batch, ctx + 8, hkv, d, generator=g).to(torch.bfloat16)) for _ in range(layers)]
    q = torch.randn(batch, hq, d, generator=g).to(torch.bfloat16)
    lens, slots = torch.full((batch,), ctx), torch.arange(batch)
    out = torch.empty(batch, hq, d, dtype=torch.bfloat16)

    def run(mode: int, min_bytes: int):
        def step() -> None:
            # the C library's own switches (kernels/decode.py's setters check availability first: time not the
            # kernel's)
            lib.memfit_decode_set_amx(mode)
            lib.memfit_decode_set_by_seq_min_bytes(min_bytes)
            for k, v in kv:
                ops.decode_attention(q, k, v, slots, lens, d ** -0.5, out=out)
        return step

    times = interleave({name: run(*v) for name, v in VARIANTS.items()}, reps, warmup=2, clock=time.process_time)
    ms = {name: round(1e3 * statistics.median(t), 3) for name, t in times.items()}
    return {"hq": hq, "hkv": hkv, "d": d, "row_bytes": hkv * d * 2, "batch": batch, "context": ctx,
            "layers": layers, **{f"{n}_ms": t for n, t in ms.items()},
            "tiles_over_avx512": round(ms["tiles"] / ms["avx512"], 3),
            "head_by_head_tiles_over_avx512": round(ms["tiles_head_by_head"] / ms["avx512_head_by_head"], 3),
            "auto_over_faster": round(ms["auto"] / min(ms["tiles"], ms["avx512"]), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--row-bytes", type=int, nargs="+", default=None,
                    help="only the cells whose per-layer rows are this many bytes a token (default: every cell)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pin_threads(args.threads)
    from benchmarks.decode_setup import cpu_bf16_decode_ops
    from memfit.llm.kernels.build import load_cpu_linear
    from memfit.llm.kernels.decode import decode_amx_on, set_decode_amx

    ops = cpu_bf16_decode_ops()
    if ops is None:
        return 2
    old = set_decode_amx(True)
    if not decode_amx_on():
        print("no AMX decode attention here (no AMX-BF16, MEMFIT_CPU_ISA hides it, or Linux refused)", file=sys.stderr)
        return 2
    lib = load_cpu_linear().cdll
    lib.memfit_decode_set_amx.argtypes, lib.memfit_decode_set_amx.restype = [ctypes.c_int32], ctypes.c_int32
    lib.memfit_decode_set_by_seq_min_bytes.argtypes = [ctypes.c_int64]
    lib.memfit_decode_set_by_seq_min_bytes.restype = ctypes.c_int64
    try:
        rows = []
        for c in CELLS:
            if args.row_bytes and c[1] * c[2] * 2 not in args.row_bytes:
                continue
            rows.append(cell(*c, args.reps, ops, lib))
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        lib.memfit_decode_set_by_seq_min_bytes(-1)
        set_decode_amx(old)
    result = {"benchmark": "decode_amx_rows", "machine": header(args.threads), "dtype": "bfloat16",
              "timed": "one call of each variant reading every layer in turn; median of interleaved rounds, "
                       "process CPU time", "reps": args.reps, "rows": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
