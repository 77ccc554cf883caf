import pytest
import torch

from memfit.quant.lrp import blocks_of, relevance
from memfit.quant.scores import contribution_scores


@pytest.mark.parametrize("arch", ["vit", "deit", "swin"])
def test_relevance_conserved_at_every_block(tiny_models, fmnist_small, arch):
    """Relevance summed at each block's output equals the relevance put at the logits, within 1%."""
    model, _, _ = tiny_models[arch]
    x, y = fmnist_small.x_test[:16], fmnist_small.y_test[:16]
    with torch.no_grad():
        reference = model(x)
    rel = relevance(model, x, y)
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
