"""Activation quantizers grouped by the width that sets them, for allocating activation bits.

`quantize_model` gives every quantizable layer l one activation width a_l, and that width sets:
- the quantizer of l's input (per tensor; for the inputs of qkv / fc1 / reduction read from a LayerNorm, the
  clipped channel-wise quantizer folded into the LayerNorm, i.e. per-channel codes of the LayerNorm output);
- for an attention's qkv layer also q, k, v (its output, per tensor) and the post-softmax attention
  probabilities (log2 below 4 bits, log-sqrt(2) from 4: `qmodel.softmax_kind("auto", a)`).
So the allocator's unit is this group: its size is the elements per image of all its quantized tensors (the
activation-bit average is weighted by them), and its distortion at b bits is the sum over the group's tensors of
the relative squared error ||Q_b(t) - t||^2 / ||t||^2 -- to first order, independent relative errors of
successive stages add. The distortions are measured on the FP model (the folded one computes the same
function), each tensor quantized as `quantize_model` quantizes it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lrp import quantizable_layers
from .qmodel import best_tensor_params, ln_consumers, record, softmax_kind
from .quantizers import BIT_CHOICES, UniformParams, fake_quant_log, fake_quant_uniform, percentile_range, uniform_params

LN_PERCENTILE = 99.9  # QuantConfig.ln_percentile's default, the clipping `quantize_model` folds in


@dataclass
class ActGroups:
    sizes: dict[str, int]  # layer -> elements per image quantized at its activation width (all its tensors)
    dist: dict[str, dict[int, float]]  # layer -> width -> summed relative squared error of its tensors


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    """qkv layer name -> the attention module whose q/k/v and softmax its activation width sets."""
    modules = dict(model.named_modules())
    return {n: modules[n.rpartition(".")[0]] for n in quantizable_layers(model)
            if n.endswith("attn.qkv") and hasattr(modules[n.rpartition(".")[0]], "attn_drop")}


@contextmanager
def explicit_attention(model: nn.Module):
    """timm's unfused attention path, where the softmax output passes through attn_drop (B, heads, T, T)."""
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    for m in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in fused.items():
            m.fused_attn = flag


@torch.no_grad()
def record_probs(model: nn.Module, x: torch.Tensor, qkv_names: list[str]) -> dict[str, torch.Tensor]:
    """Post-softmax attention probabilities (B, heads, T, T) of each qkv layer's attention, over images x."""
    attn = attentions(model)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in qkv_names}
    handles = [attn[n].attn_drop.register_forward_hook(lambda _m, _a, out, n=n: seen[n].append(out.detach()))
               for n in qkv_names]
    try:
        with explicit_attention(model):
            for i in range(0, len(x), 64):
                model(x[i:i + 64])
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def _rel(q: torch.Tensor, t: torch.Tensor) -> float:
    return float((q - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30))


def input_ranges(model: nn.Module, x: torch.Tensor, channelwise: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel clipped (lo, hi) of each post-LayerNorm input, as quantize_model folds them (channelwise only)."""
    if not channelwise:
        return {}
    pairs = ln_consumers(model)
    out = record(model, x, list(pairs), outputs=True)
    return {c: percentile_range(out[norm], LN_PERCENTILE, per_channel=True)
            for norm, consumers in pairs.items() for c in consumers}


def input_params(act: torch.Tensor, bits: int, ranges: tuple | None) -> UniformParams:
    return uniform_params(*ranges, bits) if ranges is not None else best_tensor_params(act, bits)


def group_sizes(model: nn.Module, x1: torch.Tensor) -> dict[str, int]:
    """Elements per image each layer's activation width quantizes, from one image x1 (1, C, H, W)."""
    layers = list(quantizable_layers(model))
    sizes = {n: t.numel() for n, t in record(model, x1, layers).items()}
    qkv = list(attentions(model))
    outs = record(model, x1, qkv, outputs=True)
    probs = record_probs(model, x1, qkv)
    for n in qkv:
        sizes[n] += outs[n].numel() + probs[n].numel()
    return sizes


@torch.no_grad()
def act_groups(model: nn.Module, x: torch.Tensor, names: list[str], channelwise: bool = True) -> ActGroups:
    """Sizes and distortions of the activation groups of `names` on the FP `model`, over images x."""
    model.eval()
    ranges = input_ranges(model, x, channelwise)
    inputs = record(model, x, names)
    qkv = [n for n in attentions(model) if n in names]
    outs, probs = record(model, x, qkv, outputs=True), record_probs(model, x, qkv)
    dist = {}
    for n in names:
        dist[n] = {}
        for b in BIT_CHOICES:
            a = inputs[n]
            d = _rel(fake_quant_uniform(a, input_params(a, b, ranges.get(n))), a)
            if n in outs:
                d += _rel(fake_quant_uniform(outs[n], best_tensor_params(outs[n], b)), outs[n])
                d += _rel(fake_quant_log(probs[n], b, softmax_kind("auto", b)), probs[n])
            dist[n][b] = d
    return ActGroups(group_sizes(model, x[:1]), dist)


@contextmanager
def quantized_group(model: nn.Module, name: str, bits: int, calib: dict):
    """`model` with only layer `name`'s activation group quantized at `bits` (params from `calib`, see
    group_sensitivity): its input, and for a qkv layer its output and the softmax probabilities."""
    layer = quantizable_layers(model)[name]
    p_in = input_params(calib["inputs"][name], bits, calib["ranges"].get(name))
    handles = [layer.register_forward_pre_hook(lambda _m, a: (fake_quant_uniform(a[0], p_in),))]
    attn = attentions(model).get(name)
    if attn is not None:
        p_out = best_tensor_params(calib["outs"][name], bits)
        kind = softmax_kind("auto", bits)
        handles.append(layer.register_forward_hook(lambda _m, _a, out: fake_quant_uniform(out, p_out)))
        handles.append(attn.attn_drop.register_forward_hook(lambda _m, _a, out: fake_quant_log(out, bits, kind)))
    try:
        with explicit_attention(model):
            yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def group_sensitivity(model: nn.Module, x: torch.Tensor, names: list[str],
                      channelwise: bool = True) -> dict[str, dict[int, float]]:
    """KL(fp || model with only one layer's activation group at b bits) on images x, every layer and width."""
    model.eval()
    ref = F.log_softmax(model(x), -1)
    qkv = [n for n in attentions(model) if n in names]
    calib = {"ranges": input_ranges(model, x, channelwise), "inputs": record(model, x, names),
             "outs": record(model, x, qkv, outputs=True)}
    costs: dict[str, dict[int, float]] = {}
    for n in names:
        costs[n] = {}
        for b in BIT_CHOICES:
            with quantized_group(model, n, b, calib):
                logp = F.log_softmax(model(x), -1)
            costs[n][b] = float(F.kl_div(logp, ref, log_target=True, reduction="batchmean"))
    return costs
