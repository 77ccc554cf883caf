"""Features of the code path IREE's llvm-cpu backend takes for a kernel, read from the MLIR text alone.

Why: on the Intel host's held-out shapes the model's error sat in a few slow paths (NCHW and int8
convolutions, matmuls and fused matmuls whose N is odd, reductions over an outer axis), where the achieved
rate drops 5-10x against kernels of the same FLOPs and bytes. The training labels' assembly shows why: the
vector tile IREE picks must divide the loop it tiles, so a dimension with no power-of-two factor leaves the
vector loop narrow or scalar (training f32 matmuls, median achieved rate by the power of two dividing N: 1 ->
12, 2 -> 19, 8 -> 91, 64 -> 113, relative units), and a convolution whose contiguous axis is strided loads
its input with gathers. The assembly itself cannot be a feature (`predict` compiles nothing), so these
describe the same facts from the shapes: the power of two dividing each loop that gets vectorised, the
largest divisor up to a vector's lanes, and whether the innermost (contiguous) axis is strided or reduced.

Each is a shortfall: how many powers of two (or log2 lanes) the loop falls short of a full vector, 0 for an
aligned loop and 0 for a loop the kernel does not have. Absent is no penalty. The first encoding (the power of
two itself, 0 when absent) made "no contraction" read as "a contraction with odd M, N and K" and "no reduction"
as "an odd reduction", the slowest paths of the training set: with element-wise chains held out (the only
family with neither) the trees' per-feature contributions pushed every chain up by lanes_n, p2_n, p2_m and
p2_kept_inner (+0.22 in log latency together, Intel host, 2208 labels) and the held-out-family MAPE went 53% ->
113%. A shortfall of 0 for an absent loop sends such a kernel down the fast side of every split on it.
"""
from __future__ import annotations

import math

from memfit.plan.cost.gemm import gemm_view, kind
from memfit.plan.cost.ops import LinalgOp, linalg_ops
from memfit.plan.cost.parse import Function

# renamed from p2_* / lanes_* when the encoding became a shortfall: a model file of the old encoding fails to
# load (predict.load_model checks the names) instead of reading these columns the wrong way round
PATH_NAMES = ("short_m", "short_n", "short_k", "short_lanes_n", "short_inner_out", "short_lanes_inner_out",
              "short_inner_in", "conv_inner_strided", "short_conv_ow", "short_reduce", "short_kept_inner",
              "reduce_outer_elems")
P2_CAP, LANES = 64, 16  # a 64-divisible loop counts as aligned; 16 f32 lanes in a 512-bit vector


def pow2_divisor(x: int, cap: int = P2_CAP) -> float:
    """log2 of the largest power of two (at most `cap`) dividing x; 0 for odd x (or x <= 0)."""
    if x <= 0:
        return 0.0
    d = 1
    while x % (2 * d) == 0 and 2 * d <= cap:
        d *= 2
    return math.log2(d)


def lanes(x: int, width: int = LANES) -> float:
    """log2 of the largest divisor of x up to `width` (16 f32 lanes of a 512-bit vector): how wide a vector
    loop over x can be without a remainder."""
    if x <= 0:
        return 0.0
    return math.log2(max(d for d in range(1, min(width, x) + 1) if x % d == 0))


def short(x: int) -> float:
    """Powers of two short of P2_CAP dividing x: 0 when 64 | x, 6 for odd x."""
    return math.log2(P2_CAP) - pow2_divisor(x)


def short_lanes(x: int) -> float:
    """log2 lanes short of a full vector loop over x: 0 when 16 | x, 4 when no divisor up to 16 but 1."""
    return math.log2(LANES) - lanes(x)


def _main(ops: list[LinalgOp]) -> LinalgOp | None:
    return max(ops, key=lambda o: o.flops()) if ops else None


def path(fn: Function) -> dict[str, float]:
    """PATH_NAMES of a function (see the module's note); every one is 0 where the kernel lacks the loop."""
    ops = linalg_ops(fn)
    f = {n: 0.0 for n in PATH_NAMES}
    contractions = [o for o in ops if gemm_view(o)[0]]
    main = _main(contractions)
    if main is not None:
        m, n, k, _ = gemm_view(main)
        f.update(short_m=short(m), short_n=short(n), short_k=short(k), short_lanes_n=short_lanes(n))
        k_ = kind(main)
        if k_ == "conv_nchw":  # output N F OH OW, input N C H W: W is contiguous and stepped by the stride
            f.update(conv_inner_strided=float(main.strides > 1), short_conv_ow=short(main.outs[0].shape[-1]))
        elif k_ in ("conv_nhwc", "depthwise"):  # channels are contiguous: the stride steps an outer axis
            f.update(short_conv_ow=short(main.outs[0].shape[-2]))
    if fn.results and fn.results[0].shape:
        inner = fn.results[0].shape[-1]
        f.update(short_inner_out=short(inner), short_lanes_inner_out=short_lanes(inner))
    if fn.args and fn.args[0].shape:
        f["short_inner_in"] = short(fn.args[0].shape[-1])
    reducing = [o for o in ops if o.reductions and len(o.iterators) == len(o.domain) and not gemm_view(o)[0]]
    if reducing:
        r = max(reducing, key=lambda o: math.prod(o.domain))
        red = math.prod(d for d, it in zip(r.domain, r.iterators) if it == "reduction")
        kept = [d for d, it in zip(r.domain, r.iterators) if it == "parallel"]
        f.update(short_reduce=short(red), short_kept_inner=short(kept[-1]) if kept else 0.0)
        if r.iterators[-1] != "reduction":  # an outer-axis reduction: strided accumulation over the input
            f["reduce_outer_elems"] = math.log2(sum(t.elements for t in r.ins) + 1)
    return f


def vector(fn: Function) -> list[float]:
    p = path(fn)
    return [float(p[n]) for n in PATH_NAMES]
