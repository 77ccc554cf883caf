"""Graph extraction without weights: torch.export on the meta device -> memfit Graph with exact byte sizes.

Every ATen call becomes an operator, except views/reshapes that move no data: their result aliases the input
tensor. Sub-graphs that do not depend on the user inputs (masks built from `new_zeros`, `arange`, ...) are
constant-folded into weight tensors, as an accelerator compiler would. Floating-point tensors are sized with
the chosen dtype; integer/bool tensors keep their own element size.
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

from memfit.plan.errors import UnsupportedGraphError
from memfit.plan.plan_format import Graph, OpSpec, TensorSpec, build_graph

# ATen ops whose output shares the input's storage (or a metadata-only reshuffle of it).
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "t",
    "permute", "expand", "expand_as", "view_as", "alias", "detach", "select", "slice", "narrow", "as_strided",
    "unbind", "split", "split_with_sizes", "chunk", "diagonal", "unfold", "contiguous", "dropout",
    "lift_fresh_copy", "_assert_tensor_metadata",
}
# Ops that read only the metadata (shape/dtype) of their tensor arguments: their result is a constant.
FACTORY_OPS = {
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like",
    "scalar_tensor", "arange", "zeros", "ones", "empty", "full", "empty_strided", "eye", "linspace",
    "sym_size", "sym_numel", "sym_stride",
}
UNSUPPORTED_HINT = "export the model without it, or file an issue with the op name"


def _base_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))  # e.g. "conv2d.default"
    return name.split(".")[0]


def _itemsize(t, dtype) -> int:
    return dtype.itemsize if t.dtype.is_floating_point else t.dtype.itemsize


def extract_graph(model, example_inputs: tuple, name: str = "model", dtype=None) -> Graph:
    """Trace `model` with torch.export (inputs may live on the meta device) and build a Graph.

    dtype: element type for floating-point tensors (default: as traced)."""
    import torch

    try:
        ep = torch.export.export(model, tuple(example_inputs)).run_decompositions({})
    except Exception as exc:  # noqa: BLE001 - export explains data-dependent control flow etc.; keep its first lines
        msg = str(exc).strip().splitlines()
        raise UnsupportedGraphError(
            f"cannot trace {name!r} with torch.export: {type(exc).__name__}: {' '.join(msg[:3])[:400]}"
        ) from None
    sig = ep.graph_signature
    weight_names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                    **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    user_inputs = set(sig.user_inputs)
    out_nodes = set()
    tensors: dict[str, TensorSpec] = {}
    ops: list[OpSpec] = []
    alias: dict[Any, str | None] = {}  # fx node -> memfit tensor name (None: not a tensor)
    const: set[Any] = set()  # fx nodes whose value does not depend on user inputs

    def add_tensor(tname: str, val, kind: str) -> str:
        if val.numel() == 0:
            return ""
        tensors[tname] = TensorSpec(tname, int(val.numel()) * _itemsize(val, dtype or val.dtype), kind)
        return tname

    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            if not isinstance(val, torch.Tensor):
                alias[node] = None
                continue
            if node.name in user_inputs:
                alias[node] = add_tensor(node.name, val, "input")
            else:
                const.add(node)
                alias[node] = add_tensor(weight_names.get(node.name, node.name), val, "weight")
            continue
        if node.op == "output":
            for a in node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]:
                if hasattr(a, "name"):
                    out_nodes.add(a)
            continue
        if node.op != "call_function":
            raise UnsupportedGraphError(f"{name}: unsupported graph node '{node.name}' ({node.op}); {UNSUPPORTED_HINT}")
        target = node.target
        args = list(node.all_input_nodes)
        if target is operator.getitem:
            src, idx = node.args[0], node.args[1]
            alias[node] = alias[src][idx] if isinstance(alias.get(src), list) else alias.get(src)
            if src in const:
                const.add(node)
            continue
        base = _base_name(target)
        if not hasattr(target, "_schema") and not base.startswith("sym_"):
            raise UnsupportedGraphError(f"{name}: unsupported operator {target} at node '{node.name}' "
                                        f"(control flow or a Python call); {UNSUPPORTED_HINT}")
        if base.endswith("_") and not base.startswith("_"):
            raise UnsupportedGraphError(f"{name}: in-place operator {base} at node '{node.name}' is not "
                                        f"supported after functionalisation; {UNSUPPORTED_HINT}")
        vals = val if isinstance(val, (list, tuple)) else [val]
        if not all(isinstance(v, torch.Tensor) or v is None for v in vals):
            if base in FACTORY_OPS:  # symbolic sizes: metadata only
                alias[node] = None
                continue
            raise UnsupportedGraphError(f"{name}: operator {base} at node '{node.name}' returns a non-tensor "
                                        f"value; {UNSUPPORTED_HINT}")
        if base in VIEW_OPS:
            src = alias.get(args[0]) if args else None
            alias[node] = [src] * len(vals) if isinstance(val, (list, tuple)) else src
            if args and args[0] in const:
                const.add(node)
            continue
        if base in FACTORY_OPS or (args and all(a in const for a in args)) or not args:
            const.add(node)  # constant-folded: its result is stored like a weight
            names = [add_tensor(f"const.{node.name}.{i}" if len(vals) > 1 else f"const.{node.name}", v, "weight")
                     if isinstance(v, torch.Tensor) else "" for i, v in enumerate(vals)]
            alias[node] = names if isinstance(val, (list, tuple)) else names[0]
            continue
        ins = list(dict.fromkeys(n for a in args for n in _flat(alias.get(a)) if n))
        outs = [add_tensor(f"{node.name}.{i}" if len(vals) > 1 else node.name, v, "activation")
                if isinstance(v, torch.Tensor) else "" for i, v in enumerate(vals)]
        alias[node] = outs if isinstance(val, (list, tuple)) else outs[0]
        outs = [o for o in outs if o]
        if not outs:
            continue
        ops.append(OpSpec(node.name, ins, outs, type=f"aten.{base}"))
    for node in out_nodes:
        for n in _flat(alias.get(node)):
            if n and tensors[n].kind == "activation":
                tensors[n].kind = "output"
    read = {n for o in ops for n in o.inputs} | {n for n, t in tensors.items() if t.kind == "output"}
    for o in ops:  # multi-output ops (batch_norm's saved statistics ...): drop the results nobody reads
        if len(o.outputs) > 1 and any(n in read for n in o.outputs):
            o.outputs = [n for n in o.outputs if n in read]
    used = {n for o in ops for n in o.inputs + o.outputs}
    if not ops:
        raise UnsupportedGraphError(f"{name}: the traced graph has no operators that move data")
    return build_graph(name, [t for t in tensors.values() if t.name in used], ops)


def _flat(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, list) else [x]


def graph_from_name(name: str, batch: int = 1, dtype: str = "float32", input_shape: tuple[int, ...] | None = None) -> Graph:
    """torchvision/timm/built-in name or a path to a .onnx file -> Graph (no weights are allocated)."""
    if name.endswith(".onnx") or Path(name).is_file():
        from memfit.plan.onnx_graph import graph_from_onnx

        return graph_from_onnx(name, batch=batch, dtype=dtype)

    from memfit.plan.zoo import build_model

    model, x = build_model(name, batch, input_shape)
    return extract_graph(model, (x,), name=name, dtype=torch_dtype(dtype))


def torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "int8": torch.int8, "float64": torch.float64}
    if name not in table:
        raise UnsupportedGraphError(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]
