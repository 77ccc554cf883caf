"""The learning rules themselves: exact updates on small cases, and no gradient between layers."""
import pytest
import torch
import torch.nn.functional as F

from memfit.train.local.errors import LocalTrainingError
from memfit.train.local.models import LocalNet, ModelConfig, build_model
from memfit.train.local.rules import (
    LOCAL_LOSSES, TargetProjection, local_loss, local_loss_grad, make_rule,
)

LR = 0.1


def sgd(params):
    return torch.optim.SGD(params, lr=LR)  # no momentum: one step moves W by exactly -LR * grad


def tiny_net(activation="tanh", depth=3, seed=0) -> LocalNet:
    # images (1, 2, 3) -> flat 6 inputs, hidden width 5, 4 classes
    return build_model(ModelConfig("mlp", depth, 5, activation), (1, 2, 3), 4, seed)


def batch(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 2, 3, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("kind", LOCAL_LOSSES)
def test_closed_form_local_grad_matches_autograd(kind):
    a = torch.randn(7, 5, requires_grad=True)
    proj = torch.rand(3, 5) * 2 - 1  # (K, D)
    y1 = F.one_hot(torch.arange(7) % 3, 3).float()  # (B, K)
    t = y1 @ proj  # (B, D) = P y*
    (g_auto,) = torch.autograd.grad(local_loss(kind, a, t, proj, y1), a)
    torch.testing.assert_close(local_loss_grad(kind, a, t, proj, y1), g_auto)


def test_contrast_loss_is_class_cross_entropy_of_target_scores():
    a, proj = torch.randn(4, 6), torch.randn(3, 6)
    y = torch.tensor([0, 2, 1, 2])
    y1 = F.one_hot(y, 3).float()
    torch.testing.assert_close(local_loss("contrast", a, y1 @ proj, proj, y1), F.cross_entropy(a @ proj.T, y))
    with pytest.raises(LocalTrainingError, match="needs the projection"):
        local_loss_grad("contrast", a, y1 @ proj)


def test_contrast_stops_pulling_once_the_own_target_wins_ce_does_not():
    proj = torch.eye(3, 6) * 2 - 1  # three distinct class targets in [-1, 1]
    y1 = F.one_hot(torch.tensor([0, 1, 2]), 3).float()
    t = y1 @ proj  # (3, 6)
    a = 20 * t  # far along the own class's target: right, but not equal to it
    assert local_loss_grad("contrast", a, t, proj, y1).abs().max() < 1e-6
    assert local_loss_grad("ce", a, t).abs().max() > 1e-3
    assert local_loss_grad("mse", a, t).abs().max() > 1.0


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["mse", "ce", "contrast"])
def test_tpsgd_update_equals_analytic_local_gradient(kind, fused):
    net = tiny_net()
    rule = make_rule("tpsgd", net, sgd, 4, seed=3, loss=kind, fused=fused)
    x, y = batch()
    lin = net.blocks[0][0]
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    h = x.flatten(1)  # (B, 6)
    a = torch.tanh(h @ w0.T + b0)  # (B, 5)
    t = rule.projections[0].matrix()[y]  # P_0 y* for one-hot y*: row y of P, (B, 5)
    if kind == "mse":  # L = mean_b 0.5 * |a - t|^2
        dl_da = (a - t) / len(y)
    elif kind == "contrast":  # L = mean_b CE(softmax(a P^T), y*): scores against every class's target
        proj = rule.projections[0].matrix()  # (K, D)
        dl_da = (torch.softmax(a @ proj.T, 1) - F.one_hot(y, 4).float()) @ proj / len(y)
    else:  # L = mean_b CE(softmax(t), softmax(a))
        dl_da = (torch.softmax(a, 1) - torch.softmax(t, 1)) / len(y)
    dz = dl_da * (1 - a**2)  # tanh' from the output
    rule.train_step(x, y)
    torch.testing.assert_close(lin.weight.detach(), w0 - LR * dz.T @ h)
    torch.testing.assert_close(lin.bias.detach(), b0 - LR * dz.sum(0))


