import copy

import pytest
import torch

from memfit.quant.models import default_spec
from memfit.quant.quantizers import (BIT_CHOICES, fake_quant_log, fake_quant_log2, fake_quant_uniform,
                                     fake_quant_weight, percentile_range, quantize_weight, uniform_params,
                                     weight_qmax, weight_scales)
from memfit.quant.reparam import reparameterize


@pytest.mark.parametrize("bits", BIT_CHOICES)
def test_weight_codes_per_channel(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-2, 1, 16)[:, None]  # rows on very different scales
    codes, scale = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() <= qmax and scale.shape == (16,)
    for row in range(16):  # at most 2^b - 1 symmetric levels per row, scale tracks each row's magnitude
        assert len(codes[row].unique()) <= 2 * qmax + 1
    deq = codes.float() * scale[:, None]
    rel = ((deq - w).norm(dim=1) / w.norm(dim=1))
    assert rel.max() < {2: 0.8, 3: 0.45, 4: 0.2, 6: 0.05, 8: 0.012}[bits]


def test_weight_clip_search_beats_min_max():
    torch.manual_seed(1)
    w = torch.randn(8, 256)
    w[:, 0] = 8.0  # one outlier per row: min-max wastes range on it
    searched = weight_scales(w, 3)
    minmax = weight_scales(w, 3, search=False)
    qmax = weight_qmax(3)

    def err(scale):
        return ((torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax) * scale[:, None] - w) ** 2).sum()

    assert err(searched) < 0.8 * err(minmax)


def test_log_sqrt2_softmax_quantizer():
    """log-sqrt(2): levels are half-octave powers of two, 2^b of them, smaller values flush to 0; it rounds the
    large probabilities twice as finely as log2."""
    torch.manual_seed(6)
    probs = torch.softmax(torch.randn(8, 50, 50) * 3, dim=-1)
    q = fake_quant_log(probs, 4, "log_sqrt2")
    nz = q[q > 0]
    assert torch.allclose(2 * torch.log2(nz), torch.round(2 * torch.log2(nz)), atol=1e-4)
    assert len(q.unique()) <= 2 ** 4 + 1  # 16 levels and zero
    assert (q[probs < 2 ** -8.25] == 0).all() and (q[probs > 2 ** -7.25] > 0).all()  # q = 0..15 -> down to 2^-7.5
    big = probs > 0.05
    assert ((q[big] / probs[big]).log2().abs() <= 0.25 + 1e-5).all()  # half a half-octave step
    err_sqrt2 = (q - probs)[big].pow(2).sum()
    err_log2 = (fake_quant_log2(probs, 4) - probs)[big].pow(2).sum()
    assert err_sqrt2 < 0.5 * err_log2
    with pytest.raises(ValueError, match="log_sqrt2"):
        fake_quant_log(probs, 4, "log3")


def test_error_falls_with_bits():
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    errors = [float((fake_quant_weight(w, b) - w).pow(2).mean()) for b in BIT_CHOICES]
    assert errors == sorted(errors, reverse=True)


def test_uniform_per_tensor_and_log2():
    x = torch.linspace(-1, 3, 1001)
    p = uniform_params(*percentile_range(x, 100.0), 4)
    y = fake_quant_uniform(x, p)
    assert len(y.unique()) <= 16
    assert (y - x).abs().max() <= p.scale / 2 + 1e-6  # within half a step inside the range
    probs = torch.softmax(torch.randn(4, 50) * 3, dim=-1)
    q = fake_quant_log2(probs, 3)
    nz = q[q > 0]
    assert torch.allclose(torch.log2(nz), torch.round(torch.log2(nz)))  # powers of two
    assert (q[probs < 2 ** -8] == 0).all()  # 3 bits: exponents 0..7, smaller values flush to zero
    big = probs > 2 ** -7
    assert ((q[big] / probs[big]).log2().abs() <= 0.5 + 1e-5).all()  # rounding in the log domain


def test_reparameterisation_exact_on_timm_block():
    """RepQ-ViT folding changes nothing before quantization, on a real timm ViT block, and per-tensor
    quantization of the reparameterised activation equals channel-wise quantization of the original one."""
    torch.manual_seed(3)
    model = default_spec("vit", tiny=True).build().eval()
    block = model.blocks[0]
    with torch.no_grad():  # give the LayerNorm a non-trivial affine and outlier channels
        block.norm1.weight.mul_(torch.rand(32) * 4 + 0.1)
        block.norm1.bias.add_(torch.randn(32))
        block.norm1.weight[:3] *= 20
    x = torch.randn(4, 17, 32)  # (B, tokens, C)
    with torch.no_grad():
        ref = block(x)
        ln = block.norm1(x)  # (B, T, C)
    lo, hi = percentile_range(ln, 99.0, per_channel=True)
    channel = uniform_params(lo, hi, 4)
    rep = copy.deepcopy(block)
    tensor_params = reparameterize(rep.norm1, [rep.attn.qkv], channel)
    with torch.no_grad():
        torch.testing.assert_close(rep(x), ref, rtol=1e-4, atol=1e-4)
        ln_rep = rep.norm1(x)
    assert tensor_params.scale.dim() == 0
    r1 = channel.scale / tensor_params.scale
    shift = channel.scale * (channel.zero - tensor_params.zero)
    per_tensor = fake_quant_uniform(ln_rep, tensor_params) * r1 - shift  # back in the original coordinates
    per_channel = fake_quant_uniform(ln, channel)
    torch.testing.assert_close(per_tensor, per_channel, rtol=1e-4, atol=1e-4)
