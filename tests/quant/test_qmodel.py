import copy

import pytest
import torch

from memfit.quant.export import load_packed, pack_codes, save_packed, to_packed, unpack_codes, weight_bytes
from memfit.quant.lrp import quantizable_layers
from memfit.quant.qmodel import QuantConfig, folded_copy, ln_consumers, quantize_model
from memfit.quant.quantizers import BIT_CHOICES, quantize_weight


@pytest.mark.parametrize("bits", BIT_CHOICES)
def test_pack_round_trip(bits):
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (5, 3, 7), dtype=torch.int8)  # 105 codes: not a byte multiple at 3/6
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-105 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)


def _bits(model, w, a):
    layers = quantizable_layers(model)
    return {n: w for n in layers}, {n: a for n in layers}


def test_packed_model_equals_simulated_and_bytes_are_the_packed_tensors(tiny_models, fmnist_small, tmp_path):
    model, spec, _ = tiny_models["swin"]
    layers = quantizable_layers(model)
    wb = {n: BIT_CHOICES[i % len(BIT_CHOICES)] for i, n in enumerate(layers)}  # every width, 3- and 6-bit too
    q = quantize_model(model, fmnist_small.x_train[:64], QuantConfig(wb, {n: 4 for n in layers}))
    packed = to_packed(q)
    x = fmnist_small.x_test[:32]
    with torch.no_grad():
        torch.testing.assert_close(packed(x), q(x), rtol=1e-4, atol=1e-4)
    # independent count: ceil(n * b / 8) bytes of codes + 4 bytes of scale per output channel
    expected = sum(-(-layers[n].weight.numel() * wb[n] // 8) + 4 * layers[n].weight.shape[0] for n in layers)
    assert weight_bytes(packed) == expected
    assert expected < 0.25 * sum(m.weight.numel() * 4 for m in layers.values())
    path = save_packed(tmp_path / "p.safetensors", packed, spec, {"top1": 0.5})
    loaded, info = load_packed(path)
    assert info == {"top1": 0.5}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=1e-4, atol=1e-4)
    # the format's version: a /1 file (before the softmax kind was recorded) reads with log2 softmax
    # quantizers; a version this reader does not know is refused, not decoded with the wrong quantizer
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from memfit.quant.qmodel import SoftmaxQuant

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "v1.safetensors"),
              {**{k: v for k, v in meta.items() if k != "softmax_kind"}, "format": "memfit.quant.packed/1"})
    old, _ = load_packed(tmp_path / "v1.safetensors")
    kinds = {m.kind for m in old.modules() if isinstance(m, SoftmaxQuant)}
    assert kinds == {"log2"}
    save_file(tensors, str(tmp_path / "v9.safetensors"), {**meta, "format": "memfit.quant.packed/9"})
    with pytest.raises(ValueError, match="format memfit.quant.packed/9, which this memfit cannot read"):
        load_packed(tmp_path / "v9.safetensors")


