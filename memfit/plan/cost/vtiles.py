"""A model of the vector tile IREE's llvm-cpu backend gives a kernel's dominant contraction, read from the MLIR
text alone (`predict` compiles nothing), and what that tile costs: the features VTILE_NAMES.

Why: on the Intel host's labels the slowest kernels for their FLOPs are the ones whose vector tile IREE cuts
small. Its lowering strategy (`iree-compile --compile-to=executable-configurations`: compiler decisions, not
latency labels) takes, for each loop it vectorises, the largest size up to a cap that divides the loop: a
matmul's M up to 8, N up to 16 lanes (32 for i8, and for f32 and bf16 when the rest of the tile is small), its
K (the reduction step) up to 16; a convolution's output width up to 8, its output channels up to 16 and input
channels up to 8. A loop of prime length gets a tile of 1, so the kernel runs one row, one lane or one step at
a time (an f32 matmul 23x768x3072: tile 1x16x16, 4.4 GFLOP/s against 107 at 512^3; a matmul 256x23x30: K
step 1, 11x slower than the model before these columns read it). paths.py's power-of-two shortfalls see part
of this; a tile of 7 or 14 (a divisor, not a power of two) they read as short. 1x1 convolutions of stride 1
are lowered as matmuls (NHWC: output pixels x F; NCHW: F x output pixels); other NHWC and depthwise
convolutions vectorise their channels, NCHW ones their (strided) output width. The rules (Rules: their caps and
thresholds) were first read off every split's configurations; benchmarks/costmodel_vtile_rules.py fits them to
the training split's alone: every cap but two 1x1 stride-2 ones (8 and 5 kernels) comes out as SHIPPED's, two
thresholds differ by one kernel each, and
on the validation and test kernels SHIPPED gives IREE's exact tile on 90.4%, the training fit 90.8%
(docs/costmodel.md, "The vector tile model").

IREE takes an NCHW 1x1 convolution of stride 2 differently: its output width whole (up to 28; a multiple of 16
gets 16 f32 lanes, up to 32 for bf16 and i8), with the rows cut to a budget of inner x rows x step. SHIPPED
keeps the divisor rule the models before 8 December were trained with (17 of the 60 such kernels of the Intel host's 12000-label set
exact); STRIDED (`--vtile-rules strided`) has IREE's rule (60 of 60). Where such a tile is f32 and 21-28 wide,
IREE's code runs ~15x slower than at 16 lanes, which LAYOUT_NAMES let a model see (and GATHERED counts in the
instruction columns). ODD_N adds IREE's N tile of f32 matmuls whose N is not a multiple of 16: 16 lanes where
N's largest divisor up to 32 is over 16 and the tile is full, where SHIPPED keeps the divisor for an N over 64.

The features: log2 of the inner (vector) tile and its share of the 16-lane vectors it fills, log2 of the
tile's other parallel sizes (rows) and of its reduction step, log2 of the number of tiles (iterations / tile
volume: each has a fixed cost of accumulator loads and stores and loop control), of the vector operations
(iterations / inner tile x vectors per inner tile), of an instruction count (a reduction step: rows broadcasts,
inner/16 loads, rows x inner/16 FMAs) and of the loads of the inner operand. All 0 for a kernel without a
contraction.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from memfit.plan.cost.errors import CostModelError

from memfit.plan.cost.gemm import gemm_view, kind
from memfit.plan.cost.ops import LinalgOp, linalg_ops
from memfit.plan.cost.parse import Function

VTILE_NAMES = ("vt_log_inner", "vt_lane_eff", "vt_log_rows", "vt_log_red", "vt_log_tiles", "vt_log_vec_ops",
               "vt_log_insts", "vt_log_inner_loads")
# Appended after VTILE_NAMES (features.DEFAULT_NAMES): how the inner tile meets memory. vt_wide_tail: 1 when
# it spans more than one vector and ends in a part-filled one (a 28-wide f32 tile: 16 + 12 lanes), 0 otherwise;
# vt_log_inner_stride: log2 of the input's stride along the inner loop (an NCHW convolution that vectorises its
# output width, stride 2: 1; every other contraction reads it contiguously: 0). Why: IREE lowers a strided f32
# tile of 21-28 lanes into ~2000 single-lane moves; such kernels ran at 0.14-0.19 GFLOP/s against 1.55-3.46
# for those with a tile of 16 lanes or fewer (docs/costmodel.md, "The vector tile model").
LAYOUT_NAMES = ("vt_wide_tail", "vt_log_inner_stride")
LANES = 16  # f32 (and i32 accumulator) lanes of a 512-bit vector


def divisor_tile(x: int, cap: int) -> int:
    """The largest divisor of x that is at most cap (1 for a prime above cap)."""
    if x <= 0:
        return 1
    return max(d for d in range(1, min(cap, x) + 1) if x % d == 0)


@dataclass(frozen=True)
class Rules:
    """The caps and thresholds of the tile rules (see tile()). SHIPPED are the values the models shipped before
    8 December (and the Zen 4 model) were trained with, ODD_N the shipped Intel model's;
    benchmarks/costmodel_vtile_rules.py fits the numbers it names (PARAMS: not the NCHW 1x1 stride-2, odd-N or
    gathered ones) to one split's compiled configurations."""
    mm_rows: int = 8             # a matmul's M tile: largest divisor up to this (and a 1x1 convolution's)
    mm_step: int = 16            # its K step
    mm_i8_inner: int = 32        # an i8 matmul's N tile: largest divisor up to this
    mm_wide: int = 32            # an f32 / bf16 N that no other case takes: largest divisor up to this
    mm_bf16_small: int = 112     # bf16: a multiple of 16 gets 32 lanes when rows x step is under this
    mm_f32_small: int = 56       # f32: ... when rows x step is under this and the step is under mm_f32_short_k
    mm_f32_short_k: int = 16
    mm_f32_full_n: int = 64      # f32: an N up to this, not a multiple of 16, gets 16 lanes unless small
    # IREE's rule for an f32 N over 16 that is not a multiple of 16 (0: not modelled, as in SHIPPED; ODD_N sets
    # them): its largest divisor up to mm_wide, or 16 lanes (and a remainder) where that divisor is over 16 and
    # the tile is full: a K step of at least mm_f32_odd_step and rows x step of at least mm_f32_odd_tile.
    mm_f32_odd_step: int = 0
    mm_f32_odd_tile: int = 0
    # 1: an f32 tile of more than one vector that ends part-filled and reads a strided input (an NCHW 1x1 of
    # stride 2 taken whole-width) is counted as IREE compiles it, its inner operand moved one lane at a time
    # (the instruction and load columns); 0 (SHIPPED): a vector load per 16 lanes, as every other tile
    gather_f32_strided: int = 0
    nhwc_inner: int = 16         # NHWC convolution (not 1x1 stride 1): F tile
    nhwc_rows: int = 8           # output width tile (also of a 1x1 of stride 2)
    nhwc_step: int = 8           # C step
    nhwc_1x1s_inner: int = 16    # a 1x1 of stride 2: F tile (f32, bf16)
    nhwc_1x1s_inner_i8: int = 32  # ... (i8)
    conv_1x1s_step: int = 16     # a 1x1 of stride 2 (NHWC and NCHW): C step
    nchw_inner: int = 8          # NCHW convolution (not 1x1): output width tile
    nchw_rows: int = 16          # F tile, up to this, dividing a workgroup's share of F
    nchw_groups: int = 8         # the workgroups (images x F shares) F is split into at least
    nchw_step: int = 8           # C step
    nchw_1x1s_inner: int = 16    # an NCHW 1x1 of stride 2: output width tile
    nchw_1x1s_rows: int = 8      # ... output height tile
    # IREE's own rule for an NCHW 1x1 of stride 2 (0: not modelled, as in SHIPPED; STRIDED sets them): the
    # output width is taken whole (its largest divisor up to nchw_1x1s_whole) unless it is a multiple of 16,
    # which gets 16 lanes (f32) or its largest multiple of 16 up to 32 (bf16, i8); where inner x rows x step
    # is over the dtype's budget (in elements), the rows are cut to the largest power of two within it.
    nchw_1x1s_whole: int = 0
    nchw_1x1s_budget_f32: int = 0
    nchw_1x1s_budget_bf16: int = 0
    nchw_1x1s_budget_i8: int = 0
    dw_inner: int = 16           # depthwise: channel tile
    dw_rows: int = 8             # output width tile
    dw_taps: int = 3             # a filter up to this wide is one step; wider: one tap a step
    # How IREE spreads an NHWC (not 1x1) or depthwise convolution over workgroups, which the vector tile must
    # divide (0: not modelled, as in SHIPPED; WORKGROUPS sets them): F is cut into shares of at most this
    # (conv_f_dist: a multiple of 16 up to 96 stays whole, a larger one its largest multiple of 16 up to the cap,
    # any other F its largest divisor up to the cap) and the F tile divides a share; and when images x output
    # rows x F shares are fewer than conv_groups, the output width is cut too (its largest divisor that leaves
    # that many), and the row tile divides the cut.
    conv_f_dist: int = 0
    conv_groups: int = 0


