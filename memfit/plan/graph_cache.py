"""Extracted graphs kept in the user's cache: torch.export of a large network (NASNet: minutes) runs once.

    ~/.cache/memfit/plan/graphs/<name>_b<batch>_<dtype>[_<shape>]-<versions hash>.json   (memfit.plan/v1 graph)

The key includes the torch, torchvision and timm versions, since a new release can trace a model differently.
MEMFIT_CACHE overrides ~/.cache/memfit.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from memfit.plan.plan_format import Graph, build_graph


def cache_dir() -> Path:
    root = Path(os.environ.get("MEMFIT_CACHE", Path.home() / ".cache" / "memfit"))
    return root / "plan" / "graphs"


def _versions() -> str:
    import torch
    import torchvision

    try:
        import timm

        tv = timm.__version__
    except ImportError:
        tv = "none"
    return hashlib.sha1(f"{torch.__version__}|{torchvision.__version__}|{tv}".encode()).hexdigest()[:10]


def cached_graph(name: str, batch: int = 1, dtype: str = "float32",
                 input_shape: tuple[int, ...] | None = None) -> Graph:
    """graph_from_name, read from the cache when this (name, batch, dtype, shape, versions) was seen before."""
    from memfit.plan.graph import graph_from_name

    if name.endswith(".onnx") or Path(name).is_file():
        return graph_from_name(name, batch=batch, dtype=dtype, input_shape=input_shape)
    shape = "_" + "x".join(map(str, input_shape)) if input_shape else ""
    path = cache_dir() / f"{name}_b{batch}_{dtype}{shape}-{_versions()}.json"
    if path.is_file():
        d = json.loads(path.read_text())
        g = Graph.from_dict(d)
        return build_graph(g.model, g.tensors, g.ops)
    g = graph_from_name(name, batch=batch, dtype=dtype, input_shape=input_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(g.to_dict()))
    tmp.replace(path)  # atomic: a killed run never leaves half a file behind
    return g