def test_eight_bits_is_close_to_fp_and_two_bits_is_not(tiny_models, fmnist_small):
    model, _, _ = tiny_models["vit"]
    x = fmnist_small.x_test[:200]
    with torch.no_grad():
        ref = model(x)
        q8 = quantize_model(model, fmnist_small.x_train[:64], QuantConfig(*_bits(model, 8, 8)))(x)
        q8_linear = quantize_model(model, fmnist_small.x_train[:64],
                                   QuantConfig(*_bits(model, 8, 8), softmax=None))(x)
        q2 = quantize_model(model, fmnist_small.x_train[:64], QuantConfig(*_bits(model, 2, 4)))(x)
    err8, err2 = (q8 - ref).norm() / ref.norm(), (q2 - ref).norm() / ref.norm()
    # the log grid rounds each probability to a power of sqrt 2 (up to a factor 2^(1/4)) at any width
    assert (q8_linear - ref).norm() / ref.norm() < 0.02
    assert err8 < 0.1 and err2 > 2 * err8
    assert (q8_linear.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


def test_channelwise_beats_per_tensor_on_outlier_channels(tiny_models, fmnist_small):
    """Scale a few LayerNorm channels up by 30 and the next layer's columns down by 30: the FP function is the
    same, but the post-LN activation has outlier channels. Channel-wise quantization is barely hurt; per tensor
    is."""
    model = _with_outlier_channels(tiny_models["vit"][0])
    x = fmnist_small.x_test[:200]
    with torch.no_grad():
        ref = model(x)
        errs = {}
        for channelwise in (True, False):
            q = quantize_model(model, fmnist_small.x_train[:64], QuantConfig(*_bits(model, 8, 4), channelwise))
            errs[channelwise] = float((q(x) - ref).norm() / ref.norm())
    assert errs[True] < 0.5 * errs[False]


def _with_outlier_channels(model):
    """The same FP function, but 3 post-LN channels 30x larger and the next layer's columns 30x smaller."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for norm, consumers in ln_consumers(model).items():
            if norm == "norm":
                continue
            model.get_submodule(norm).weight[:3] *= 30
            model.get_submodule(norm).bias[:3] *= 30
            for c in consumers:
                model.get_submodule(c).weight[:, :3] /= 30
    return model


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_folded_copy_has_the_weights_that_quantize_model_rounds(tiny_models, fmnist_small, arch):
    """folded_copy (what the allocators cost) computes the FP function, and its weights are the ones
    quantize_model rounds: the same integer codes and scales at 3 and 4 bits, for every layer."""
    model = _with_outlier_channels(tiny_models[arch][0])
    calib, x = fmnist_small.x_train[:64], fmnist_small.x_test[:100]
    folded = folded_copy(model, calib)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)
    flayers = quantizable_layers(folded)
    for bits in (3, 4):
        q = quantize_model(model, calib, QuantConfig(*_bits(model, bits, 4)))
        for name, qlayer in quantizable_layers_of_quant(q).items():
            codes, scale = quantize_weight(flayers[name].weight, bits)
            assert torch.equal(qlayer.codes, codes) and torch.allclose(qlayer.scale, scale), name
    # and they are not the unfolded weights: an allocator costing those would cost other matrices
    qkv = [n for n in flayers if n.endswith("attn.qkv")][0]
    assert not torch.allclose(flayers[qkv].weight, quantizable_layers(model)[qkv].weight, rtol=0.05)


def quantizable_layers_of_quant(q):
    from memfit.quant.qmodel import QuantLayer

    return {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}


def test_ln_consumers_layouts(tiny_models):
    deit = ln_consumers(tiny_models["deit"][0])
    assert deit["norm"] == ["head", "head_dist"] and deit["blocks.0.norm1"] == ["blocks.0.attn.qkv"]
    swin = ln_consumers(tiny_models["swin"][0])
    assert swin["layers.1.downsample.norm"] == ["layers.1.downsample.reduction"] and swin["norm"] == ["head.fc"]


def test_auto_softmax_keeps_a_flat_attention_row_at_3_bits():
    """A 50-token row of equal probabilities (0.02): log-sqrt(2) at 3 bits flushes all of it to 0 (its smallest
    level is 2^-3.5), log2 keeps it within an octave; "auto" picks log2 at 3 bits and log-sqrt(2) at 4."""
    from memfit.quant.qmodel import SoftmaxQuant, softmax_kind

    row = torch.full((1, 1, 1, 50), 0.02)
    assert float(SoftmaxQuant(3, "log_sqrt2")(row).sum()) == 0.0
    kept = SoftmaxQuant(3, "log2")(row)
    assert torch.all((kept >= 0.01) & (kept <= 0.04))
    assert softmax_kind("auto", 3) == "log2" and softmax_kind("auto", 2) == "log2"
    assert softmax_kind("auto", 4) == "log_sqrt2" and softmax_kind("log2", 8) == "log2"
