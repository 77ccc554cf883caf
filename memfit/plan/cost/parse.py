"""Read what the cost model needs from MLIR text without MLIR bindings: the public functions, their
argument and result tensor types, and the ops in their bodies. `predict` must work with IREE uninstalled,
so this is a light reader of the textual form, not a full parser; what it cannot read is an MlirParseError."""
from __future__ import annotations

import re
from dataclasses import dataclass

from memfit.plan.cost.errors import MlirParseError

_FUNC = re.compile(r"func\.func\s+(?P<vis>private\s+|public\s+)?@(?P<name>[\w$.-]+)\s*\((?P<args>[^)]*)\)"
                   r"\s*(->\s*(?P<res>\([^)]*\)|[^{]+?))?\s*(attributes\s*\{[^}]*\})?\s*\{")
_TENSOR = re.compile(r"tensor<([^>]*)>")
_NOT_CODE = re.compile(r'"(?:[^"\\\n]|\\.)*"|//[^\n]*')  # string literals and comments: their braces do not count


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str

    @property
    def elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def input_flag(self) -> str:
        """The `--input=` spelling of iree-run-module / iree-benchmark-module (zeros of this type)."""
        return "x".join([*map(str, self.shape), self.dtype])


@dataclass(frozen=True)
class Function:
    name: str
    args: tuple[TensorType, ...]
    results: tuple[TensorType, ...]
    body: str


def tensor_type(text: str) -> TensorType:
    parts = text.strip().split("x")
    try:
        shape = tuple(int(p) for p in parts[:-1])
    except ValueError as exc:
        raise MlirParseError(f"dynamic or unreadable tensor type tensor<{text}>: the cost model needs static "
                             "shapes") from exc
    return TensorType(shape, parts[-1].strip())


def functions(text: str) -> list[Function]:
    """Every func.func with a body in `text` (public ones first, in order)."""
    out = []
    code = _NOT_CODE.sub(lambda c: " " * len(c.group()), text)  # the same offsets as `text`
    for m in _FUNC.finditer(code):
        start, depth, i = m.end(), 1, m.end()
        while depth and i < len(code):  # the body runs to the matching brace
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            i += 1
        if depth:  # the text ended inside the body: read as it was, a cut file was predicted from what was left
            raise MlirParseError(f"@{m.group('name')} has no closing brace: the file is cut short or its braces do "
                                 f"not balance")
        args = tuple(tensor_type(t) for t in _TENSOR.findall(m.group("args")))
        results = tuple(tensor_type(t) for t in _TENSOR.findall(m.group("res") or ""))
        out.append((bool(m.group("vis") and "private" in m.group("vis")),
                    Function(m.group("name"), args, results, text[start:i - 1])))
    if code.count("{") != code.count("}"):  # e.g. a module cut after its function's closing brace
        raise MlirParseError(f"the braces do not balance ({code.count('{')} '{{' against {code.count('}')} '}}'): "
                             f"the file is cut short or not MLIR")
    return [f for private, f in sorted(out, key=lambda x: x[0])]


def pick_function(text: str, name: str | None = None) -> Function:
    """The function `name`, or the module's only public function."""
    funcs = functions(text)
    if not funcs:
        raise MlirParseError("no func.func found in the MLIR text")
    if name is not None:
        for f in funcs:
            if f.name == name:
                return f
        raise MlirParseError(f"no function @{name}; the module has {', '.join('@' + f.name for f in funcs)}")
    public = [f for f in funcs if f"func.func private @{f.name}" not in text]
    if len(public) != 1:
        raise MlirParseError(f"the module has {len(public)} public functions "
                             f"({', '.join('@' + f.name for f in public)}): choose one with --function")
    return public[0]
