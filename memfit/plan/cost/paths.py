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
"""
from __future__ import annotations

import math

from memfit.plan.cost.gemm import gemm_view, kind
from memfit.plan.cost.ops import LinalgOp, linalg_ops
from memfit.plan.cost.parse import Function

PATH_NAMES = ("p2_m", "p2_n", "p2_k", "lanes_n", "p2_inner_out", "lanes_inner_out", "p2_inner_in",
              "conv_inner_strided", "p2_conv_ow", "p2_reduce", "p2_kept_inner", "reduce_outer_elems")


def pow2_divisor(x: int, cap: int = 64) -> float:
    """log2 of the largest power of two (at most `cap`) dividing x; 0 for odd x (or x <= 0)."""
    if x <= 0:
        return 0.0
    d = 1
    while x % (2 * d) == 0 and 2 * d <= cap:
        d *= 2
    return math.log2(d)


def lanes(x: int, width: int = 16) -> float:
    """log2 of the largest divisor of x up to `width` (16 f32 lanes of a 512-bit vector): how wide a vector
    loop over x can be without a remainder."""
    if x <= 0:
        return 0.0
    return math.log2(max(d for d in range(1, min(width, x) + 1) if x % d == 0))


def _main(ops: list[LinalgOp]) -> LinalgOp | None:
    return max(ops, key=lambda o: o.flops()) if ops else None


def path(fn: Function) -> dict[str, float]:
    """PATH_NAMES of a function (see the module's note)."""
    ops = linalg_ops(fn)
    f = {n: 0.0 for n in PATH_NAMES}
    contractions = [o for o in ops if gemm_view(o)[0]]
    main = _main(contractions)
    if main is not None:
        m, n, k, _ = gemm_view(main)
        f.update(p2_m=pow2_divisor(m), p2_n=pow2_divisor(n), p2_k=pow2_divisor(k), lanes_n=lanes(n))
        k_ = kind(main)
        if k_ == "conv_nchw":  # output N F OH OW, input N C H W: W is contiguous and stepped by the stride
            f.update(conv_inner_strided=float(main.strides > 1), p2_conv_ow=pow2_divisor(main.outs[0].shape[-1]))
        elif k_ in ("conv_nhwc", "depthwise"):  # channels are contiguous: the stride steps an outer axis
            f.update(p2_conv_ow=pow2_divisor(main.outs[0].shape[-2]))
    if fn.results and fn.results[0].shape:
        inner = fn.results[0].shape[-1]
        f.update(p2_inner_out=pow2_divisor(inner), lanes_inner_out=lanes(inner))
    if fn.args and fn.args[0].shape:
        f["p2_inner_in"] = pow2_divisor(fn.args[0].shape[-1])
    reducing = [o for o in ops if o.reductions and len(o.iterators) == len(o.domain) and not gemm_view(o)[0]]
    if reducing:
        r = max(reducing, key=lambda o: math.prod(o.domain))
        red = math.prod(d for d, it in zip(r.domain, r.iterators) if it == "reduction")
        kept = [d for d, it in zip(r.domain, r.iterators) if it == "parallel"]
        f.update(p2_reduce=pow2_divisor(red), p2_kept_inner=pow2_divisor(kept[-1]) if kept else 0.0)
        if r.iterators[-1] != "reduction":  # an outer-axis reduction: strided accumulation over the input
            f["reduce_outer_elems"] = math.log2(sum(t.elements for t in r.ins) + 1)
    return f


def vector(fn: Function) -> list[float]:
    p = path(fn)
    return [float(p[n]) for n in PATH_NAMES]
