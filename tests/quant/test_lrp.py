import pytest
import torch

from torch import nn

from memfit.quant.lrp import LRPMode, blocks_of, relevance
from memfit.quant.scores import contribution_scores


@pytest.mark.parametrize("rules", ["epsilon", "zplus"])
@pytest.mark.parametrize("arch", ["vit", "deit", "swin"])
def test_relevance_conserved_at_every_block(tiny_models, fmnist_small, arch, rules):
    """Relevance summed at each block's output equals the relevance put at the logits, within 1%."""
    model, _, _ = tiny_models[arch]
    x, y = fmnist_small.x_test[:16], fmnist_small.y_test[:16]
    with torch.no_grad():
        reference = model(x)
    rel = relevance(model, x, y, rules=rules)
    torch.testing.assert_close(model(x).detach(), reference)  # the pass left the model as it was
    torch.testing.assert_close(rel.logit, reference.gather(1, y[:, None]).squeeze(1))  # R at logits = logit_y
    assert len(rel.blocks) == len(blocks_of(model))
    for block_sum in rel.blocks:
        assert ((block_sum - rel.logit).abs() <= 0.01 * rel.logit.abs()).all()


def test_rule_structure(tiny_models, fmnist_small):
    """Identity rule through GELU and bias-free linears: fc1 and fc2 carry the same relevance; under the
    conservative attention rule qkv carries what proj carries (all of it through v); the head carries all."""
    model, _, _ = tiny_models["vit"]
    rel = relevance(model, fmnist_small.x_test[:8])
    signed = {name: r[0] for name, r in rel.layers.items()}
    for i in range(len(model.blocks)):
        torch.testing.assert_close(signed[f"blocks.{i}.mlp.fc1"], signed[f"blocks.{i}.mlp.fc2"], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(signed[f"blocks.{i}.attn.qkv"], signed[f"blocks.{i}.attn.proj"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(signed["head"], rel.logit, rtol=1e-4, atol=1e-6)


def test_attnlrp_softmax_rule_reaches_queries_and_keys(tiny_models, fmnist_small):
    """AttnLRP's softmax rule sends relevance into q and k, so the qkv layer differs from proj; the last block
    (after every softmax) still holds all the relevance."""
    model, _, _ = tiny_models["vit"]
    x = fmnist_small.x_test[:8]
    cp, attn = relevance(model, x, attention="cp"), relevance(model, x, attention="attnlrp")
    assert not torch.allclose(attn.layers["blocks.0.attn.qkv"][0], cp.layers["blocks.0.attn.qkv"][0], rtol=1e-3)
    torch.testing.assert_close(attn.blocks[-1], attn.logit, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="cp, attnlrp"):
        relevance(model, x, attention="bogus")


def test_contribution_scores(tiny_models, fmnist_small):
    model, _, _ = tiny_models["deit"]
    x, y = fmnist_small.x_train[:64], fmnist_small.y_train[:64]
    scores = contribution_scores(model, x, y, subsets=4, batch_size=32)
    assert scores.layers[0] == "patch_embed.proj" and set(scores.layers[-2:]) == {"head", "head_dist"}
    assert sum(scores.mean.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(v >= 0 for v in scores.mean.values()) and all(v >= 0 for v in scores.subset_std.values())
    assert any(v > 0 for v in scores.subset_std.values())
    again = contribution_scores(model, x, y, subsets=4, batch_size=16)  # batching does not change the result
    for name in scores.layers:
        assert again.mean[name] == pytest.approx(scores.mean[name], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="subsets"):
        contribution_scores(model, x[:2], y[:2], subsets=4)


def test_swin_window_layers_give_one_relevance_per_image(tiny_models, fmnist_small):
    """Swin's window attention runs on (images x windows) rows: each layer's relevance is folded back to one
    value per image, and equals what that image gets explained alone."""
    model, _, _ = tiny_models["swin"]
    x, y = fmnist_small.x_test[:4], fmnist_small.y_test[:4]
    batch = relevance(model, x, y)
    assert all(r[0].shape == (4,) and r[1].shape == (4,) for r in batch.layers.values())
    for i in range(4):
        alone = relevance(model, x[i:i + 1], y[i:i + 1])
        for name, (signed, absolute) in alone.layers.items():
            torch.testing.assert_close(batch.layers[name][0][i:i + 1], signed, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(batch.layers[name][1][i:i + 1], absolute, rtol=1e-4, atol=1e-6)
    scores = contribution_scores(model, x, y, subsets=2, batch_size=4)
    assert sum(scores.mean.values()) == pytest.approx(1.0)


def test_zplus_linear_rule_is_the_explicit_formula():
    """Under rules="zplus" a Linear hands input j the relevance sum_k z_jk^+ / sum_j' z_j'k^+ R_k (z_jk = x_j w_kj,
    R_k the relevance of its output, bias included), or, for an output with no positive product, the same over
    its negative products: checked against those sums written out, on signed inputs. It is non-negative where R
    is, and conserves; the epsilon rule gives a different split."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    with torch.no_grad():  # output 0 of image 0 has only negative products and a positive output (its bias)
        lin.weight[0] = -x[0].sign() * lin.weight[0].abs()
        lin.bias[0] = 1.0 - (lin.weight[0] * x[0]).sum()
        seed = lin(x).sign() * torch.rand(3, 4)  # R_y = y * seed >= 0

    def explain(rules):
        inp = x.clone().requires_grad_(True)
        with LRPMode(rules=rules):
            y = lin(inp)
        y.backward(seed)
        return inp * inp.grad, (y * seed).detach()

    r_x, r_y = explain("zplus")
    z = x[:, :, None] * lin.weight.detach().T[None]  # (B, in, out) products x_j w_kj
    zp, zn = z.clamp_min(0), z.clamp_max(0)
    share = torch.where(zp.sum(1, keepdim=True) > 0, zp / zp.sum(1, keepdim=True), zn / zn.sum(1, keepdim=True))
    assert (zp[0, :, 0] == 0).all()  # the fallback to the negative products is exercised
    expected = (share * r_y[:, None, :]).sum(2)  # (B, in)
    torch.testing.assert_close(r_x, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r_x.sum(1), r_y.sum(1), rtol=1e-5, atol=1e-6)
    assert (r_y >= 0).all() and (r_x >= -1e-7).all()  # positive relevance stays positive
    r_eps, _ = explain("epsilon")
    assert not torch.allclose(r_eps, r_x, rtol=1e-3)


def test_zplus_addition_splits_by_magnitude_and_stays_bounded():
    """y = a + b of two activations (b broadcast over the batch): R_y goes to a and b in proportion to |a| and |b|,
    so neither gets more than |R_y| even where a and b nearly cancel, where the epsilon rule's share a / y of
    R_y is unbounded."""
    torch.manual_seed(1)
    a0 = torch.randn(2, 3, 4)
    b0 = torch.randn(1, 3, 4)
    a0[0, 0, 0] = -b0[0, 0, 0] + 1e-4  # a + b ~ 0 there: a cancellation
    g = torch.rand(2, 3, 4)

    def explain(rules):
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        with LRPMode(rules=rules):
            y = a + b
        y.backward(g)
        return a * a.grad, b * b.grad, (y * g).detach()

    r_a, r_b, r_y = explain("zplus")
    share = a0.abs() / (a0.abs() + b0.abs())
    torch.testing.assert_close(r_a, share * r_y, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r_b, ((1 - share) * r_y).sum(0, keepdim=True), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r_a.sum() + r_b.sum(), r_y.sum(), rtol=1e-5, atol=1e-6)
    assert (r_a.abs() <= r_y.abs() + 1e-6).all()
    r_a_eps, _, _ = explain("epsilon")
    assert r_a_eps[0, 0, 0].abs() > 100 * r_y[0, 0, 0].abs()  # epsilon: a / y of R_y at the cancellation


def test_unknown_rule_set_is_refused(tiny_models, fmnist_small):
    model, _, _ = tiny_models["vit"]
    with pytest.raises(ValueError, match="epsilon, zplus"):
        relevance(model, fmnist_small.x_test[:2], rules="bogus")
