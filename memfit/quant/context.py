"""In-context damage: what moving one layer's weights, or its activation group, a width away from a baseline
allocation costs, with every other layer quantized at the baseline (Mix-QViT's sensitivity protocol: each layer
quantized at several widths "while keeping other layers at a baseline"; the `sensitivity` allocator instead keeps
the others in FP32).

`quantize_model` calibrates every quantizer on the FP model's activations, so a layer's quantizers at width b do
not depend on the other layers' widths; and the folded weights W diag(r1) it rounds do not depend on the
activation width (r1 is a ratio of per-channel ranges). So one quantized copy per width holds every layer's
quantizers at that width, and any allocation is assembled from those copies by moving modules (`compose`),
without calibrating again: a forward pass per move instead of a calibration and a forward pass.

A layer's activation side is its QuantLayer (input and, for qkv, q/k/v params; the bias, into which the
channel-wise fold puts the zero-point shift), the LayerNorm it reads when channel-wise (its folded affine), and
for qkv the post-softmax quantizer; its weight side is the QuantLayer's rounded weight, codes and scales.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .lrp import quantizable_layers
from .qmodel import QuantConfig, QuantLayer, ln_consumers, quantize_model


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _reads(q: nn.Module) -> dict[str, str]:
    """QuantLayer name -> the LayerNorm it reads (qmodel.ln_consumers on the model the copy was made from: the
    same names, with each QuantLayer standing for the Linear it wraps)."""
    plain = copy.deepcopy(q)
    for name, m in list(plain.named_modules()):
        if isinstance(m, QuantLayer):
            _set(plain, name, m.layer)
    return {c: norm for norm, cs in ln_consumers(plain).items() for c in cs}


@torch.no_grad()
def compose(copies: dict[int, nn.Module], weight_bits: dict[str, int], act_bits: dict[str, int],
            channelwise: bool = True) -> nn.Module:
    """The quantized model of (weight_bits, act_bits) assembled from `copies` (width -> quantize_model's copy with
    every free layer's weights and activations at that width, the fixed layers alike in all). Equals
    quantize_model(model, calib, QuantConfig(weight_bits, act_bits, channelwise)) on the same calibration images."""
    any_copy = next(iter(copies.values()))
    out = copy.deepcopy(any_copy)
    layers = [n for n, m in any_copy.named_modules() if isinstance(m, QuantLayer)]
    reads = _reads(any_copy) if channelwise else {}
    for name in layers:
        a, w = act_bits[name], weight_bits[name]
        held = any_copy.get_submodule(name)
        if held.weight_bits == w and held.act is not None and held.act.bits == a and \
                all(c.get_submodule(name).weight_bits == w for c in copies.values()):
            continue  # a fixed layer, the same in every copy
        if a not in copies or w not in copies:
            raise KeyError(f"{name}: no quantized copy at {a if a not in copies else w} bits")
        src = copies[a].get_submodule(name)  # QuantLayer
        if not isinstance(src, QuantLayer):
            raise TypeError(f"{name} is not a QuantLayer in the copies; build them with quantize_model")
        q = copy.deepcopy(src)
        wsrc = copies[w].get_submodule(name)
        q.layer.weight.copy_(wsrc.layer.weight)
        q.codes, q.scale, q.weight_bits = wsrc.codes.clone(), wsrc.scale.clone(), wsrc.weight_bits
        _set(out, name, q)
        if name in reads:
            _set(out, reads[name], copy.deepcopy(copies[a].get_submodule(reads[name])))
        if name.endswith("attn.qkv"):
            attn = name.rpartition(".")[0]
            if hasattr(copies[a].get_submodule(attn), "attn_drop"):
                _set(out, f"{attn}.attn_drop", copy.deepcopy(copies[a].get_submodule(f"{attn}.attn_drop")))
    return out


@torch.no_grad()
def context_damage(model: nn.Module, calib_x: torch.Tensor, base_weights: dict[str, int], base_acts: dict[str, int],
                   weight_widths: tuple[int, ...], act_widths: tuple[int, ...] = (), x: torch.Tensor | None = None,
                   channelwise: bool = True, fixed_bits: int = 8) -> dict[str, dict[str, dict[int, float]]]:
    """{"weights"|"acts": {layer: {b: KL(fp || baseline with that one part at b bits) - KL(fp || baseline)}}} on
    images x (default calib_x), the quantizers calibrated on calib_x. The baseline gives every free layer (the keys
    of base_weights) base_weights[l]-bit weights and base_acts[l]-bit activations, the others `fixed_bits`; each
    layer's weights move to every width in `weight_widths`, its activation group to every one in `act_widths`
    (none: no activation moves). A move to the baseline's own width costs 0."""
    model.eval()
    x = calib_x if x is None else x
    layers = quantizable_layers(model)
    free = list(base_weights)
    need = sorted(set(weight_widths) | set(act_widths) | set(base_weights.values()) | set(base_acts.values()))
    copies = {}
    for b in need:
        bits = {l: (b if l in base_weights else fixed_bits) for l in layers}
        copies[b] = quantize_model(model, calib_x, QuantConfig(bits, bits, channelwise))
    wb0 = {l: base_weights.get(l, fixed_bits) for l in layers}
    ab0 = {l: base_acts.get(l, fixed_bits) for l in layers}
    ref = F.log_softmax(model(x), -1)

    def kl(m: nn.Module) -> float:
        return float(F.kl_div(F.log_softmax(m(x), -1), ref, log_target=True, reduction="batchmean"))

    k0 = kl(compose(copies, wb0, ab0, channelwise))
    out: dict[str, dict[str, dict[int, float]]] = {"weights": {}, "acts": {}}
    for kind, widths, base in (("weights", weight_widths, wb0), ("acts", act_widths, ab0)):
        if not widths:
            continue
        for l in free:
            out[kind][l] = {}
            for b in widths:
                if b == base[l]:
                    out[kind][l][b] = 0.0
                    continue
                moved = dict(base, **{l: b})
                m = compose(copies, moved, ab0, channelwise) if kind == "weights" else \
                    compose(copies, wb0, moved, channelwise)
                out[kind][l][b] = kl(m) - k0
    return out
