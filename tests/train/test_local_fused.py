"""The lean fused Linear+activation local step: same update as plain autograd, less saved for backward."""
import pytest
import torch

from memfit.train.local.errors import LocalTrainingError
from memfit.train.local.fused import linear_activation, local_linear_step
from memfit.train.local.memory import TrainingMemoryMeter
from memfit.train.local.models import ModelConfig, build_model
from memfit.train.local.rules import make_rule, time_weights

F32 = 4


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def one_step(method, loss, activation, fused, seed=0):
    net = build_model(ModelConfig("mlp", 4, 12, activation), (1, 4, 5), 6, seed)
    rule = make_rule(method, net, sgd, 6, seed=5, loss=loss, fused=fused)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 1, 4, 5, generator=g), torch.randint(0, 6, (9,), generator=g)
    for _ in range(2):  # second step: inputs of later blocks come from already-updated blocks
        rule.train_step(x, y)
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("method,loss", [("tpsgd", "ce"), ("tpsgd", "mse"), ("tpsgd", "l1"), ("tpsgd", "contrast"),
                                         ("drtp", "ce")])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_fused_update_equals_autograd_update(method, loss, activation):
    fused = one_step(method, loss, activation, fused=True)
    plain = one_step(method, loss, activation, fused=False)
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)


def test_fused_step_returns_local_loss_and_activation_without_graph():
    lin = torch.nn.Linear(3, 4)
    x, y1 = torch.randn(5, 3), torch.nn.functional.one_hot(torch.arange(5) % 2, 2).float()
    proj = torch.randn(2, 4)
    loss, a = local_linear_step(lin, "relu", x, y1, proj, "mse")
    assert not a.requires_grad and a.grad_fn is None
    expected_a = torch.relu(lin(x)).detach()
    torch.testing.assert_close(a, expected_a)
    torch.testing.assert_close(loss.detach(), 0.5 * (expected_a - y1 @ proj).pow(2).sum(1).mean())
    loss.backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None


def test_fused_only_for_plain_linear_activation_blocks():
    assert linear_activation(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())) is not None
    assert linear_activation(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GELU())) is None
    assert linear_activation(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())) is None
    with pytest.raises(LocalTrainingError):
        local_linear_step(torch.nn.Linear(2, 3), "relu", torch.randn(1, 2), torch.ones(1, 1), torch.ones(1, 3), "kl")


def peak(method, fused, depth=5, width=128, batch=512):
    net = build_model(ModelConfig("mlp", depth, width), (1, 8, 8), 10, seed=0)
    rule = make_rule(method, net, sgd, 10, seed=0, fused=fused)
    meter = TrainingMemoryMeter(net)
    with meter:
        rule.train_step(torch.randn(batch, 1, 8, 8), torch.arange(batch) % 10)
    return meter


def test_fused_saves_only_the_block_input():
    width, batch = 128, 512
    fused, plain, bp = peak("tpsgd", True), peak("tpsgd", False), peak("bp", True)
    # plain autograd: a middle block saves its input and its ReLU output, (B, W) each
    assert plain.peak_saved >= 2 * F32 * batch * width
    # fused: the (B, W) input + one-hot labels (B, 10) + P (10, W); nothing of the block's own output
    assert fused.peak_saved == F32 * (batch * width + batch * 10 + 10 * width)
    assert fused.peak_overhead < plain.peak_overhead
    # bp keeps the 64-wide input and four (B, 128) activations: tpSGD's one block is under a third of it
    assert fused.peak_overhead <= bp.peak_overhead / 3


def test_time_weights():
    for kind in ("square", "linear", "uniform", "last"):
        w = time_weights(kind, 6)
        assert len(w) == 6 and abs(sum(w) - 1) < 1e-12
        assert all(b >= a for a, b in zip(w, w[1:]))  # later steps never weigh less
    assert time_weights("last", 4) == [0.0, 0.0, 0.0, 1.0]
    assert time_weights("square", 2) == [0.2, 0.8]
    with pytest.raises(LocalTrainingError):
        time_weights("cubic", 3)


def test_dfa_rnn_last_step_weighting_keeps_only_last_step_graphs():
    net = build_model(ModelConfig("rnn", 3, 4), (1, 8, 8), 4, seed=0)
    rule = make_rule("dfa", net, sgd, 4, seed=0, time_weighting="last")
    seen = []
    original = rule._feedback

    def spy(outs, logits, y):
        seen.extend(w for _, _, w in outs)
        original(outs, logits, y)

    rule._feedback = spy
    rule.train_step(torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0]))
    assert seen == [1.0, 1.0]  # two blocks, final step only


