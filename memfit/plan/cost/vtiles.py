"""A model of the vector tile IREE's llvm-cpu backend gives a kernel's dominant contraction, read from the MLIR
text alone (`predict` compiles nothing), and what that tile costs: the features VTILE_NAMES.

Why: on the Intel host's labels the slowest kernels for their FLOPs are the ones whose vector tile IREE cuts
small. Its lowering strategy (dumped with `iree-compile --compile-to=executable-configurations` for 1501 of
the data set's 1677 contraction kernels, of every split: compiler decisions, not latency labels) takes, for each loop it vectorises, the largest size up to a cap that divides the loop: a
matmul's M up to 8, N up to 16 lanes (32 for i8, and for f32 and bf16 when the rest of the tile is small), its
K (the reduction step) up to 16; a convolution's output width up to 8, its output channels up to 16 and input
channels up to 8. A loop of prime length gets a tile of 1, so the kernel runs one row, one lane or one step at
a time (an f32 matmul 23x768x3072: tile 1x16x16, 4.4 GFLOP/s against 107 at 512^3; a matmul 256x23x30: K
step 1, 11x slower than the model before these columns read it). paths.py's power-of-two shortfalls see part
of this; a tile of 7 or 14 (a divisor, not a power of two) they read as short. 1x1 convolutions of stride 1
are lowered as matmuls (NHWC: output pixels x F; NCHW: F x output pixels); other NHWC and depthwise
convolutions vectorise their channels, NCHW ones their (strided) output width. The rules give IREE's exact
sizes on 86-100% of the compiled kernels of each kind and size (docs/costmodel.md, "The vector tile model").

The features: log2 of the inner (vector) tile and its share of the 16-lane vectors it fills, log2 of the
tile's other parallel sizes (rows) and of its reduction step, log2 of the number of tiles (iterations / tile
volume: each has a fixed cost of accumulator loads and stores and loop control), of the vector operations
(iterations / inner tile x vectors per inner tile), of an instruction count (a reduction step: rows broadcasts,
inner/16 loads, rows x inner/16 FMAs) and of the loads of the inner operand. All 0 for a kernel without a
contraction.
"""
from __future__ import annotations

import math

from memfit.plan.cost.gemm import gemm_view, kind
from memfit.plan.cost.ops import LinalgOp, linalg_ops
from memfit.plan.cost.parse import Function

VTILE_NAMES = ("vt_log_inner", "vt_lane_eff", "vt_log_rows", "vt_log_red", "vt_log_tiles", "vt_log_vec_ops",
               "vt_log_insts", "vt_log_inner_loads")
LANES = 16  # f32 (and i32 accumulator) lanes of a 512-bit vector


def divisor_tile(x: int, cap: int) -> int:
    """The largest divisor of x that is at most cap (1 for a prime above cap)."""
    if x <= 0:
        return 1
    return max(d for d in range(1, min(cap, x) + 1) if x % d == 0)


