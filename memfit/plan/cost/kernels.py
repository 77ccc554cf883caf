"""MLIR emitters of the kernel families: each takes the parameters `families` draws and returns the text of
one `func.func @main` (linalg named ops for contractions and convolutions, linalg.generic with arith/math
bodies for element-wise work, reductions, softmax and layer norm)."""
from __future__ import annotations

from collections.abc import Sequence

from memfit.plan.cost.emit import ACC, FLOATS, Func, amap, identity, ttype, zero


class Body:
    """Scalar lines of a linalg.generic body, with fresh names that do not clash with the function's."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0

    def __call__(self, text: str) -> str:
        self.n += 1
        name = f"%b{self.n}"
        self.lines.append(f"{name} = {text}")
        return name

    def const(self, value: str, t: str) -> str:
        return self(f"arith.constant {value} : {t}")


def finish(body: Body, value: str, t: str) -> list[str]:
    """Body lines ending in %r = value (of element type t): linalg.generic yields %r."""
    if body.lines and body.lines[-1].startswith(value + " = "):
        return [*body.lines[:-1], "%r" + body.lines[-1][len(value):]]
    return [*body.lines, "%true = arith.constant true", f"%r = arith.select %true, {value}, {value} : {t}"]


UNARY_F = ("relu", "exp", "tanh", "sigmoid", "gelu", "sqrt_abs", "scale", "neg")
BINARY_F = ("add", "mul", "sub", "max", "div")
UNARY_I = ("relu", "shr", "scale")
BINARY_I = ("add", "mul", "sub", "max")


def unary_f(b: Body, op: str, x: str) -> str:
    if op == "relu":
        return b(f"arith.maximumf {x}, {b.const('0.0', 'f32')} : f32")
    if op in ("exp", "tanh"):
        return b(f"math.{op} {x} : f32")
    if op == "neg":
        return b(f"arith.negf {x} : f32")
    if op == "scale":
        return b(f"arith.mulf {x}, {b.const('0.125', 'f32')} : f32")
    if op == "sqrt_abs":
        return b(f"math.sqrt {b(f'math.absf {x} : f32')} : f32")
    if op == "sigmoid":
        e = b(f"math.exp {b(f'arith.negf {x} : f32')} : f32")
        one = b.const("1.0", "f32")
        return b(f"arith.divf {one}, {b(f'arith.addf {e}, {one} : f32')} : f32")
    if op == "gelu":  # tanh approximation, as BERT and GPT-2 use
        c0, c1, half_c, one = (b.const(v, "f32") for v in ("0.044715", "0.7978846", "0.5", "1.0"))
        x3 = b(f"arith.mulf {b(f'arith.mulf {x}, {x} : f32')}, {x} : f32")
        inner = b(f"arith.addf {x}, {b(f'arith.mulf {x3}, {c0} : f32')} : f32")
        t = b(f"math.tanh {b(f'arith.mulf {inner}, {c1} : f32')} : f32")
        half = b(f"arith.mulf {x}, {half_c} : f32")
        return b(f"arith.mulf {half}, {b(f'arith.addf {t}, {one} : f32')} : f32")
    raise ValueError(op)


def binary_f(b: Body, op: str, x: str, y: str) -> str:
    name = {"add": "addf", "mul": "mulf", "sub": "subf", "max": "maximumf", "div": "divf"}[op]
    return b(f"arith.{name} {x}, {y} : f32")


def unary_i(b: Body, op: str, x: str) -> str:
    if op == "relu":
        return b(f"arith.maxsi {x}, {b.const('0', 'i32')} : i32")
    if op == "shr":
        return b(f"arith.shrsi {x}, {b.const('1', 'i32')} : i32")
    return b(f"arith.muli {x}, {b.const('3', 'i32')} : i32")


def binary_i(b: Body, op: str, x: str, y: str) -> str:
    name = {"add": "addi", "mul": "muli", "sub": "subi", "max": "maxsi"}[op]
    return b(f"arith.{name} {x}, {y} : i32")


def to_compute(b: Body, x: str, dtype: str) -> str:
    """Element of `dtype` -> the type arithmetic runs in (f32 for floats, i32 for int8)."""
    if dtype == "bf16":
        return b(f"arith.extf {x} : bf16 to f32")
    if dtype == "i8":
        return b(f"arith.extsi {x} : i8 to i32")
    return x


def from_compute(b: Body, x: str, dtype: str) -> str:
    if dtype == "bf16":
        return b(f"arith.truncf {x} : f32 to bf16")
    if dtype == "i8":
        return b(f"arith.trunci {x} : i32 to i8")
    return x


def compilation_info(tile: Sequence[int]) -> str:
    """IREE's per-op compilation info: a CPU lowering config with vector tile sizes (m, n, k) on the
    DoubleTilingExpert pipeline; the workgroup (distribution) tile is fixed at 64x64."""
    mv, nv, kv = tile
    return ("{compilation_info = #iree_codegen.compilation_info<lowering_config = #iree_cpu.lowering_config<"
            f"distribution = [64, 64, 0], vector_common_parallel = [{mv}, {nv}, 0], vector_reduction = [0, 0, {kv}]>, "
            "translation_info = #iree_codegen.translation_info<pipeline = #iree_cpu.pipeline<DoubleTilingExpert>>>}")


def contraction(kind: str, dtype: str, p: dict, epilogue: Sequence[str] = ()) -> str:
    """matmul / batch_matmul / conv (NHWC, NCHW, depthwise), optionally followed by element-wise epilogue
    ops on the accumulator (the fused producer-consumer family: bias add, activation)."""
    f = Func()
    acc = ACC[dtype]
    if kind == "matmul":
        a, w = f.arg((p["M"], p["K"]), dtype), f.arg((p["K"], p["N"]), dtype)
        out_shape = (p["M"], p["N"])
        init = f.filled(out_shape, acc)
        attr = compilation_info(p["tile"]) + " " if p.get("tile") else ""
        res = f.op(f"linalg.matmul {attr}ins({a}, {w} : {ttype((p['M'], p['K']), dtype)}, {ttype((p['K'], p['N']), dtype)})"
                   f" outs({init} : {ttype(out_shape, acc)}) -> {ttype(out_shape, acc)}", "mm")
    elif kind == "batch_matmul":
        sa, sb = (p["B"], p["M"], p["K"]), (p["B"], p["K"], p["N"])
        a, w = f.arg(sa, dtype), f.arg(sb, dtype)
        out_shape = (p["B"], p["M"], p["N"])
        init = f.filled(out_shape, acc)
        res = f.op(f"linalg.batch_matmul ins({a}, {w} : {ttype(sa, dtype)}, {ttype(sb, dtype)})"
                   f" outs({init} : {ttype(out_shape, acc)}) -> {ttype(out_shape, acc)}", "bmm")
    else:
        res, out_shape = _conv(f, kind, dtype, p)
    channel_axis = 1 if kind == "conv_nchw" else len(out_shape) - 1
    out = _epilogue(f, res, out_shape, acc, epilogue, channel_axis)
    return f.text([(out, ttype(out_shape, acc))])


def _conv(f: Func, kind: str, dtype: str, p: dict) -> tuple[str, tuple[int, ...]]:
    n, c, k, kh, s, d, oh = p["N"], p["C"], p["F"], p["KH"], p["stride"], p["dilation"], p["OH"]
    ih = (oh - 1) * s + d * (kh - 1) + 1
    acc = ACC[dtype]
    attrs = f"{{dilations = dense<{d}> : tensor<2xi64>, strides = dense<{s}> : tensor<2xi64>}}"
    if kind == "conv_nhwc":
        si, sf, so = (n, ih, ih, c), (kh, kh, c, k), (n, oh, oh, k)
        op = "linalg.conv_2d_nhwc_hwcf"
    elif kind == "conv_nchw":
        si, sf, so = (n, c, ih, ih), (k, c, kh, kh), (n, k, oh, oh)
        op = "linalg.conv_2d_nchw_fchw"
    else:  # depthwise: one filter per channel
        si, sf, so = (n, ih, ih, c), (kh, kh, c), (n, oh, oh, c)
        op = "linalg.depthwise_conv_2d_nhwc_hwc"
    x, w = f.arg(si, dtype), f.arg(sf, dtype)
    init = f.filled(so, acc)
    res = f.op(f"{op} {attrs} ins({x}, {w} : {ttype(si, dtype)}, {ttype(sf, dtype)})"
               f" outs({init} : {ttype(so, acc)}) -> {ttype(so, acc)}", "conv")
    return res, so


def _epilogue(f: Func, x: str, shape: tuple[int, ...], t: str, ops: Sequence[str], channel_axis: int) -> str:
    """Bias add (a per-channel argument) and activations after a contraction, one linalg.generic each, the
    way a framework exports them (IREE fuses them into the contraction's dispatch)."""
    rank = len(shape)
    for op in ops:
        e = f.empty(shape, t)
        b = Body()
        if op == "bias":
            bias = f.arg((shape[channel_axis],), t)
            r = b(f"arith.{'addf' if t == 'f32' else 'addi'} %in0, %in1 : {t}")
            ins = [(x, ttype(shape, t), identity(rank)), (bias, ttype((shape[channel_axis],), t),
                                                          amap(rank, [f"d{channel_axis}"]))]
        else:
            r = unary_f(b, op, "%in0") if t == "f32" else unary_i(b, op if op in UNARY_I else "relu", "%in0")
            ins = [(x, ttype(shape, t), identity(rank))]
        x = f.generic(ins, (e, ttype(shape, t), identity(rank)), ["parallel"] * rank, finish(b, r, t))
    return x


def elementwise(dtype: str, shape: Sequence[int], ops: Sequence[str], fused: bool) -> str:
    """A chain of unary and binary element-wise ops over `shape`; binary ops read a further argument.
    `fused`: one linalg.generic holding the whole chain, else one generic per op."""
    f = Func()
    rank, t = len(shape), ttype(shape, dtype)
    x = f.arg(shape, dtype)
    unary, binary = (unary_f, binary_f) if dtype in FLOATS else (unary_i, binary_i)
    groups = [list(ops)] if fused else [[op] for op in ops]
    for group in groups:
        ins = [(x, t, identity(rank))]
        b = Body()
        v = to_compute(b, "%in0", dtype)
        for op in group:
            if op.startswith("bin_"):
                ins.append((f.arg(shape, dtype), t, identity(rank)))
                y = to_compute(b, f"%in{len(ins) - 1}", dtype)
                v = binary(b, op[4:], v, y)
            else:
                v = unary(b, op, v)
        v = from_compute(b, v, dtype)
        x = f.generic(ins, (f.empty(shape, dtype), t, identity(rank)), ["parallel"] * rank, finish(b, v, dtype))
    return f.text([(x, t)])


def reduction(dtype: str, shape: Sequence[int], axes: Sequence[int], kind: str) -> str:
    """sum / max / mean over `axes` of `shape` (int8 sums accumulate in int32; mean is float only)."""
    f = Func()
    rank = len(shape)
    acc = ACC[dtype]
    x = f.arg(shape, dtype)
    keep = [i for i in range(rank) if i not in axes]
    oshape = tuple(shape[i] for i in keep)
    init_val = ("-3.0e38" if acc == "f32" else "-2147483648") if kind == "max" else zero(acc)
    init = f.filled(oshape, acc, init_val)
    b = Body()
    v = b(f"arith.extf %in0 : bf16 to f32") if dtype == "bf16" else (
        b("arith.extsi %in0 : i8 to i32") if dtype == "i8" else "%in0")
    if kind == "max":
        r = b(f"arith.{'maximumf' if acc == 'f32' else 'maxsi'} {v}, %out : {acc}")
    else:
        r = b(f"arith.{'addf' if acc == 'f32' else 'addi'} {v}, %out : {acc}")
    its = ["reduction" if i in axes else "parallel" for i in range(rank)]
    res = f.generic([(x, ttype(shape, dtype), identity(rank))],
                    (init, ttype(oshape, acc), amap(rank, [f"d{i}" for i in keep])), its, finish(b, r, acc))
    if kind == "mean":
        count = 1
        for a in axes:
            count *= shape[a]
        b2 = Body()
        m = b2(f"arith.mulf %in0, {b2.const(repr(1.0 / count), 'f32')} : f32")
        res = f.generic([(res, ttype(oshape, acc), identity(len(oshape)))],
                        (f.empty(oshape, acc), ttype(oshape, acc), identity(len(oshape))),
                        ["parallel"] * len(oshape), finish(b2, m, acc))
    return f.text([(res, ttype(oshape, acc))])