SHIPPED = Rules()
# The workgroup-aware rules (read off the Zen 4 host's training configurations alone: on its NHWC and depthwise
# kernels the exact tile goes from 88.1% to 99.1% on training, 77.8% to 92.6% on validation, 83.3% to 98.1%
# on test; docs/costmodel.md). A model trained with them records it (Bundle.info["vtile_rules"]).
WORKGROUPS = dataclasses.replace(SHIPPED, conv_f_dist=64, conv_groups=8)
# IREE's rule for NCHW 1x1 convolutions of stride 2 (read off the Intel host's compiled configurations of all
# 60 such kernels of the 12000-label set: SHIPPED gives the exact tile on 17, these on 60; docs/costmodel.md).
STRIDED = dataclasses.replace(SHIPPED, nchw_1x1s_whole=28, nchw_1x1s_budget_f32=448, nchw_1x1s_budget_bf16=896,
                              nchw_1x1s_budget_i8=1536)
# ... and IREE's N tile of f32 matmuls whose N is not a multiple of 16 (its two numbers fitted to the 462
# training kernels of the 12000-label set with such an N over 16: IREE's inner tile on 443, SHIPPED's on 322;
# out of sample 74 / 76 validation and 129 / 134 test kernels, SHIPPED 50 and 88).
ODD_N = dataclasses.replace(STRIDED, mm_f32_odd_step=11, mm_f32_odd_tile=48)
# ... and the f32 whole-width strided tiles counted as IREE compiles them, lane by lane (Rules.gather_f32_strided)
GATHERED = dataclasses.replace(ODD_N, gather_f32_strided=1)
RULES = {"shipped": SHIPPED, "workgroups": WORKGROUPS, "strided": STRIDED, "odd_n": ODD_N, "gathered": GATHERED}
# what `train` uses unless told otherwise: the shipped Intel model's rules (a model file without the key, the
# Zen 4 one and every one before 8 December, reads SHIPPED's)
DEFAULT_RULES = "odd_n"
# `--vtile-rules`'s help, in `memfit costmodel train` and benchmarks/costmodel.py alike
RULES_HELP = (f"the vector-tile columns' rules (vtiles.RULES; default {DEFAULT_RULES}, the shipped model's: IREE's "
              "tile of NCHW 1x1 convolutions of stride 2 and of f32 matmuls whose N is not a multiple of 16; "
              "shipped: the rules of the models before; strided: the first alone; workgroups: shipped and IREE's "
              "workgroup cut of NHWC and depthwise convolutions; gathered: odd_n and f32 whole-width strided tiles "
              "counted lane by lane; the model records them)")


