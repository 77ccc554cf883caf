"""ONNX file -> memfit Graph, using ONNX shape inference (no weights are read into torch).

Initializers and Constant nodes are weights; Reshape/Flatten/Squeeze/Unsqueeze/Identity/Dropout alias their
first input (they move no data). A symbolic batch dimension (dim 0) takes `batch`; any other unknown dimension
is an error, since the bytes would be unknown.
"""
from __future__ import annotations

from pathlib import Path

from memfit.plan.errors import UnsupportedGraphError
from memfit.plan.plan_format import Graph, OpSpec, TensorSpec, build_graph

ALIAS_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
_FLOAT_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "fp32": 4, "fp16": 2, "bf16": 2}


def graph_from_onnx(path: str | Path, batch: int = 1, dtype: str = "float32") -> Graph:
    import onnx
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    path = Path(path)
    if not path.is_file():
        raise UnsupportedGraphError(f"ONNX file {path} does not exist")
    if dtype not in _FLOAT_SIZES:
        raise UnsupportedGraphError(f"unknown dtype {dtype!r}; choose one of {', '.join(_FLOAT_SIZES)}")
    try:
        model = shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    except Exception as exc:  # noqa: BLE001 - onnx raises many types
        raise UnsupportedGraphError(f"cannot read {path} as ONNX: {exc}") from None
    g = model.graph
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

    def nbytes(elem_type: int, dims: list[int]) -> int:
        n = 1
        for d in dims:
            n *= d
        size = _FLOAT_SIZES[dtype] if elem_type in float_types else helper.tensor_dtype_to_np_dtype(elem_type).itemsize
        return n * size

    def value_bytes(vi, what: str) -> int | None:
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or tt.elem_type == 0:
            return None  # shape inference could not type it
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif i == 0:
                dims.append(batch)
            else:
                raise UnsupportedGraphError(f"{path.name}: {what} '{vi.name}' has unknown dimension {i}; "
                                            f"fix the shape in the ONNX file")
        return nbytes(tt.elem_type, dims)

    tensors: dict[str, TensorSpec] = {}
    alias: dict[str, str] = {}
    for init in g.initializer:
        tensors[init.name] = TensorSpec(init.name, nbytes(init.data_type, list(init.dims)), "weight")
    for vi in g.input:
        if vi.name not in tensors:
            b = value_bytes(vi, "input")
            if b is None:
                raise UnsupportedGraphError(f"{path.name}: graph input '{vi.name}' has no tensor shape")
            tensors[vi.name] = TensorSpec(vi.name, b, "input")
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    ops: list[OpSpec] = []
    for k, node in enumerate(g.node):
        name = node.name or f"{node.op_type}_{k}"
        if node.op_type == "Constant":
            arr = numpy_helper.to_array(node.attribute[0].t) if node.attribute and node.attribute[0].t else None
            size = int(arr.nbytes) if arr is not None else 0
            if size:
                tensors[node.output[0]] = TensorSpec(node.output[0], size, "weight")
            continue
        if node.op_type in ALIAS_OPS:
            src = node.input[0]
            for out in node.output[:1]:
                alias[out] = alias.get(src, src)
            continue
        ins = list(dict.fromkeys(alias.get(i, i) for i in node.input if i))
        outs = []
        for out in node.output:
            if not out:
                continue
            b = value_bytes(infos[out], "tensor") if out in infos else None
            if b is None:
                raise UnsupportedGraphError(f"{path.name}: unsupported op {node.op_type} "
                                            f"(domain {node.domain or 'ai.onnx'}) at '{name}': cannot infer the "
                                            f"shape of its output '{out}'")
            if b:
                tensors[out] = TensorSpec(out, b, "activation")
                outs.append(out)
        for i in ins:
            if i not in tensors:
                raise UnsupportedGraphError(f"{path.name}: op '{name}' reads '{i}', which no node produces")
        if outs:
            ops.append(OpSpec(name, ins, outs, type=f"onnx.{node.op_type}"))
    for vi in g.output:
        n = alias.get(vi.name, vi.name)
        if n in tensors and tensors[n].kind == "activation":
            tensors[n].kind = "output"
    if not ops:
        raise UnsupportedGraphError(f"{path.name}: the graph has no operators that move data")
    used = {n for o in ops for n in o.inputs + o.outputs}
    return build_graph(g.name or path.stem, [t for n, t in tensors.items() if n in used], ops)
