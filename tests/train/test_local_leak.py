"""Leak-path credit for GRU layers (leak.py) and the region targets of conv blocks (conv_grid)."""
import pytest
import torch
import torch.nn.functional as F

from memfit.train.local.errors import LocalTrainingError
from memfit.train.local.leak import leak_credit_step, update_gate
from memfit.train.local.memory import TrainingMemoryMeter
from memfit.train.local.models import ModelConfig, build_model
from memfit.train.local.rules import make_rule


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def rnn(depth=3, width=6, remember_bias=1.0, seed=0):
    # images (1, 5, 4): 5 time steps of 4 features, `depth - 1` GRU layers of `width`
    return build_model(ModelConfig("rnn", depth, width, remember_bias=remember_bias), (1, 5, 4), 3, seed)


def leak_step_reference(blk, x, h):
    """GRU step whose only path from h_{t-1} to h_t is the leak z * h_{t-1} (gates and candidate read it
    detached): backprop through time over it is what leak credit computes without keeping the graph."""
    c, n = blk.cell, blk.hidden
    hd = h.detach()
    gi, gh = F.linear(x, c.weight_ih, c.bias_ih), F.linear(hd, c.weight_hh, c.bias_hh)  # (B, 3H)
    r, z = torch.sigmoid(gi[:, :n] + gh[:, :n]), torch.sigmoid(gi[:, n:2 * n] + gh[:, n:2 * n])
    cand = torch.tanh(gi[:, 2 * n:] + r * gh[:, 2 * n:])
    return (1 - z) * cand + z * h


def test_leak_credit_equals_backprop_through_the_leak_path_only():
    net = rnn()
    seq = torch.randn(4, 5, 4, generator=torch.Generator().manual_seed(1))  # (B, T, F)
    signals = [torch.randn(4, 6, generator=torch.Generator().manual_seed(2 + i)) for i in range(2)]  # dL/dh_T
    blocks = list(net.blocks)
    last = leak_credit_step(blocks, seq, lambda hs: signals, lambda i, out, g: out.backward(g))
    got = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    inp = [seq[:, t] for t in range(5)]
    for i, blk in enumerate(blocks):  # reference: full graph over time along the leak, none across layers
        h = blk.init_state(4, seq)
        outs = []
        for t in range(5):
            h = leak_step_reference(blk, inp[t].detach(), h)
            outs.append(h)
        (h * signals[i]).sum().backward()
        inp = [o.detach() for o in outs]
    torch.testing.assert_close(last, inp[-1])
    want = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and not any(k.startswith("head") for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_leak_credit_differs_from_one_step_credit():
    # with loss at the last step only, one-step credit trains only step T; the leak reaches earlier steps
    seq, y = torch.randn(4, 1, 5, 4), torch.tensor([0, 1, 2, 0])
    grads = {}
    for credit in ("step", "leak"):
        net = rnn(depth=2)
        rule = make_rule("tpsgd", net, sgd, 3, seed=0, loss="contrast", time_weighting="last", rnn_credit=credit)
        rule.step_layer = lambda i: None  # keep the gradients to compare them
        rule.train_step(seq, y)
        grads[credit] = net.blocks[0].cell.weight_ih.grad.clone()
    assert not torch.allclose(grads["step"], grads["leak"])


def test_update_gate_is_the_gru_z():
    blk = rnn(depth=2).blocks[0]
    x, h = torch.randn(3, 4), torch.randn(3, 6)
    z = update_gate(blk.cell, x, h)  # (B, H)
    c, n = blk.cell, blk.hidden
    gi, gh = F.linear(x, c.weight_ih, c.bias_ih), F.linear(h, c.weight_hh, c.bias_hh)
    cand = torch.tanh(gi[:, 2 * n:] + torch.sigmoid(gi[:, :n] + gh[:, :n]) * gh[:, 2 * n:])
    out = blk.step(x, h)[0]
    torch.testing.assert_close(out, (1 - z) * cand + z * h)  # torch's GRU with this z
    torch.testing.assert_close(leak_step_reference(blk, x, h), out)  # same forward as the GRU


@pytest.mark.parametrize("method", ["tpsgd", "drtp", "dfa"])
def test_leak_credit_keeps_window_one_memory(method):
    seq, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    peaks = {}
    for name, opts in {"step": dict(rnn_window=1), "leak": dict(rnn_credit="leak"),
                       "bptt": dict(rnn_window=28)}.items():
        net = build_model(ModelConfig("rnn", 2, 32), (1, 28, 28), 10, seed=0)
        rule = make_rule(method, net, sgd, 10, seed=0, time_weighting="last", **opts)
        meter = TrainingMemoryMeter(net)
        with meter:
            loss, logits = rule.train_step(seq, y)
        assert logits.shape == (32, 10) and loss > 0
        peaks[name] = meter.report(rule.optimizers).peak_overhead_bytes
    assert peaks["leak"] <= 1.05 * peaks["step"]
    assert 3 * peaks["leak"] < peaks["bptt"]


@pytest.mark.parametrize("opts, match", [
    (dict(rnn_window=7), "rnn-window 1"),
    (dict(time_weighting="square"), "time-weighting last"),
    (dict(method="bp"), "local rule"),
    (dict(cell="lstm"), "rnn-cell gru"),
    (dict(credit="sideways"), "unknown rnn credit"),
])
def test_leak_credit_rejects_what_it_cannot_do(opts, match):
    net = build_model(ModelConfig("rnn", 2, 4, rnn_cell=opts.get("cell", "gru")), (1, 3, 3), 3, seed=0)
    kwargs = dict(time_weighting="last", rnn_credit=opts.get("credit", "leak"))
    kwargs.update({k: v for k, v in opts.items() if k in ("rnn_window", "time_weighting")})
    with pytest.raises(LocalTrainingError, match=match):
        make_rule(opts.get("method", "tpsgd"), net, sgd, 3, seed=0, **kwargs)


def test_conv_grid_targets_region_means():
    net = build_model(ModelConfig("cnn", 3, 4), (1, 8, 8), 3, seed=0)
    rule = make_rule("tpsgd", net, sgd, 3, seed=0, loss="contrast", conv_grid=2)
    assert [p.out_shape for p in rule.projections] == [(4, 2, 2), (4, 2, 2)]
    a = torch.randn(5, 4, 4, 4, requires_grad=True)  # (B, C, H, W)
    y1 = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    root, grad = rule.hidden_signal(0, a, y1, 0.5)
    root.backward(grad)
    proj = rule.projections[0].matrix()  # (K, C * 2 * 2)
    a2 = a.detach().clone().requires_grad_(True)
    scores = F.adaptive_avg_pool2d(a2, 2).flatten(1) @ proj.T  # (B, K): quadrant means scored
    (0.5 * F.cross_entropy(scores, y1.argmax(1))).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    with pytest.raises(LocalTrainingError, match="conv-grid"):
        make_rule("tpsgd", net, sgd, 3, seed=0, conv_grid=0)