def rules_named(name: str | None) -> Rules:
    """RULES by name (None: SHIPPED); an unknown name is a CostModelError."""
    if name is None:
        return SHIPPED
    if name not in RULES:
        raise CostModelError(f"unknown vector tile rules {name!r} (this version knows {', '.join(RULES)}): "
                             "retrain the model (memfit costmodel train)")
    return RULES[name]


def tile(op: LinalgOp, rules: Rules = SHIPPED) -> tuple[int, int, int]:
    """(inner, rows, reduction step) of the vector tile IREE is modelled to give a contraction `op`."""
    r = rules
    k = kind(op)
    dtype = op.ins[0].dtype if op.ins else "f32"
    out = op.outs[0].shape
    if k in ("matmul", "batch_matmul"):
        m, n, kk = out[-2], out[-1], op.ins[0].shape[-1]
        tm, tk = divisor_tile(m, r.mm_rows), divisor_tile(kk, r.mm_step)
        return _matmul_inner(n, tm, tk, dtype, r), tm, tk
    if k == "conv_nhwc":  # filter HWCF, output N OH OW F
        kh, kw, c, f = op.ins[1].shape
        if kh == kw == 1 and op.strides == 1:  # a matmul: output pixels x F, reduced over C
            tm, tk = divisor_tile(out[0] * out[1] * out[2], r.mm_rows), divisor_tile(c, r.mm_step)
            return _matmul_inner(f, tm, tk, dtype, r), tm, tk
        if kh == kw == 1:
            cap = r.nhwc_1x1s_inner_i8 if dtype == "i8" else r.nhwc_1x1s_inner
            return divisor_tile(f, cap), divisor_tile(out[2], r.nhwc_rows), divisor_tile(c, r.conv_1x1s_step)
        f_share, w_share = _nhwc_shares(out[0], out[1], out[2], f, r)
        return divisor_tile(f_share, r.nhwc_inner), divisor_tile(w_share, r.nhwc_rows), divisor_tile(c, r.nhwc_step)
    if k == "conv_nchw":  # filter FCHW, output N F OH OW
        f, c, kh, kw = op.ins[1].shape
        if kh == kw == 1 and op.strides == 1:  # a matmul: F x output pixels, reduced over C
            tm, tk = divisor_tile(f, r.mm_rows), divisor_tile(c, r.mm_step)
            return _matmul_inner(out[2] * out[3], tm, tk, dtype, r), tm, tk
        if kh == kw == 1 and r.nchw_1x1s_whole:
            return _nchw_1x1s(out[2], out[3], c, dtype, r)
        if kh == kw == 1:
            return (divisor_tile(out[3], r.nchw_1x1s_inner), divisor_tile(out[2], r.nchw_1x1s_rows),
                    divisor_tile(c, r.conv_1x1s_step))
        share = _nchw_f_share(f, out[0], r.nchw_groups)
        return divisor_tile(out[3], r.nchw_inner), divisor_tile(share, r.nchw_rows), divisor_tile(c, r.nchw_step)
    if k == "depthwise":  # filter HWC, output N OH OW C
        kh, kw, c = op.ins[1].shape
        c_share, w_share = _nhwc_shares(out[0], out[1], out[2], c, r)
        # wider filters: one tap a step
        return divisor_tile(c_share, r.dw_inner), divisor_tile(w_share, r.dw_rows), kw if kw <= r.dw_taps else 1
    return 1, 1, 1