def test_drtp_update_uses_projected_target_as_gradient():
    net = tiny_net()
    rule = make_rule("drtp", net, sgd, 4, seed=3)
    x, y = batch()
    lin = net.blocks[0][0]
    w0 = lin.weight.detach().clone()
    h = x.flatten(1)
    a = torch.tanh(h @ w0.T + lin.bias.detach())
    t = F.one_hot(y, 4).float() @ rule.projections[0].matrix()  # (B, 5)
    dz = -t / len(y) * (1 - a**2)  # the target replaces dL/da, whatever a is
    rule.train_step(x, y)
    torch.testing.assert_close(lin.weight.detach(), w0 - LR * dz.T @ h)


def test_dfa_update_uses_projected_output_error():
    net = tiny_net(depth=2)
    rule = make_rule("dfa", net, sgd, 4, seed=3)
    x, y = batch()
    lin = net.blocks[0][0]
    w0 = lin.weight.detach().clone()
    h = x.flatten(1)
    with torch.no_grad():
        a = torch.tanh(h @ w0.T + lin.bias)
        err = (torch.softmax(net.head(a), 1) - F.one_hot(y, 4).float()) / len(y)  # dCE/dlogits (B, K)
    dz = (err @ rule.projections[0].matrix()) * (1 - a**2)
    rule.train_step(x, y)
    torch.testing.assert_close(lin.weight.detach(), w0 - LR * dz.T @ h)


def _leaves(t: torch.Tensor) -> set[int]:
    """ids of the parameters reachable from t's autograd graph."""
    seen, stack, found = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return found


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", ["tpsgd", "tpsgd-contrast", "drtp", "dfa"])
@pytest.mark.parametrize("model", ["mlp", "cnn", "rnn"])
def test_local_graph_reaches_only_its_own_block(method, model, fused):
    net = build_model(ModelConfig(model, 3, 4, rnn_cell="lstm"), (1, 8, 8), 4, seed=0)
    method, _, loss = method.partition("-")
    rule = make_rule(method, net, sgd, 4, seed=0, fused=fused, loss=loss or "mse")
    block_params = [{id(p) for p in b.parameters()} for b in net.blocks]
    checked = []
    original = rule.local_backward

    def spy(i, root, grad=None):  # every local rule's backward goes through here, fused or not
        for r in root if isinstance(root, list) else [root]:
            reached = _leaves(r)
            assert reached and reached <= block_params[i], f"block {i}'s graph reaches another layer"
        checked.append(i)
        original(i, root, grad)

    rule.local_backward = spy
    x = torch.randn(5, 1, 8, 8)
    rule.train_step(x, torch.tensor([0, 1, 2, 3, 0]))
    assert set(checked) == {0, 1}


@pytest.mark.parametrize("method,isolated", [("tpsgd", True), ("drtp", True), ("bp", False)])
def test_first_layer_update_ignores_later_layers(method, isolated):
    """Change only block 1's weights: block 0's tpSGD update must not move; backprop's must."""
    x, y = batch()
    updates = []
    for later_seed in (10, 11):
        net = tiny_net(depth=3)
        torch.manual_seed(later_seed)
        for p in list(net.blocks[1].parameters()) + list(net.head.parameters()):
            torch.nn.init.normal_(p)
        rule = make_rule(method, net, sgd, 4, seed=3)
        before = net.blocks[0][0].weight.detach().clone()
        rule.train_step(x, y)
        updates.append(net.blocks[0][0].weight.detach() - before)
    assert updates[0].abs().sum() > 0
    assert torch.allclose(updates[0], updates[1]) == isolated


def test_projection_regenerated_from_seed_matches_stored():
    stored = TargetProjection(10, (6,), seed=7, store=True)
    regen = TargetProjection(10, (6,), seed=7, store=False)
    assert regen.nbytes == 0 and stored.nbytes == 10 * 6 * 4
    y = F.one_hot(torch.tensor([3, 9]), 10).float()
    torch.testing.assert_close(stored.project(y), regen.project(y))
    assert not torch.equal(stored.matrix(), TargetProjection(10, (6,), seed=8).matrix())


