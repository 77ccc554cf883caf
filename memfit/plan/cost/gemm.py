"""The kind of a linalg op and the GEMM view of a contraction (features.py and paths.py both read them)."""
from __future__ import annotations

from memfit.plan.cost.ops import LinalgOp

OP_KINDS = ("matmul", "batch_matmul", "conv_nhwc", "conv_nchw", "depthwise", "generic", "reduce_generic", "fill")


def kind(op: LinalgOp) -> str:
    s = op.short
    if s.startswith("conv_2d_nhwc"):
        return "conv_nhwc"
    if s.startswith("conv_2d_nchw"):
        return "conv_nchw"
    if s.startswith("depthwise"):
        return "depthwise"
    if s == "generic":
        return "reduce_generic" if op.reductions else "generic"
    return s if s in OP_KINDS else "generic"


def gemm_view(op: LinalgOp) -> tuple[int, int, int, int]:
    """GEMM view (M, N, K) of a contraction, and its filter height (convs)."""
    out = op.outs[0].shape
    s = kind(op)
    if s in ("matmul", "batch_matmul"):
        b = out[0] if s == "batch_matmul" else 1
        return b * out[-2], out[-1], op.ins[0].shape[-1], 1
    if s == "conv_nhwc":
        kh, kw, c, f = op.ins[1].shape
        return out[0] * out[1] * out[2], f, kh * kw * c, kh
    if s == "conv_nchw":
        f, c, kh, kw = op.ins[1].shape
        return out[0] * out[2] * out[3], f, kh * kw * c, kh
    if s == "depthwise":
        kh, kw, c = op.ins[1].shape
        return out[0] * out[1] * out[2], c, kh * kw, kh
    return 0, 0, 0, 0