def _matmul_inner(n: int, tm: int, tk: int, dtype: str, r: Rules = SHIPPED) -> int:
    """A matmul's N tile: the largest divisor of N up to 32 for i8. For f32 and bf16 a multiple of 16 gets
    16, or 32 when the rest of the tile is small (tm x tk under 112 for bf16; for f32 a reduction step under
    16 and tm x tk under 56); an N under 16 is taken whole; an f32 N of 17-64 with a full tile gets 16 (and a
    remainder); any other N its largest divisor up to 32. (The numbers are SHIPPED's; `r` may change them.)
    With Rules.mm_f32_odd_step set (ODD_N), an f32 N that is not a multiple of 16 follows IREE's rule instead."""
    if dtype == "i8":
        return divisor_tile(n, r.mm_i8_inner)
    small = tm * tk < r.mm_bf16_small if dtype == "bf16" else (tk < r.mm_f32_short_k and tm * tk < r.mm_f32_small)
    if n % LANES == 0:
        return 2 * LANES if small else LANES
    if n < LANES:
        return n
    if dtype == "f32" and r.mm_f32_odd_step:
        d = divisor_tile(n, r.mm_wide)
        return LANES if d > LANES and tk >= r.mm_f32_odd_step and tm * tk >= r.mm_f32_odd_tile else d
    if n <= r.mm_f32_full_n and dtype == "f32" and not small:
        return LANES
    return divisor_tile(n, r.mm_wide)


