import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from memfit.quant.allocators import ALLOCATORS, allocate_bits, hutchinson_trace, uniform_budget
from memfit.quant.checkpoint import save_checkpoint
from memfit.quant.errors import InfeasibleBudgetError, QuantError
from memfit.quant.pipeline import QuantRun, run_quant
from memfit.quant.qmodel import folded_copy
from memfit.quant.quantizers import BIT_CHOICES


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_allocators_meet_the_budget(tiny_models, fmnist_small, allocator):
    model, _, _ = tiny_models["vit"]
    x, y = fmnist_small.x_train[:64], fmnist_small.y_train[:64]
    a = allocate_bits(model, allocator, 3.0, x, y, avg_act_bits=4.0)
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    avg = sum(sizes[n] * a.weight_bits[n] for n in sizes) / sum(sizes.values())  # recomputed here
    assert avg == pytest.approx(a.avg_weight_bits) and avg <= 3.0 + 1e-9
    assert a.avg_act_bits <= 4.0 + 1e-9
    assert a.weight_bits["patch_embed.proj"] == 8 and a.weight_bits["head"] == 8
    assert set(a.weight_bits.values()) <= set(BIT_CHOICES) and set(a.act_bits.values()) <= set(BIT_CHOICES)
    if allocator != "uniform":
        assert len(set(v for n, v in a.weight_bits.items() if n not in ("patch_embed.proj", "head"))) > 1


