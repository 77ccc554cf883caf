"""Real low-bit weights: every width (2, 3, 4, 6, 8) packed densely into bytes, and a runtime that unpacks.

Packing: a layer's integer codes c in -qmax..qmax are offset to u = c + qmax in 0..2^b - 2 and written as a
little-endian bit stream, b bits per weight, so n weights take ceil(n b / 8) bytes whatever b is (3- and
6-bit codes straddle byte boundaries). The per-output-channel scales are stored beside them as float32.

`PackedLayer` holds only the packed bytes and the scales (plus the bias and the activation quantizers) and
dequantizes the weight on each call, so the model's weight memory is what its tensors occupy: `weight_bytes`
is measured from them. `save_packed` writes one safetensors file: `<layer>.qweight` (uint8), `<layer>.scale`
(float32), every other tensor of the reparameterised model in float32, and the bits, shapes and activation
quantizer parameters in the metadata.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .qmodel import QuantLayer, SoftmaxQuant
from .quantizers import UniformParams, weight_qmax

# /2 records each attention's softmax quantizer (`softmax_kind`); /1 files (before log-sqrt(2)) read as log2.
# A reader refuses versions it does not know rather than decode a quantizer it does not have.
FORMAT = "memfit.quant.packed/2"
READABLE_FORMATS = ("memfit.quant.packed/1", FORMAT)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (any shape, values in -qmax..qmax) -> uint8 (ceil(n * bits / 8),)."""
    u = (codes.reshape(-1).to(torch.int32) + weight_qmax(bits)).to(torch.uint8)  # (n,) in 0..2^b - 2
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((u[:, None] >> shifts) & 1).reshape(-1)  # (n * b,) bits, least significant first
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)  # disjoint bits: the sum is an OR


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_codes: uint8 bytes -> int8 codes of `shape`."""
    n = 1
    for d in shape:
        n *= d
    stream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: n * bits]
    u = (stream.reshape(n, bits).to(torch.int32) << torch.arange(bits, dtype=torch.int32)).sum(1)
    return (u - weight_qmax(bits)).to(torch.int8).reshape(shape)


class PackedLayer(nn.Module):
    """A Linear or Conv2d whose weight lives as packed low-bit codes plus per-channel scales."""

    def __init__(self, kind: str, shape: tuple[int, ...], bits: int, packed: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, act: UniformParams | None, out: UniformParams | None,
                 conv: dict[str, Any] | None = None):
        super().__init__()
        self.kind, self.shape, self.bits, self.conv = kind, tuple(shape), bits, conv or {}
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act, self.out = act, out

    def weight(self) -> torch.Tensor:
        codes = unpack_codes(self.packed, self.bits, self.shape)
        return codes.float() * self.scale.view((-1,) + (1,) * (len(self.shape) - 1))

    def weight_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale.numel() * self.scale.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .quantizers import fake_quant_uniform

        if self.act is not None:
            x = fake_quant_uniform(x, self.act)
        if self.kind == "conv2d":
            y = F.conv2d(x, self.weight(), self.bias, **self.conv)
        else:
            y = F.linear(x, self.weight(), self.bias)
        return fake_quant_uniform(y, self.out) if self.out is not None else y


def _packed_from(q: QuantLayer) -> PackedLayer:
    layer = q.layer
    conv = None
    kind = "linear"
    if isinstance(layer, nn.Conv2d):
        kind = "conv2d"
        conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    return PackedLayer(kind, tuple(q.codes.shape), q.weight_bits, pack_codes(q.codes, q.weight_bits), q.scale,
                       layer.bias, q.act, q.out, conv)


def to_packed(qmodel: nn.Module) -> nn.Module:
    """A copy of a quantize_model() result with every QuantLayer replaced by its PackedLayer."""
    packed = copy.deepcopy(qmodel)
    for name, module in list(packed.named_modules()):
        if isinstance(module, QuantLayer):
            parent, _, child = name.rpartition(".")
            setattr(packed.get_submodule(parent) if parent else packed, child, _packed_from(module))
    return packed


def weight_bytes(model: nn.Module) -> int:
    """Bytes the packed layers' weights occupy (packed codes + scales), read off their tensors."""
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, PackedLayer))


def _params_json(p: UniformParams | None) -> Any:
    return None if p is None else {"scale": p.scale.tolist(), "zero": p.zero.tolist(), "bits": p.bits}


def save_packed(path: str | os.PathLike, packed: nn.Module, spec, info: dict[str, Any] | None = None) -> Path:
    """One safetensors file with the packed layers and every other tensor of the model (float32)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, m in packed.named_modules():
        if isinstance(m, PackedLayer):
            tensors[f"{name}.qweight"] = m.packed.contiguous()
            tensors[f"{name}.scale"] = m.scale.contiguous()
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.contiguous()
            layers[name] = {"kind": m.kind, "shape": list(m.shape), "bits": m.bits, "conv": m.conv,
                            "act": _params_json(m.act), "out": _params_json(m.out)}
    for key, value in packed.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner not in layers and key not in tensors:
            tensors[key] = value.detach().float().contiguous().clone()
    softmax = {n.rsplit(".", 1)[0]: m.bits for n, m in packed.named_modules() if isinstance(m, SoftmaxQuant)}
    kinds = {n.rsplit(".", 1)[0]: m.kind for n, m in packed.named_modules() if isinstance(m, SoftmaxQuant)}
    meta = {"format": FORMAT, "timm_name": spec.timm_name, "kwargs": json.dumps(spec.kwargs),
            "layers": json.dumps(layers), "softmax_bits": json.dumps(softmax), "softmax_kind": json.dumps(kinds),
            "info": json.dumps(info or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_packed(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """(runtime model with PackedLayers, info) from a save_packed file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models import ModelSpec

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    fmt = meta.get("format", "")
    if fmt not in READABLE_FORMATS:
        if fmt.startswith("memfit.quant.packed/"):
            raise ValueError(f"{path} is a packed model of format {fmt}, which this memfit cannot read (it reads "
                             f"{', '.join(READABLE_FORMATS)}); upgrade memfit")
        raise ValueError(f"{path} is not a packed memfit.quant model; write one with `memfit quant export`")
    spec = ModelSpec(meta["timm_name"], json.loads(meta["kwargs"]))
    model = spec.build().eval()
    tensors = load_file(str(path))
    layers = json.loads(meta["layers"])

    def params(d):
        return None if d is None else UniformParams(torch.tensor(d["scale"]), torch.tensor(d["zero"]), d["bits"])

    for name, d in layers.items():
        layer = PackedLayer(d["kind"], tuple(d["shape"]), d["bits"], tensors.pop(f"{name}.qweight"),
                            tensors.pop(f"{name}.scale"), tensors.pop(f"{name}.bias", None), params(d["act"]),
                            params(d["out"]), {k: tuple(v) if isinstance(v, list) else v for k, v in d["conv"].items()})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    kinds = json.loads(meta.get("softmax_kind", "{}"))  # files written before log-sqrt(2) used log2
    for attn_name, bits in json.loads(meta["softmax_bits"]).items():
        attn = model.get_submodule(attn_name)
        attn.fused_attn = False
        attn.attn_drop = SoftmaxQuant(bits, kinds.get(attn_name, "log2"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(("qweight", "scale", "bias"))]
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]}")
    return model.eval(), json.loads(meta["info"])
