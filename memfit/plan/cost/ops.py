"""The linalg ops of a function body, read from MLIR text: kind, operand and result tensor types, iteration
domain, and the scalar ops of generic bodies. Enough to count FLOPs and bytes (features and the roofline)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from memfit.plan.cost.errors import MlirParseError
from memfit.plan.cost.parse import Function, TensorType, tensor_type

_OP = re.compile(r"(?<![#!\w.])(linalg\.[a-z_0-9]+)\b")  # not an attribute's #linalg.type_fn<...>
_TYPES = re.compile(r"(ins|outs)\(([^)]*)\)")
_TENSOR = re.compile(r"tensor<([^>]*)>")
_MAPS = re.compile(r"affine_map<\(([^)]*)\)\s*->\s*\(([^)]*)\)>")
_ITERS = re.compile(r"iterator_types\s*=\s*\[([^\]]*)\]")
_SCALAR = re.compile(r"\b(arith|math)\.([a-z_0-9]+)")
_ATTR = re.compile(r"(strides|dilations)\s*=\s*dense<\[?([0-9, ]+)\]?>")
TRANSCENDENTAL = {"exp", "tanh", "log", "rsqrt", "sqrt", "erf", "powf", "sin", "cos", "divf", "exp2", "log1p"}


@dataclass
class LinalgOp:
    name: str
    ins: list[TensorType]
    outs: list[TensorType]
    domain: list[int] = field(default_factory=list)
    reductions: int = 0
    iterators: list[str] = field(default_factory=list)  # a generic's iterator types, one per loop of `domain`
    scalar_ops: dict[str, int] = field(default_factory=dict)
    strides: int = 1
    dilations: int = 1

    @property
    def short(self) -> str:
        return self.name.split(".", 1)[1]

    def flops(self) -> float:
        """Multiply-adds count 2; element-wise bodies count their arith/math ops (transcendentals as 8: the
        polynomial they expand to)."""
        out = self.outs[0] if self.outs else None
        n_out = out.elements if out else 0
        s = self.short
        if s == "fill":
            return 0.0
        if s in ("matmul", "batch_matmul", "matmul_transpose_b", "batch_matmul_transpose_b"):
            k = self.ins[0].shape[-1]
            return 2.0 * n_out * k
        if s.startswith("conv_2d_nhwc_hwcf"):
            kh, kw, c, _ = self.ins[1].shape
            return 2.0 * n_out * kh * kw * c
        if s.startswith("conv_2d_nchw_fchw"):
            _, c, kh, kw = self.ins[1].shape
            return 2.0 * n_out * kh * kw * c
        if s.startswith("depthwise_conv"):
            kh, kw = self.ins[1].shape[:2]
            return 2.0 * n_out * kh * kw
        dom = 1
        for d in self.domain or (out.shape if out else ()):
            dom *= d
        per = sum(n * (8 if op in TRANSCENDENTAL else 1) for op, n in self.scalar_ops.items()
                  if op not in ("constant", "extf", "truncf", "extsi", "trunci", "select", "sitofp", "fptosi"))
        return float(dom * max(per, 1))

    def bytes(self) -> int:
        return sum(t.elements * bytes_of(t.dtype) for t in (*self.ins, *self.outs))


def bytes_of(dtype: str) -> int:
    if dtype in ("f64", "i64"):
        return 8
    if dtype in ("f16", "bf16", "i16"):
        return 2
    if dtype in ("i8", "i1"):
        return 1
    return 4


def linalg_ops(fn: Function) -> list[LinalgOp]:
    body = fn.body
    starts = [m for m in _OP.finditer(body) if m.group(1) != "linalg.yield" and m.group(1) != "linalg.index"]
    ops = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(body)
        text = body[m.start():end]
        ops.append(_read(m.group(1), text))
    return ops


def _read(name: str, text: str) -> LinalgOp:
    head = text.split("^bb0", 1)[0]
    ins: list[TensorType] = []
    outs: list[TensorType] = []
    for kind, inner in _TYPES.findall(head):
        types = [tensor_type(t) for t in _TENSOR.findall(inner)]
        (ins if kind == "ins" else outs).extend(types)
    if not outs:  # `-> tensor<...>` result form
        res = _TENSOR.findall(text.split("->")[-1]) if "->" in text else []
        outs = [tensor_type(res[-1])] if res else []
    op = LinalgOp(name, ins, outs)
    for attr, vals in _ATTR.findall(head):
        setattr(op, attr, int(vals.split(",")[0]))
    if name == "linalg.generic":
        op.domain = _domain(head, [*ins, *outs])
        iters = _ITERS.search(head)
        op.reductions = iters.group(1).count("reduction") if iters else 0
        op.iterators = re.findall(r"parallel|reduction", iters.group(1)) if iters else []
        for _, sop in _SCALAR.findall(text.split("^bb0", 1)[-1]):
            op.scalar_ops[sop] = op.scalar_ops.get(sop, 0) + 1
    return op


# The dialects of the data set's kernels (families.py): the model has seen no op of another, so it refuses one
# rather than predict as if the op were not there (features count linalg ops only; docs/costmodel.md).
DIALECTS = ("linalg", "tensor", "arith", "math", "func")
# An op's name: at the start of a statement or after `%x =`, not an attribute's name (`{some.attr = ...}`).
_OP_NAME = re.compile(r'(?:^|[\n{}=])\s*"?([A-Za-z_][\w$]*)\.([A-Za-z_][\w$.]*)(?![\w$.])(?!\s*=)')


def _ranks(short: str) -> tuple[tuple[int, ...], int] | None:
    """(ranks of the input tensors, rank of the output) an op's FLOPs and GEMM view read axes of (flops(),
    gemm.gemm_view, features.extra), or None where they read no axis of a given operand."""
    if short in ("matmul", "matmul_transpose_b"):
        return (2, 2), 2
    if short in ("batch_matmul", "batch_matmul_transpose_b"):
        return (3, 3), 3
    if short.startswith(("conv_2d_nhwc", "conv_2d_nchw")):
        return (4, 4), 4
    if short.startswith("depthwise"):
        return (4, 3), 4
    return None


def check_readable(fn: Function) -> list[LinalgOp]:
    """The linalg ops of `fn`, or an MlirParseError where the cost model cannot read it: an op of a dialect it
    has not seen, no linalg op at all (nothing to predict), an op without the tensor operands and result its
    figures are read from (a cut or hand-edited file: these were IndexErrors deep in the features), or a
    tensor with a dimension of 0 (its log sizes)."""
    for m in _OP_NAME.finditer(fn.body):
        if m.group(1) not in DIALECTS:
            raise MlirParseError(f"@{fn.name}: op {m.group(1)}.{m.group(2)} is not one the cost model can read: it "
                                 f"reads {', '.join(DIALECTS[:-2])} and {DIALECTS[-2]} ops only (docs/costmodel.md)")
    ops = linalg_ops(fn)
    if not ops:
        raise MlirParseError(f"@{fn.name} has no linalg op (matmul, conv, generic, ...): nothing for the cost "
                             f"model to predict")
    for t in (*fn.args, *fn.results):
        if 0 in t.shape:
            raise MlirParseError(f"@{fn.name}: tensor<{t.input_flag()}> is empty; the cost model needs every "
                                 f"dimension >= 1")
    for i, op in enumerate(ops, 1):
        rule, types = _ranks(op.short), ", ".join(f"tensor<{t.input_flag()}>" for t in (*op.ins, *op.outs))
        bad = None
        if not op.outs:
            bad = "no result tensor"
        elif any(0 in t.shape for t in (*op.ins, *op.outs)):
            bad = "an empty tensor"
        elif rule is not None:
            ins, out = rule
            if len(op.ins) < len(ins) or any(len(t.shape) != r for t, r in zip(op.ins, ins)) \
                    or len(op.outs[0].shape) != out:
                bad = (f"expected inputs of rank {', '.join(map(str, ins))} and an output of rank {out}, read "
                       f"{types or 'none'}")
        if bad:
            raise MlirParseError(f"@{fn.name}: cannot read the operands of {op.name} (linalg op {i}): {bad}")
    return ops


def _domain(head: str, operands: list[TensorType]) -> list[int]:
    """Loop bounds of a generic from its indexing maps: a map result that is a bare dN takes that operand's
    size on that axis."""
    maps = _MAPS.findall(head)
    if not maps:
        return []
    n = len([d for d in maps[0][0].split(",") if d.strip()])
    dom = [1] * n
    for (_, results), t in zip(maps, operands):
        for axis, expr in enumerate(r.strip() for r in results.split(",") if r.strip()):
            if re.fullmatch(r"d\d+", expr) and axis < len(t.shape):
                k = int(expr[1:])
                if k < n:
                    dom[k] = max(dom[k], t.shape[axis])
    return dom
