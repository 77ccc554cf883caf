"""In-context damage (context.py): allocations assembled from one quantized copy per width are the models
quantize_model builds for them, and a move's damage is the KL change of exactly that model."""
import pytest
import torch
import torch.nn.functional as F

from memfit.quant.allocators import _FIXED_NAMES as FIXED
from memfit.quant.context import compose, context_damage
from memfit.quant.lrp import quantizable_layers
from memfit.quant.qmodel import QuantConfig, quantize_model


def _bits(model, width):
    return {l: (8 if l in FIXED else width) for l in quantizable_layers(model)}


@pytest.mark.parametrize("arch", ["vit", "deit", "swin"])
def test_composed_allocation_is_quantize_models(tiny_models, fmnist_small, arch):
    """Weights and activation groups at mixed widths, drawn at random: every layer's input, q/k/v and softmax
    quantizers, its folded LayerNorm and bias (which carry the activation width's zero-point shift) and its rounded
    weights come from the right copy, so the outputs are quantize_model's to the bit."""
    model, _, _ = tiny_models[arch]
    calib, x = fmnist_small.x_train[:32], fmnist_small.x_test[:32]
    copies = {b: quantize_model(model, calib, QuantConfig(_bits(model, b), _bits(model, b))) for b in (2, 3, 4)}
    gen = torch.Generator().manual_seed(0)
    free = [l for l in quantizable_layers(model) if l not in FIXED]
    for _ in range(3):
        pick = lambda: {l: (2, 3, 4)[int(torch.randint(0, 3, (1,), generator=gen))] for l in free}
        wb, ab = dict(_bits(model, 8), **pick()), dict(_bits(model, 8), **pick())
        want = quantize_model(model, calib, QuantConfig(wb, ab))
        with torch.no_grad():
            assert torch.equal(compose(copies, wb, ab)(x), want(x))


def test_compose_refuses_a_width_it_has_no_copy_of(tiny_models, fmnist_small):
    model, _, _ = tiny_models["vit"]
    calib = fmnist_small.x_train[:16]
    copies = {3: quantize_model(model, calib, QuantConfig(_bits(model, 3), _bits(model, 3)))}
    with pytest.raises(KeyError, match="no quantized copy at 2 bits"):
        compose(copies, dict(_bits(model, 3), **{"blocks.0.mlp.fc2": 2}), _bits(model, 3))


def test_damage_is_the_kl_change_of_that_one_move(tiny_models, fmnist_small):
    """damage[kind][l][b] = KL(fp || baseline with l's weights (or activation group) at b) - KL(fp || baseline),
    the models built by quantize_model; 0 at the baseline's own width."""
    model, _, _ = tiny_models["vit"]
    calib = fmnist_small.x_train[:32]
    free = [l for l in quantizable_layers(model) if l not in FIXED]
    dmg = context_damage(model, calib, {l: 3 for l in free}, {l: 3 for l in free}, (2, 3, 4), (2, 3, 4))
    with torch.no_grad():
        ref = F.log_softmax(model(calib), -1)

    def kl(wb, ab):
        with torch.no_grad():
            logp = F.log_softmax(quantize_model(model, calib, QuantConfig(wb, ab))(calib), -1)
        return float(F.kl_div(logp, ref, log_target=True, reduction="batchmean"))

    base = _bits(model, 3)
    k0 = kl(base, base)
    for l in ("blocks.0.attn.qkv", free[-1]):
        moved = dict(base, **{l: 2})
        assert dmg["weights"][l][2] == pytest.approx(kl(moved, base) - k0, rel=1e-5, abs=1e-7)
        assert dmg["acts"][l][2] == pytest.approx(kl(base, moved) - k0, rel=1e-5, abs=1e-7)
        assert dmg["weights"][l][3] == 0.0 and dmg["acts"][l][3] == 0.0
    assert set(dmg["weights"]) == set(free) == set(dmg["acts"])


def test_context_allocator_spends_where_the_measured_damage_is(tiny_models, fmnist_small, monkeypatch):
    """`context` costs each width by its in-context damage and chooses within one step of the uniform body: with a
    damage that makes one layer's 2-bit weights (and another's 2-bit activations) ruinous and 4 bits on a third
    layer a gain, the knapsack under a 3-bit budget never drops the first two and lifts the third, at widths 2-4."""
    import memfit.quant.context as context
    from memfit.quant.allocators import allocate_bits

    model, _, _ = tiny_models["vit"]
    free = [l for l in quantizable_layers(model) if l not in FIXED]
    keep_w, keep_a, lift = "blocks.0.mlp.fc2", "blocks.0.attn.qkv", "blocks.0.mlp.fc1"
    seen = {}

    def fake(_model, _x, base_w, base_a, w_widths, a_widths, **_kw):
        seen.update(base_w=set(base_w.values()), base_a=set(base_a.values()), w=w_widths, a=a_widths)
        dmg = {k: {l: {b: (0.0 if b == 3 else 1e-3 if b == 2 else -1e-4) for b in w} for l in free}
               for k, w in (("weights", w_widths), ("acts", a_widths))}
        for kind, layer, b, v in (("weights", keep_w, 2, 10.0), ("acts", keep_a, 2, 10.0),
                                  ("weights", lift, 4, -10.0), ("acts", lift, 4, -10.0)):
            if b in dmg[kind][layer]:
                dmg[kind][layer][b] = v
        return dmg

    monkeypatch.setattr(context, "context_damage", fake)
    x, y = fmnist_small.x_train[:16], fmnist_small.y_train[:16]
    a = allocate_bits(model, "context", 3.0, x, y, avg_act_bits=3.0)
    assert seen == {"base_w": {3}, "base_a": {3}, "w": (2, 3, 4), "a": (2, 3, 4)}
    assert a.weight_bits[keep_w] >= 3 and a.act_bits[keep_a] >= 3
    assert a.weight_bits[lift] == 4 and a.act_bits[lift] == 4
    assert {a.weight_bits[l] for l in free} | {a.act_bits[l] for l in free} <= {2, 3, 4}
    assert a.avg_weight_bits <= 3.0 + 1e-9 and a.avg_act_bits <= 3.0 + 1e-9
    # activations fixed: only weight moves are measured, around the floor of the weight budget
    a = allocate_bits(model, "context", 4.5, x, y, act_bits=4)
    assert seen["w"] == (3, 4, 6) and seen["a"] == () and seen["base_a"] == {4}
    assert set(a.act_bits[l] for l in free) == {4}
