"""Fake quantizers (quantize then dequantize, in float) for weights and activations.

- Weights: symmetric, one scale per output channel (row of a Linear, filter of a Conv), integer levels
  -qmax..qmax with qmax = 2^(b-1) - 1 (so 2 bits is ternary). The clipping range of each channel is searched
  on a grid for the smallest squared error, the usual PTQ choice; min-max is the grid's first point.
- Activations: asymmetric uniform, one scale and zero point per tensor (or per channel, for post-LayerNorm
  activations before they are reparameterised, see reparam.py), ranges from calibration percentiles.
- Post-softmax attention: a log quantizer (attention probabilities are <= 1 and crowd near 0, where a log
  grid spends its levels): log-sqrt(2), x ~ 2^(-q/2) with q in 0..2^b - 1 (RepQ-ViT's choice, the default),
  or log2, x ~ 2^-q. Half-octave steps halve the rounding error of the large probabilities that carry the
  attention, at the price of flushing values below 2^-(2^b/2) to 0 (b = 4: below 2^-8).
The integer codes are what export packs; `fake` returns what the simulated model computes with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BIT_CHOICES = (2, 3, 4, 6, 8)
# Fractions of max|w| tried per channel (1.0 = min-max). The floor 0.5 binds at 2 bits (90% of the ternary rows
# of the 25-epoch Fashion-MNIST ViT stop there), but going lower is worse: a grid down to 0.2 cut the 2-bit
# weight error by 10% yet, with lrp's W4 bits, cost 1.3-1.4 points of top-1 on weights alone against 0.56
# (3 calibration seeds, docs/quant.md) -- the error-optimal ternary threshold zeroes too many weights.
_CLIP_GRID = torch.linspace(1.0, 0.5, 11)


def check_bits(bits: int) -> int:
    if bits not in BIT_CHOICES:
        raise ValueError(f"bit width {bits} is not supported; choose from {', '.join(map(str, BIT_CHOICES))}")
    return bits


# ---------------------------------------------------------------- weights: symmetric per output channel
def weight_qmax(bits: int) -> int:
    return 2 ** (check_bits(bits) - 1) - 1


def weight_scales(w: torch.Tensor, bits: int, search: bool = True) -> torch.Tensor:
    """Per-output-channel scales (O,) for weights w (O, ...) minimising each channel's squared error."""
    qmax = weight_qmax(bits)
    rows = w.detach().reshape(w.shape[0], -1).float()  # (O, I)
    amax = rows.abs().amax(dim=1).clamp_min(1e-12)  # (O,)
    if not search:
        return amax / qmax
    best_scale, best_err = amax / qmax, None
    for frac in _CLIP_GRID:
        scale = amax * frac / qmax  # (O,)
        deq = torch.clamp(torch.round(rows / scale[:, None]), -qmax, qmax) * scale[:, None]
        err = (deq - rows).pow(2).sum(dim=1)  # (O,)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return best_scale


def quantize_weight(w: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes in -qmax..qmax as int8, per-channel scale (O,) float32)."""
    qmax = weight_qmax(bits)
    scale = weight_scales(w, bits) if scale is None else scale
    shape = (-1,) + (1,) * (w.dim() - 1)
    codes = torch.clamp(torch.round(w.detach().float() / scale.view(shape)), -qmax, qmax).to(torch.int8)
    return codes, scale.float()


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scale = quantize_weight(w, bits)
    return (codes.float() * scale.view((-1,) + (1,) * (w.dim() - 1))).to(w.dtype)


# ---------------------------------------------------------------- activations: asymmetric uniform
@dataclass
class UniformParams:
    scale: torch.Tensor  # () per tensor, or (C,) per channel (last dim)
    zero: torch.Tensor  # same shape, integer-valued float
    bits: int

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> UniformParams:
    """Scale and integer zero point so that [lo, hi] (which must contain 0 after widening) maps to 0..2^b-1."""
    check_bits(bits)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return UniformParams(scale, zero, bits)


def fake_quant_uniform(x: torch.Tensor, p: UniformParams) -> torch.Tensor:
    """Quantize-dequantize x with per-tensor or last-dim per-channel params."""
    q = torch.clamp(torch.round(x / p.scale) + p.zero, 0, p.qmax)
    return (q - p.zero) * p.scale


def percentile_range(x: torch.Tensor, percentile: float, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped range: the (100-p)th and pth percentiles of x, over everything or per last-dim channel.

    x: (..., C) activations from calibration. Percentile 100 is min-max.
    """
    flat = x.detach().float().reshape(-1, x.shape[-1]) if per_channel else x.detach().float().reshape(-1, 1)
    if flat.shape[0] > 200_000:  # quantiles of a strided sample: torch.quantile caps its input size
        flat = flat[:: flat.shape[0] // 200_000 + 1]
    q = torch.tensor([1 - percentile / 100, percentile / 100])
    lo, hi = torch.quantile(flat, q, dim=0)  # (C,) each
    return (lo, hi) if per_channel else (lo.squeeze(0), hi.squeeze(0))


# ---------------------------------------------------------------- post-softmax: log2 and log-sqrt(2)
SOFTMAX_QUANTIZERS = ("log_sqrt2", "log2")


def fake_quant_log(x: torch.Tensor, bits: int, kind: str = "log_sqrt2") -> torch.Tensor:
    """x in [0, 1] (attention probabilities) -> 2^(-q/k) with q = round(-k log2 x) in 0..2^b-1, k = 2 for
    log_sqrt2 and 1 for log2 (rounding in the log domain); smaller values -> 0."""
    if kind not in SOFTMAX_QUANTIZERS:
        raise ValueError(f"unknown softmax quantizer {kind!r}; choose {', '.join(SOFTMAX_QUANTIZERS)}")
    steps = 2.0 if kind == "log_sqrt2" else 1.0  # levels per octave
    levels = 2 ** check_bits(bits)
    q = torch.round(-steps * torch.log2(x.clamp_min(1e-30)))
    deq = torch.pow(2.0, -q.clamp(0, levels - 1) / steps)
    return torch.where(q >= levels, torch.zeros_like(x), deq).to(x.dtype)


def fake_quant_log2(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The log2 quantizer: x -> 2^-q, q = round(-log2 x) in 0..2^b-1."""
    return fake_quant_log(x, bits, "log2")
