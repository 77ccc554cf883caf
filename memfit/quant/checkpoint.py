"""One safetensors file per model, with the architecture (timm name + kwargs) in its metadata.

`load_checkpoint` also reads checkpoints saved by timm / the Hugging Face hub: a `model.safetensors` with a
`config.json` beside it whose "architecture" names the timm model (and "num_classes", "model_args" its
arguments). Weights are only ever read from safetensors, never from pickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import QuantError
from .models import ModelSpec

FORMAT = "memfit.quant.vit/1"


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, spec: ModelSpec,
                    info: dict[str, Any] | None = None) -> Path:
    """Write `model`'s weights and `spec` (plus JSON `info`, e.g. training results) to one file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; clone so tied/aliased tensors become independent copies.
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "timm_name": spec.timm_name, "kwargs": json.dumps(spec.kwargs),
            "info": json.dumps(info or {})}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_spec(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, Any]]:
    """The architecture stored with a checkpoint, without loading its tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():  # timm's hub layout is a folder, but what is loaded is the weights file in it
        found = sorted(path.glob("*.safetensors"))
        which = f", e.g. {found[0]}" if found else ""
        # no option named: `quant vit --model` and `quant train-vit --teacher` both read a checkpoint here
        raise QuantError(f"checkpoint {path} is a directory; a .safetensors file is needed{which} (as "
                         "`memfit quant train-vit --out FILE` writes, or timm's model.safetensors with its "
                         "config.json beside it)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train one with `memfit quant train-vit --out {path}`")
    if path.suffix != ".safetensors":
        raise QuantError(f"{path} is not a .safetensors file; memfit loads weights only from safetensors")
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:  # a corrupt or truncated header
        raise QuantError(f"{path} is not a readable safetensors file: {exc}") from exc
    with handle as f:
        meta = f.metadata() or {}
    if meta.get("format") == FORMAT:
        return ModelSpec(meta["timm_name"], json.loads(meta["kwargs"])), json.loads(meta.get("info", "{}"))
    config = path.parent / "config.json"  # timm's hub layout
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
            raise QuantError(f"{config} (the timm config beside {path.name}) is not readable JSON: {exc}") from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_args", {}), dict):
            raise QuantError(f"{config} (the timm config beside {path.name}) must be a JSON object whose "
                             f"\"model_args\", if any, is an object")
        if "architecture" in cfg:
            kwargs = dict(cfg.get("model_args", {}))
            if "num_classes" in cfg:
                kwargs.setdefault("num_classes", cfg["num_classes"])
            return ModelSpec(cfg["architecture"], kwargs), {"source": str(config)}
    raise QuantError(
        f"{path} does not say which model it holds: it has no memfit metadata and no timm config.json beside it "
        f"with an \"architecture\" entry; save it with `memfit quant train-vit`, or put timm's config.json next to it"
    )


def load_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, ModelSpec, dict[str, Any]]:
    """(model in eval mode, its spec, the info saved with it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec, info = read_spec(path)
    model = spec.build()
    try:
        state = load_file(str(path))
    except SafetensorError as exc:  # a header that reads but tensors that do not
        raise QuantError(f"{path} is not a readable safetensors file: {exc}") from exc
    # load_state_dict(strict=False) still raises on a shape mismatch (a config.json naming a wider model than the
    # weights): say which file and which tensors instead of torch's RuntimeError
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    source = f" (from {info['source']})" if "source" in info else ""  # the config.json that named the model
    if wrong:
        raise QuantError(f"{path} does not match {spec.timm_name}{source} with {spec.kwargs}: {len(wrong)} tensors "
                         f"differ in shape, e.g. {'; '.join(wrong[:3])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise QuantError(
            f"{path} does not match {spec.timm_name}{source} with {spec.kwargs}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.eval(), spec, info
