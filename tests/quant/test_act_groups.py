"""Activation-bit allocation: what one layer's activation width quantizes, counts and costs (act_groups.py)."""
import pytest
import torch

from memfit.quant.act_groups import act_groups, group_sizes, quantized_group, record_probs
from memfit.quant.allocators import allocate_bits
from memfit.quant.lrp import quantizable_layers
from memfit.quant.qmodel import QuantConfig, QuantLayer, SoftmaxQuant, quantize_model, record
from memfit.quant.quantizers import fake_quant_log, fake_quant_uniform, percentile_range, uniform_params

FIXED = ("patch_embed.proj", "head")


def _shape(model):
    """tokens T, width C, heads H, MLP hidden of a timm ViT."""
    block = model.blocks[0]
    return (model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim, block.attn.num_heads,
            block.mlp.fc1.out_features)


def test_sizes_count_q_k_v_and_the_softmax_with_qkv(tiny_models, fmnist_small):
    """qkv's width also sets q/k/v (3 T C) and the attention probabilities (H T T), so they weigh in the average."""
    model, _, _ = tiny_models["vit"]
    t, c, h, hidden = _shape(model)
    sizes = group_sizes(model, fmnist_small.x_train[:1])
    assert sizes["blocks.0.attn.qkv"] == t * c + 3 * t * c + h * t * t
    assert sizes["blocks.0.attn.proj"] == t * c and sizes["blocks.0.mlp.fc2"] == t * hidden
    # the average `allocate_bits` reports with every free activation at 3 bits is weighted by those elements
    a = allocate_bits(model, "uniform", 3.0, fmnist_small.x_train[:16], fmnist_small.y_train[:16], act_bits=3)
    n_fixed = 28 * 28 + c  # the patch embedding's input (one 28x28 image) and the head's (the [CLS] token)
    body = sum(sizes[n] for n in quantizable_layers(model) if n not in FIXED)
    assert a.avg_act_bits == pytest.approx((3 * body + 8 * n_fixed) / (body + n_fixed))


@pytest.mark.parametrize("bits", [3, 4])
def test_distortion_is_that_of_the_quantizers_quantize_model_sets(tiny_models, fmnist_small, bits):
    """The group's distortion at b bits is the relative squared error of each tensor it quantizes, under the very
    quantizers `quantize_model` calibrates at b bits (clipped channel-wise post-LN input, per-tensor q/k/v, the
    softmax quantizer of that width), summed."""
    model, _, _ = tiny_models["vit"]
    x = fmnist_small.x_train[:64]
    names = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc2"]
    got = act_groups(model, x, names).dist
    layers = quantizable_layers(model)
    q = quantize_model(model, x, QuantConfig({n: 8 for n in layers}, {n: bits for n in layers}))
    qlayers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    inputs = record(model, x, names)

    def rel(a, b):
        return float((a - b).pow(2).sum() / b.pow(2).sum())

    for n in ("blocks.0.attn.proj", "blocks.0.mlp.fc2"):  # per tensor, quantize_model's own params
        assert got[n][bits] == pytest.approx(rel(fake_quant_uniform(inputs[n], qlayers[n].act), inputs[n]), rel=1e-5)
    qkv = "blocks.0.attn.qkv"
    ln_out = record(model, x, ["blocks.0.norm1"], outputs=True)["blocks.0.norm1"]
    lo, hi = percentile_range(ln_out, QuantConfig({}, {}).ln_percentile, per_channel=True)
    want = rel(fake_quant_uniform(inputs[qkv], uniform_params(lo, hi, bits)), inputs[qkv])
    out = record(model, x, [qkv], outputs=True)[qkv]
    want += rel(fake_quant_uniform(out, qlayers[qkv].out), out)
    sq = q.blocks[0].attn.attn_drop
    assert isinstance(sq, SoftmaxQuant)
    probs = record_probs(model, x, [qkv])[qkv]
    want += rel(fake_quant_log(probs, sq.bits, sq.kind), probs)
    assert got[qkv][bits] == pytest.approx(want, rel=1e-5)


def test_quantizing_one_group_quantizes_its_input_q_k_v_and_softmax(tiny_models, fmnist_small):
    """What `sensitivity` measures for qkv's activation width: at 2 bits, q/k/v take at most 4 levels and the
    attention probabilities only 2^-q (q = 0..3, log2 below 4 bits) or 0; nothing else in the model changes."""
    model, _, _ = tiny_models["vit"]
    x = fmnist_small.x_train[:32]
    qkv = "blocks.1.attn.qkv"
    calib = {"ranges": {}, "inputs": record(model, x, [qkv]), "outs": record(model, x, [qkv], outputs=True)}
    seen = {}
    attn = model.blocks[1].attn
    with quantized_group(model, qkv, 2, calib):
        # registered after the group's own hooks, so they see what the next op gets
        hooks = [attn.qkv.register_forward_pre_hook(lambda _m, a: seen.update(inp=a[0])),
                 attn.qkv.register_forward_hook(lambda _m, _a, o: seen.update(out=o)),
                 attn.attn_drop.register_forward_hook(lambda _m, _a, o: seen.update(probs=o))]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
    assert seen["inp"].unique().numel() <= 4  # per tensor here (no channel-wise ranges given)
    assert seen["out"].unique().numel() <= 4
    allowed = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.125])
    assert torch.isin(seen["probs"].unique(), allowed).all()
    assert model.blocks[1].attn.fused_attn == model.blocks[0].attn.fused_attn  # restored


def test_allocated_activation_bits_meet_the_budget(tiny_models, fmnist_small):
    model, _, _ = tiny_models["vit"]
    x, y = fmnist_small.x_train[:48], fmnist_small.y_train[:48]
    sizes = group_sizes(model, x[:1])
    for allocator in ("lrp-zplus", "random", "sensitivity"):
        a = allocate_bits(model, allocator, 3.0, x, y, avg_act_bits=3.0)
        avg = sum(sizes[n] * a.act_bits[n] for n in sizes) / sum(sizes.values())
        assert avg == pytest.approx(a.avg_act_bits) and avg <= 3.0 + 1e-9
        assert all(a.act_bits[n] == 8 for n in FIXED)
