"""Small helpers that write MLIR text in the linalg, tensor and arith dialects.

Every kernel is one `func.func` over tensors; SSA names come from a `Namer` so programs stay readable."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Element type and the accumulator type a contraction over it produces (int8 accumulates in int32).
ACC = {"f32": "f32", "bf16": "f32", "i8": "i32"}
FLOATS = ("f32", "bf16")
BYTES = {"f32": 4, "bf16": 2, "i8": 1, "i32": 4}


def ttype(shape: Sequence[int], dtype: str) -> str:
    return "tensor<" + "x".join(str(int(d)) for d in shape) + ("x" if shape else "") + dtype + ">"


def amap(rank: int, results: Sequence[str]) -> str:
    dims = ", ".join(f"d{i}" for i in range(rank))
    return f"affine_map<({dims}) -> ({', '.join(results)})>"


def identity(rank: int) -> str:
    return amap(rank, [f"d{i}" for i in range(rank)])


def zero(dtype: str) -> str:
    return "0.0" if dtype in ("f32", "bf16") else "0"


@dataclass
class Func:
    """A function being written: arguments, body lines, and fresh SSA names."""

    name: str = "main"
    args: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    lines: list[str] = field(default_factory=list)
    counter: int = 0

    def fresh(self, stem: str = "v") -> str:
        self.counter += 1
        return f"%{stem}{self.counter}"

    def arg(self, shape: Sequence[int], dtype: str) -> str:
        name = f"%arg{len(self.args)}"
        self.args.append((name, ttype(shape, dtype)))
        return name

    def op(self, text: str, stem: str = "v") -> str:
        name = self.fresh(stem)
        self.lines.append(f"  {name} = {text}")
        return name

    def const(self, value: str, dtype: str) -> str:
        return self.op(f"arith.constant {value} : {dtype}", "c")

    def empty(self, shape: Sequence[int], dtype: str) -> str:
        return self.op(f"tensor.empty() : {ttype(shape, dtype)}", "e")

    def filled(self, shape: Sequence[int], dtype: str, value: str | None = None) -> str:
        """An output tensor filled with `value` (zero by default): the init of a contraction or reduction."""
        c = self.const(value if value is not None else zero(dtype), dtype)
        e = self.empty(shape, dtype)
        t = ttype(shape, dtype)
        return self.op(f"linalg.fill ins({c} : {dtype}) outs({e} : {t}) -> {t}", "f")

    def generic(self, ins: Sequence[tuple[str, str, str]], out: tuple[str, str, str], iterators: Sequence[str],
                body: Sequence[str]) -> str:
        """linalg.generic over `ins` and one `out`, each (value, tensor type, affine map). `body` lines use
        %in0.. for the inputs' elements and %out for the output's, and set the element result as %r."""
        maps = ", ".join(m for _, _, m in [*ins, out])
        its = ", ".join(f'"{i}"' for i in iterators)
        in_vals = ", ".join(v for v, _, _ in ins)
        in_types = ", ".join(t for _, t, _ in ins)
        elem = lambda t: t.rsplit("x", 1)[-1].rstrip(">") if "x" in t else t[len("tensor<"):-1]  # noqa: E731
        bb = ", ".join([f"%in{i}: {elem(t)}" for i, (_, t, _) in enumerate(ins)] + [f"%out: {elem(out[1])}"])
        text = [f"linalg.generic {{indexing_maps = [{maps}], iterator_types = [{its}]}}"
                f" ins({in_vals} : {in_types}) outs({out[0]} : {out[1]}) {{",
                f"  ^bb0({bb}):"]
        text += [f"    {line}" for line in body]
        text += [f"    linalg.yield %r : {elem(out[1])}", f"  }} -> {out[1]}"]
        return self.op("\n  ".join(text), "g")

    def text(self, results: Sequence[tuple[str, str]]) -> str:
        args = ", ".join(f"{n}: {t}" for n, t in self.args)
        rtypes = ", ".join(t for _, t in results)
        ret = f"  return {', '.join(v for v, _ in results)} : {rtypes}"
        return "\n".join([f"func.func @{self.name}({args}) -> ({rtypes}) {{", *self.lines, ret, "}", ""])