def test_random_is_seeded(tiny_models, fmnist_small):
    model, _, _ = tiny_models["vit"]
    x, y = fmnist_small.x_train[:32], fmnist_small.y_train[:32]
    runs = [allocate_bits(model, "random", 3.0, x, y, act_bits=4, seed=s).importance for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("allocator", ["lrp", "lrp-zplus", "sensitivity", "hessian"])
def test_cached_costs_give_the_same_bits_at_every_budget(tiny_models, fmnist_small, allocator):
    model, _, _ = tiny_models["vit"]
    x, y = fmnist_small.x_train[:48], fmnist_small.y_train[:48]
    cache: dict = {}
    for budget in (3.0, 4.0, 3.0):
        fresh = allocate_bits(model, allocator, budget, x, y, avg_act_bits=4.0)
        reused = allocate_bits(model, allocator, budget, x, y, avg_act_bits=4.0, cache=cache)
        assert reused.weight_bits == fresh.weight_bits and reused.act_bits == fresh.act_bits
    assert cache  # the costs were kept


def test_uniform_budget_puts_the_body_at_the_floor_width(tiny_models, fmnist_small):
    model, _, _ = tiny_models["vit"]
    x, y = fmnist_small.x_train[:16], fmnist_small.y_train[:16]
    for avg in (3.0, 4.0, 2.5):
        budget = uniform_budget(model, avg)
        assert budget > avg - 0.5  # the fixed 8-bit layers push it over a whole-width body
        bits = allocate_bits(model, "uniform", budget, x, y, act_bits=4).weight_bits
        body = {v for n, v in bits.items() if n not in ("patch_embed.proj", "head")}
        assert body == {int(avg)}


def test_hutchinson_matches_the_exact_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    est = hutchinson_trace(model, x, y, ["0", "2"], iters=2000)
    for name, idx in (("0", 0), ("2", 2)):
        w = model[idx].weight

        def loss_of(wv, idx=idx):
            params = {f"{idx}.weight": wv}
            return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        exact = torch.autograd.functional.hessian(loss_of, w.detach()).reshape(w.numel(), w.numel()).trace()
        assert est[name] == pytest.approx(float(exact), rel=0.1, abs=1e-3)


def test_pipeline_and_errors(tiny_models, fmnist_small, tmp_path):
    model, spec, _ = tiny_models["deit"]
    path = save_checkpoint(tmp_path / "deit.safetensors", model, spec)
    result, packed, _ = run_quant(QuantRun(model=str(path), allocator="lrp", avg_bits=4, act_bits=4, calib=64,
                                           max_test=200), fmnist_small)
    for key in ("top1", "fp_top1", "avg_weight_bits", "avg_act_bits", "bits_per_layer", "weight_bytes"):
        assert key in result
    assert abs(result["top1"] - result["simulated_top1"]) <= 0.01  # packed == simulated within rounding
    assert result["weight_bytes"] < result["fp_weight_bytes"] / 4
    with pytest.raises(QuantError, match="larger than the 2000 training images"):
        run_quant(QuantRun(model=str(path), act_bits=4, calib=5000), fmnist_small)
    with pytest.raises(InfeasibleBudgetError, match="smallest average is"):
        run_quant(QuantRun(model=str(path), avg_bits=1.5, act_bits=4, calib=16), fmnist_small)
    with pytest.raises(QuantError, match="--act-bits"):
        run_quant(QuantRun(model=str(path), act_bits=5, calib=16), fmnist_small)


def test_cli_quant_vit(tiny_models, tmp_path):
    model, spec, _ = tiny_models["vit"]
    path = save_checkpoint(tmp_path / "vit.safetensors", model, spec)
    base = [sys.executable, "-m", "memfit.cli", "quant", "vit", "--model", str(path), "--calib", "32",
            "--max-test", "100", "--threads", "1"]
    proc = subprocess.run(base + ["--allocator", "uniform", "--avg-bits", "4", "--json", "--plot",
                                  str(tmp_path / "a.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["avg_weight_bits"] <= 4 and (tmp_path / "a.png").stat().st_size > 0
    bad = subprocess.run(base + ["--avg-bits", "1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "smallest average is" in bad.stderr and bad.stdout == ""


def test_checkpoint_for_other_images_is_refused(fmnist_small, tmp_path):
    from memfit.quant.models import ModelSpec

    spec = ModelSpec("vit_tiny_patch16_224", dict(img_size=32, in_chans=3, num_classes=10, depth=1, embed_dim=32,
                                                  num_heads=2, patch_size=8))
    path = save_checkpoint(tmp_path / "rgb.safetensors", spec.build(), spec)
    with pytest.raises(QuantError, match="3x32x32 images"):
        run_quant(QuantRun(model=str(path), act_bits=4, calib=16), fmnist_small)


def test_lrp_zplus_scores_come_from_the_zplus_rules(tiny_models, fmnist_small):
    """lrp-zplus's importance is the zplus contribution share of each free layer, lrp's the epsilon one; both are
    cached under their own key, so one cache serves both allocators."""
    from memfit.quant.scores import contribution_scores

    model, _, _ = tiny_models["vit"]
    x, y = fmnist_small.x_train[:32], fmnist_small.y_train[:32]
    cache: dict = {}
    for allocator, rules in (("lrp", "epsilon"), ("lrp-zplus", "zplus"), ("lrp", "epsilon")):
        a = allocate_bits(model, allocator, 3.0, x, y, act_bits=4, cache=cache)
        want = contribution_scores(folded_copy(model, x), x, y, rules=rules).mean  # costed as it is quantized
        assert a.importance == pytest.approx({n: want[n] for n in a.importance}, rel=1e-5)
    assert len([k for k in cache if k[1] == "lrp"]) == 2  # keys: (channelwise, "lrp", attention, rules)


def test_weight_costs_are_taken_on_the_weights_that_get_rounded(tiny_models, fmnist_small):
    """With channelwise (the default), the distortion the knapsack weighs is that of the folded weights
    W diag(r1) that quantize_model rounds (test_qmodel checks they are the same codes); without, of W itself.
    One cache holds both."""
    from memfit.quant.allocators import _rel_distortion
    from memfit.quant.lrp import quantizable_layers

    model, _, _ = tiny_models["vit"]
    x, y = fmnist_small.x_train[:48], fmnist_small.y_train[:48]
    cache: dict = {}
    for channelwise in (True, False):
        allocate_bits(model, "random", 3.0, x, y, act_bits=4, cache=cache, channelwise=channelwise)
    seen = {cw: quantizable_layers(folded_copy(model, x) if cw else model) for cw in (True, False)}
    for cw in (True, False):
        for name, per_bits in cache[(cw, "w_dist")].items():
            assert per_bits[3] == pytest.approx(_rel_distortion(seen[cw][name].weight.detach(), 3), rel=1e-6)
    assert cache[(True, "w_dist")]["blocks.0.attn.qkv"][3] != pytest.approx(
        cache[(False, "w_dist")]["blocks.0.attn.qkv"][3], rel=1e-3)
    assert cache[(True, "w_dist")]["blocks.0.attn.proj"] == cache[(False, "w_dist")]["blocks.0.attn.proj"]