def _nchw_1x1s(oh: int, ow: int, c: int, dtype: str, r: Rules) -> tuple[int, int, int]:
    """(inner, rows, step) of an NCHW 1x1 convolution of stride 2 by IREE's rule (Rules.nchw_1x1s_whole)."""
    if ow % LANES == 0:
        most = LANES if dtype == "f32" else 2 * LANES
        inner = max(d for d in range(LANES, most + 1, LANES) if ow % d == 0)
    else:
        inner = divisor_tile(ow, r.nchw_1x1s_whole)
    step = divisor_tile(c, r.conv_1x1s_step)
    rows = divisor_tile(oh, r.nchw_1x1s_rows)
    budget = {"i8": r.nchw_1x1s_budget_i8, "bf16": r.nchw_1x1s_budget_bf16}.get(dtype, r.nchw_1x1s_budget_f32)
    if inner * rows * step > budget:
        rows = 1
        while inner * 2 * rows * step <= budget:
            rows *= 2
    return inner, rows, step


def _f_dist(f: int, cap: int) -> int:
    """A workgroup's share of an NHWC convolution's F (or a depthwise one's channels): Rules.conv_f_dist."""
    if f % LANES == 0:
        return f if f <= 6 * LANES else max(d for d in range(LANES, max(cap, LANES) + 1, LANES) if f % d == 0)
    return divisor_tile(f, cap)


