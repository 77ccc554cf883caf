"""MLIR emitters of the normalisation families: softmax, layer norm, and scaled attention scores
(batch matmul, scale, softmax: a fused producer-consumer chain). All in linalg.generic over the last axis;
bf16 inputs are computed in f32 and written back as bf16, as frameworks lower them."""
from __future__ import annotations

from collections.abc import Sequence

from memfit.plan.cost.emit import Func, amap, identity, ttype
from memfit.plan.cost.kernels import Body, finish


def _row_reduce(f: Func, x: str, shape: Sequence[int], t: str, kind: str, pre: str = "") -> str:
    """Reduce the last axis of f32-computed `x` (type t) into shape[:-1] f32: max or sum; `pre` is an op
    name applied to each element first ("" or "square")."""
    rank = len(shape)
    oshape = tuple(shape[:-1])
    init = f.filled(oshape, "f32", "-3.0e38" if kind == "max" else "0.0")
    b = Body()
    v = b("arith.extf %in0 : bf16 to f32") if t == "bf16" else "%in0"
    if pre == "square":
        v = b(f"arith.mulf {v}, {v} : f32")
    r = b(f"arith.{'maximumf' if kind == 'max' else 'addf'} {v}, %out : f32")
    its = ["parallel"] * (rank - 1) + ["reduction"]
    return f.generic([(x, ttype(shape, t), identity(rank))],
                     (init, ttype(oshape, "f32"), amap(rank, [f"d{i}" for i in range(rank - 1)])), its,
                     finish(b, r, "f32"))


def _softmax_body(f: Func, x: str, shape: Sequence[int], t: str, out_t: str) -> str:
    rank = len(shape)
    row = amap(rank, [f"d{i}" for i in range(rank - 1)])
    par = ["parallel"] * rank
    m = _row_reduce(f, x, shape, t, "max")
    b = Body()
    v = b("arith.extf %in0 : bf16 to f32") if t == "bf16" else "%in0"
    e_ = b(f"math.exp {b(f'arith.subf {v}, %in1 : f32')} : f32")
    e = f.generic([(x, ttype(shape, t), identity(rank)), (m, ttype(shape[:-1], "f32"), row)],
                  (f.empty(shape, "f32"), ttype(shape, "f32"), identity(rank)), par, finish(b, e_, "f32"))
    s = _row_reduce(f, e, shape, "f32", "sum")
    b = Body()
    y = b("arith.divf %in0, %in1 : f32")
    if out_t == "bf16":
        y = b(f"arith.truncf {y} : f32 to bf16")
    return f.generic([(e, ttype(shape, "f32"), identity(rank)), (s, ttype(shape[:-1], "f32"), row)],
                     (f.empty(shape, out_t), ttype(shape, out_t), identity(rank)), par, finish(b, y, out_t))


def softmax(dtype: str, shape: Sequence[int]) -> str:
    f = Func()
    x = f.arg(shape, dtype)
    y = _softmax_body(f, x, shape, dtype, dtype)
    return f.text([(y, ttype(shape, dtype))])


def layernorm(dtype: str, shape: Sequence[int]) -> str:
    """y = (x - mean) / sqrt(var + 1e-5) * gamma + beta over the last axis (BERT's and ViT's LayerNorm)."""
    f = Func()
    rank, h = len(shape), shape[-1]
    x = f.arg(shape, dtype)
    gamma, beta = f.arg((h,), dtype), f.arg((h,), dtype)
    row = amap(rank, [f"d{i}" for i in range(rank - 1)])
    last = amap(rank, [f"d{rank - 1}"])
    par = ["parallel"] * rank
    s = _row_reduce(f, x, shape, dtype, "sum")
    sq = _row_reduce(f, x, shape, dtype, "sum", pre="square")
    b = Body()
    ext = (lambda v: b(f"arith.extf {v} : bf16 to f32")) if dtype == "bf16" else (lambda v: v)
    inv_h = b.const(repr(1.0 / h), "f32")
    mean = b(f"arith.mulf %in1, {inv_h} : f32")
    eps = b.const("1.0e-05", "f32")
    var = b(f"arith.subf {b(f'arith.mulf %in2, {inv_h} : f32')}, {b(f'arith.mulf {mean}, {mean} : f32')} : f32")
    rstd = b(f"math.rsqrt {b(f'arith.addf {var}, {eps} : f32')} : f32")
    centred = b(f"arith.subf {ext('%in0')}, {mean} : f32")
    g, bt = ext("%in3"), ext("%in4")
    normed = b(f"arith.mulf {centred}, {rstd} : f32")
    y = b(f"arith.addf {b(f'arith.mulf {normed}, {g} : f32')}, {bt} : f32")
    if dtype == "bf16":
        y = b(f"arith.truncf {y} : f32 to bf16")
    out = f.generic([(x, ttype(shape, dtype), identity(rank)), (s, ttype(shape[:-1], "f32"), row),
                     (sq, ttype(shape[:-1], "f32"), row), (gamma, ttype((h,), dtype), last),
                     (beta, ttype((h,), dtype), last)],
                    (f.empty(shape, dtype), ttype(shape, dtype), identity(rank)), par, finish(b, y, dtype))
    return f.text([(out, ttype(shape, dtype))])


def attention_scores(dtype: str, p: dict) -> str:
    """softmax(Q @ K^T * scale) per head: batch_matmul (B, M, K) x (B, K, N), scaled, softmax over N."""
    f = Func()
    sa, sb, so = (p["B"], p["M"], p["K"]), (p["B"], p["K"], p["N"]), (p["B"], p["M"], p["N"])
    q, k = f.arg(sa, dtype), f.arg(sb, dtype)
    init = f.filled(so, "f32")
    s = f.op(f"linalg.batch_matmul ins({q}, {k} : {ttype(sa, dtype)}, {ttype(sb, dtype)})"
             f" outs({init} : {ttype(so, 'f32')}) -> {ttype(so, 'f32')}", "bmm")
    b = Body()
    scale = b.const("0.125", "f32")
    scaled = b(f"arith.mulf %in0, {scale} : f32")
    s = f.generic([(s, ttype(so, "f32"), identity(3))], (f.empty(so, "f32"), ttype(so, "f32"), identity(3)),
                  ["parallel"] * 3, finish(b, scaled, "f32"))
    y = _softmax_body(f, s, so, "f32", dtype)
    return f.text([(y, ttype(so, dtype))])