def tile(op: LinalgOp) -> tuple[int, int, int]:
    """(inner, rows, reduction step) of the vector tile IREE is modelled to give a contraction `op`."""
    k = kind(op)
    dtype = op.ins[0].dtype if op.ins else "f32"
    n_cap = 32 if dtype == "i8" else LANES
    out = op.outs[0].shape
    if k in ("matmul", "batch_matmul"):
        m, n, kk = out[-2], out[-1], op.ins[0].shape[-1]
        tm, tk = divisor_tile(m, 8), divisor_tile(kk, 16)
        return _matmul_inner(n, tm, tk, dtype), tm, tk
    if k == "conv_nhwc":  # filter HWCF, output N OH OW F
        kh, kw, c, f = op.ins[1].shape
        if kh == kw == 1 and op.strides == 1:  # a matmul: output pixels x F, reduced over C
            tm, tk = divisor_tile(out[0] * out[1] * out[2], 8), divisor_tile(c, 16)
            return _matmul_inner(f, tm, tk, dtype), tm, tk
        if kh == kw == 1:
            return divisor_tile(f, n_cap), divisor_tile(out[2], 8), divisor_tile(c, 16)
        return divisor_tile(f, LANES), divisor_tile(out[2], 8), divisor_tile(c, 8)
    if k == "conv_nchw":  # filter FCHW, output N F OH OW
        f, c, kh, kw = op.ins[1].shape
        if kh == kw == 1 and op.strides == 1:  # a matmul: F x output pixels, reduced over C
            tm, tk = divisor_tile(f, 8), divisor_tile(c, 16)
            return _matmul_inner(out[2] * out[3], tm, tk, dtype), tm, tk
        if kh == kw == 1:
            return divisor_tile(out[3], LANES), divisor_tile(out[2], 8), divisor_tile(c, 16)
        return divisor_tile(out[3], 8), divisor_tile(_nchw_f_share(f, out[0]), LANES), divisor_tile(c, 8)
    if k == "depthwise":  # filter HWC, output N OH OW C
        kh, kw, c = op.ins[1].shape
        return divisor_tile(c, LANES), divisor_tile(out[2], 8), kw if kw <= 3 else 1  # wider filters: one tap a step
    return 1, 1, 1


def _matmul_inner(n: int, tm: int, tk: int, dtype: str) -> int:
    """A matmul's N tile: the largest divisor of N up to 32 for i8. For f32 and bf16 a multiple of 16 gets
    16, or 32 when the rest of the tile is small (tm x tk under 112 for bf16; for f32 a reduction step under
    16 and tm x tk under 56); an N under 16 is taken whole; an f32 N of 17-64 with a full tile gets 16 (and a
    remainder); any other N its largest divisor up to 32."""
    if dtype == "i8":
        return divisor_tile(n, 32)
    small = tm * tk < 112 if dtype == "bf16" else (tk < LANES and tm * tk < 56)
    if n % LANES == 0:
        return 2 * LANES if small else LANES
    if n < LANES:
        return n
    if n <= 64 and dtype == "f32" and not small:
        return LANES
    return divisor_tile(n, 32)


def _nchw_f_share(f: int, n: int) -> int:
    """A workgroup's share of an NCHW convolution's F: F is split so that the batch and F give at least 8
    workgroups, into the largest power of two that divides F and leaves that many (IREE's choice on 76 of the
    80 distinct compiled training shapes), or, where F has no such power of two, its largest divisor that does."""
    most = max(1, f * min(n, 8) // 8)
    p2 = 1
    while f % (2 * p2) == 0 and 2 * p2 <= most:
        p2 *= 2
    return p2 if p2 >= 2 else divisor_tile(f, most)


def features_of(inner: int, rows: int, red: int, work: float) -> dict[str, float]:
    if work <= 0:
        return {n: 0.0 for n in VTILE_NAMES}
    vectors = math.ceil(inner / LANES)
    tiles = max(work / (inner * rows * red), 1.0)
    # a reduction step of a tile: `rows` broadcasts, `vectors` loads of the inner operand, rows x vectors FMAs;
    # a tile also loads and stores its rows x vectors accumulators
    insts = tiles * (red * (rows + vectors + rows * vectors) + 2 * rows * vectors)
    return dict(zip(VTILE_NAMES, (math.log2(inner), inner / (vectors * LANES), math.log2(rows), math.log2(red),
                                  math.log2(tiles), math.log2(work * vectors / inner), math.log2(insts),
                                  math.log2(tiles * red * vectors))))


def vtile(fn: Function) -> dict[str, float]:
    """VTILE_NAMES of a function (see the module's note)."""
    ops = [o for o in linalg_ops(fn) if gemm_view(o)[0]]
    if not ops:
        return {n: 0.0 for n in VTILE_NAMES}
    main = max(ops, key=lambda o: o.flops())
    return features_of(*tile(main), main.flops() / 2)


def vector(fn: Function) -> list[float]:
    v = vtile(fn)
    return [float(v[n]) for n in VTILE_NAMES]