def _nhwc_shares(n: int, oh: int, ow: int, f: int, r: Rules) -> tuple[int, int]:
    """(F share, output width share) of an NHWC or depthwise convolution's workgroup: the whole of both with
    SHIPPED's rules; with conv_f_dist / conv_groups set, IREE's cut (Rules' note): the output rows are one a
    workgroup, and the width is cut only when images x rows x F shares fall short of conv_groups."""
    f_share = _f_dist(f, r.conv_f_dist) if r.conv_f_dist else f
    groups = n * oh * (f // f_share)
    if not r.conv_groups or groups >= r.conv_groups:
        return f_share, ow
    return f_share, divisor_tile(ow, max(1, groups * ow // r.conv_groups))


def _nchw_f_share(f: int, n: int, groups: int = 8) -> int:
    """A workgroup's share of an NCHW convolution's F: F is split so that the batch and F give at least
    `groups` (8) workgroups, into the largest power of two that divides F and leaves that many (IREE's choice
    on 76 of the 80 distinct compiled training shapes), or, where F has no such power of two, its largest
    divisor that does."""
    most = max(1, f * min(n, groups) // groups)
    p2 = 1
    while f % (2 * p2) == 0 and 2 * p2 <= most:
        p2 *= 2
    return p2 if p2 >= 2 else divisor_tile(f, most)


def features_of(inner: int, rows: int, red: int, work: float, gathered: bool = False) -> dict[str, float]:
    if work <= 0:
        return {n: 0.0 for n in VTILE_NAMES}
    vectors = math.ceil(inner / LANES)
    loads = inner if gathered else vectors  # a gathered inner operand: one move per lane
    tiles = max(work / (inner * rows * red), 1.0)
    # a reduction step of a tile: `rows` broadcasts, `loads` of the inner operand, rows x vectors FMAs;
    # a tile also loads and stores its rows x vectors accumulators
    insts = tiles * (red * (rows + loads + rows * vectors) + 2 * rows * vectors)
    return dict(zip(VTILE_NAMES, (math.log2(inner), inner / (vectors * LANES), math.log2(rows), math.log2(red),
                                  math.log2(tiles), math.log2(work * vectors / inner), math.log2(insts),
                                  math.log2(tiles * red * loads))))


def wide_tail(inner: int) -> bool:
    """An inner tile of more than one 16-lane vector that ends in a part-filled one (28 lanes: 16 + 12)."""
    return inner > LANES and inner % LANES != 0


def gathered(op: LinalgOp, inner: int, rules: Rules) -> bool:
    """Whether `rules` count the tile's inner operand as moved one lane at a time (Rules.gather_f32_strided)."""
    dtype = op.ins[0].dtype if op.ins else "f32"
    return bool(rules.gather_f32_strided) and dtype == "f32" and inner_stride(op) > 1 and wide_tail(inner)


def inner_stride(op: LinalgOp) -> int:
    """The input's stride along the loop a contraction vectorises: an NCHW convolution's (not a 1x1 of stride
    1, which is lowered as a matmul over output pixels) vectorises its output width, which steps the input by
    the stride (LinalgOp.strides: the first, as every kernel the generator draws has equal strides); every
    other kind's inner loop (N, F or channels) is contiguous."""
    if kind(op) != "conv_nchw":
        return 1
    kh, kw = op.ins[1].shape[2:]
    return 1 if kh == kw == 1 and op.strides == 1 else max(op.strides, 1)


def layout_of(op: LinalgOp, inner: int) -> list[float]:
    """LAYOUT_NAMES of a contraction `op` whose vector tile is `inner` lanes wide."""
    return [float(wide_tail(inner)), math.log2(inner_stride(op))]


def _dominant(fn: Function) -> LinalgOp | None:
    """The contraction of most FLOPs (the one the tile columns describe), or None."""
    ops = [o for o in linalg_ops(fn) if gemm_view(o)[0]]
    return max(ops, key=lambda o: o.flops()) if ops else None


def vtile(fn: Function, rules: Rules = SHIPPED) -> dict[str, float]:
    """VTILE_NAMES of a function (see the module's note), its tile by `rules`."""
    main = _dominant(fn)
    if main is None:
        return {n: 0.0 for n in VTILE_NAMES}
    t = tile(main, rules)
    return features_of(*t, main.flops() / 2, gathered(main, t[0], rules))


def layout(fn: Function, rules: Rules = SHIPPED) -> list[float]:
    """LAYOUT_NAMES of a function (the tile by `rules`; all 0 without a contraction)."""
    main = _dominant(fn)
    return [0.0] * len(LAYOUT_NAMES) if main is None else layout_of(main, tile(main, rules)[0])


def columns(fn: Function, rules: Rules = SHIPPED) -> list[float]:
    """VTILE_NAMES then LAYOUT_NAMES of a function, its ops parsed and its tile found once (features.full_vector)."""
    main = _dominant(fn)
    if main is None:
        return [0.0] * (len(VTILE_NAMES) + len(LAYOUT_NAMES))
    t = tile(main, rules)
    f = features_of(*t, main.flops() / 2, gathered(main, t[0], rules))
    return [float(f[n]) for n in VTILE_NAMES] + layout_of(main, t[0])