def test_conv_targets_are_per_channel_for_tpsgd():
    net = build_model(ModelConfig("cnn", 3, 4), (1, 8, 8), 10, seed=0)
    assert net.block_out_shapes == [(4, 4, 4), (4, 2, 2)]
    tp = make_rule("tpsgd", net, sgd, 10, seed=0)
    dfa = make_rule("dfa", net, sgd, 10, seed=0)
    assert [p.out_shape for p in tp.projections] == [(4,), (4,)]
    assert [p.out_shape for p in dfa.projections] == [(4, 4, 4), (4, 2, 2)]


def test_conv_contrast_gradient_is_on_channel_means():
    net = build_model(ModelConfig("cnn", 2, 4), (1, 8, 8), 3, seed=0)
    rule = make_rule("tpsgd", net, sgd, 3, seed=0, loss="contrast")
    a = torch.randn(5, 4, 4, 4, requires_grad=True)  # (B, C, H, W)
    y1 = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    root, grad = rule.hidden_signal(0, a, y1, 0.5)
    root.backward(grad)
    proj = rule.projections[0].matrix()  # (K, C)
    a2 = a.detach().clone().requires_grad_(True)
    (0.5 * F.cross_entropy(a2.mean(dim=(2, 3)) @ proj.T, y1.argmax(1))).backward()
    torch.testing.assert_close(a.grad, a2.grad)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_remember_bias_shifts_only_the_keep_gate_bias(cell):
    # torch's gate layout: GRU r|z|n, LSTM i|f|g|o; the keep gate (z / f) is rows H:2H of bias_ih
    plain = build_model(ModelConfig("rnn", 2, 5, rnn_cell=cell), (1, 4, 3), 4, seed=0)
    biased = build_model(ModelConfig("rnn", 2, 5, rnn_cell=cell, remember_bias=2.5), (1, 4, 3), 4, seed=0)
    b0, b1 = plain.blocks[0].cell.bias_ih.detach(), biased.blocks[0].cell.bias_ih.detach()
    torch.testing.assert_close(b1[5:10], b0[5:10] + 2.5)
    torch.testing.assert_close(torch.cat([b1[:5], b1[10:]]), torch.cat([b0[:5], b0[10:]]))
    torch.testing.assert_close(biased.blocks[0].cell.weight_ih, plain.blocks[0].cell.weight_ih)


def test_remember_bias_makes_the_gru_keep_its_state():
    # h' = (1 - z) n + z h: with a large update-gate bias z -> 1 and the state barely moves
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    for bias, close in ((0.0, False), (2.5, False), (30.0, True)):
        torch.manual_seed(0)
        blk = build_model(ModelConfig("rnn", 2, 6, remember_bias=bias), (1, 2, 4), 3, seed=0).blocks[0]
        out, _ = blk.step(x, h)
        assert torch.allclose(out, h, atol=1e-6) is close
        c = blk.cell  # the GRU formula with the shifted bias, written out
        gi, gh = x @ c.weight_ih.T + c.bias_ih, h @ c.weight_hh.T + c.bias_hh  # (B, 3H)
        r = torch.sigmoid(gi[:, :6] + gh[:, :6])
        z = torch.sigmoid(gi[:, 6:12] + gh[:, 6:12])
        n = torch.tanh(gi[:, 12:] + r * gh[:, 12:])
        torch.testing.assert_close(out, (1 - z) * n + z * h)
        if bias == 2.5:  # the update gate opens further towards keeping h than at bias 0
            assert (z > 0.75).float().mean() > 0.8


def test_remember_bias_needs_a_gated_recurrent_cell():
    with pytest.raises(LocalTrainingError, match="gated cell"):
        ModelConfig("rnn", 2, 5, rnn_cell="elman", remember_bias=1.0).validate()
    with pytest.raises(LocalTrainingError, match="gated cell"):
        ModelConfig("mlp", 2, 5, remember_bias=1.0).validate()
