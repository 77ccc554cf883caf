"""RepQ-ViT's scale reparameterisation of post-LayerNorm activations.

Post-LayerNorm activations x (..., C) have a few outlier channels, so they are quantized channel-wise:
scale s_c and zero point z_c per channel. Hardware wants one scale per tensor, so the per-channel ranges are
folded into the LayerNorm's affine and the next linear layer (RepQ-ViT, Li et al., ICCV'23):

    s~ = mean(s), z~ = round(mean(z)), r1 = s / s~, r2 = z - z~          (all (C,))
    LayerNorm:  gamma' = gamma / r1,  beta' = (beta + s * r2) / r1     ->  x~ = (x + s*r2) / r1
    next Linear: W' = W diag(r1),     b' = b - W (s * r2)              ->  W' x~ + b' = W x + b

Before quantization the network computes exactly the same function; and quantizing x~ per tensor with
(s~, z~) gives exactly the per-channel codes of x: x~/s~ + z~ = x/s + z.
"""
from __future__ import annotations

import torch
from torch import nn

from .quantizers import UniformParams


@torch.no_grad()
def reparameterize(norm: nn.LayerNorm, consumers: list[nn.Linear], channel: UniformParams) -> UniformParams:
    """Fold per-channel `channel` params (scale, zero of shape (C,)) into `norm` and every Linear reading its
    output, in place; return the per-tensor params for the new activation."""
    if norm.weight is None or norm.bias is None:
        raise ValueError("reparameterisation needs a LayerNorm with an elementwise affine (weight and bias)")
    s, z = channel.scale.float(), channel.zero.float()  # (C,)
    s_t = s.mean()
    z_t = torch.round(z.mean())
    r1 = s / s_t  # (C,)
    r2 = z - z_t  # (C,), integer-valued
    shift = s * r2  # (C,)
    for lin in consumers:
        w = lin.weight.float()  # (O, C)
        fold = w @ shift  # (O,): W (s * r2), with the original W
        lin.weight.copy_((w * r1[None, :]).to(lin.weight.dtype))
        if lin.bias is None:
            lin.bias = nn.Parameter(-fold.to(lin.weight.dtype))
        else:
            lin.bias.sub_(fold.to(lin.bias.dtype))
    norm.bias.copy_(((norm.bias.float() + shift) / r1).to(norm.bias.dtype))
    norm.weight.copy_((norm.weight.float() / r1).to(norm.weight.dtype))
    return UniformParams(s_t, z_t, channel.bits)