def test_target_scale_scales_projection():
    net = build_model(ModelConfig("mlp", 3, 8), (1, 2, 2), 3, seed=0)
    r1 = make_rule("tpsgd", net, sgd, 3, seed=0)
    r3 = make_rule("tpsgd", net, sgd, 3, seed=0, target_scale=3.0)
    torch.testing.assert_close(r3.projections[0].matrix(), 3.0 * r1.projections[0].matrix())
    with pytest.raises(LocalTrainingError):
        make_rule("tpsgd", net, sgd, 3, seed=0, target_scale=0.0)


@pytest.mark.parametrize("window,loss", [(1, "mse"), (2, "mse"), (5, "mse"), (1, "contrast"), (5, "contrast")])
def test_rnn_window_update_equals_truncated_bptt_inside_the_layer(window, loss):
    """tpSGD on one Elman layer: window k = gradient of the weighted local losses with the state detached
    every k steps (k = T = 5: full backprop through time inside the layer, k = 1: none)."""
    import copy

    from memfit.train.local.losses import local_loss

    net = build_model(ModelConfig("rnn", 2, 4, rnn_cell="elman"), (1, 5, 3), 4, seed=0)
    ref = copy.deepcopy(net.blocks[0])
    rule = make_rule("tpsgd", net, sgd, 4, seed=3, loss=loss, time_weighting="linear", rnn_window=window)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 1, 5, 3, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    seq = net.prepare(x)  # (B, T=5, F=3)
    y1 = torch.nn.functional.one_hot(y, 4).float()  # (B, K)
    target, proj = rule.projections[0].project(y1), rule.projections[0].matrix()  # (B, 4), (K, 4)
    weights = time_weights("linear", 5)
    state, total = ref.init_state(6, seq), 0.0
    for t in range(5):
        h, state = ref.step(seq[:, t], state)
        total = total + weights[t] * local_loss(loss, h, target, proj, y1)
        if (t + 1) % window == 0:
            state = state.detach()
    grads = torch.autograd.grad(total, list(ref.parameters()))
    rule.train_step(x, y)
    for p_new, p_old, grad in zip(net.blocks[0].parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p_new.detach(), p_old.detach() - 0.1 * grad)


def test_dfa_rnn_window_trains_and_bad_window_is_an_error():
    net = build_model(ModelConfig("rnn", 2, 4), (1, 6, 3), 4, seed=0)
    rule = make_rule("dfa", net, sgd, 4, seed=0, rnn_window=3)
    before = [p.detach().clone() for p in net.blocks[0].parameters()]
    rule.train_step(torch.randn(5, 1, 6, 3), torch.tensor([0, 1, 2, 3, 0]))
    assert any(not torch.equal(b, p) for b, p in zip(before, net.blocks[0].parameters()))
    with pytest.raises(LocalTrainingError):
        make_rule("tpsgd", net, sgd, 4, seed=0, rnn_window=0)


def test_rnn_window_holds_one_layer_at_a_time():
    """3 GRU layers: with BPTT inside each layer (window = T) tpSGD keeps one layer's sequence graph alive, bp
    all three, DFA all three (its error exists only after the last layer)."""
    def overhead(method, window):
        net = build_model(ModelConfig("rnn", 4, 16), (1, 8, 8), 4, seed=0)
        rule = make_rule(method, net, sgd, 4, seed=0, rnn_window=window)
        meter = TrainingMemoryMeter(net)
        with meter:
            rule.train_step(torch.randn(32, 1, 8, 8), torch.arange(32) % 4)
        return meter.peak_overhead

    bp, tp_full, tp_none, dfa_full = overhead("bp", 1), overhead("tpsgd", 8), overhead("tpsgd", 1), overhead("dfa", 8)
    assert tp_none < tp_full < bp / 2
    assert dfa_full > 2 * tp_full


def test_rnn_layer_major_order_gives_the_time_major_update():
    """Window 1 runs time-major, windows > 1 layer-major; the order alone must not change the update, so the
    layer-major path run with window 1 matches the time-major one (and a window of T really differs)."""
    def setup(window):
        net = build_model(ModelConfig("rnn", 3, 5, rnn_cell="gru"), (1, 4, 3), 4, seed=0)
        rule = make_rule("tpsgd", net, sgd, 4, seed=1, time_weighting="linear", rnn_window=window)
        g = torch.Generator().manual_seed(3)
        return net, rule, torch.randn(6, 1, 4, 3, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])

    net, rule, x, y = setup(1)
    rule.train_step(x, y)  # time-major
    ref = [p.detach().clone() for p in net.parameters()]
    net, rule, x, y = setup(1)
    rule._recurrent_layer_major(net.prepare(x), y, torch.nn.functional.one_hot(y, 4).float())
    for a, b in zip(ref, net.parameters()):
        torch.testing.assert_close(a, b.detach())
    net, rule, x, y = setup(4)
    rule.train_step(x, y)
    assert not all(torch.equal(a, b) for a, b in zip(ref, net.parameters()))
