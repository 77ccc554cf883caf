"""Saved-tensor accounting on models whose sizes are known exactly."""
import torch
from torch import nn

from memfit.train.local.memory import TrainingMemoryMeter, optimizer_state_bytes, unique_bytes
from memfit.train.local.models import ModelConfig, build_model
from memfit.train.local.rules import make_rule
from memfit.train.local.trainer import TrainConfig, train

F32 = 4


def linear_relu_stack(dims):
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def test_backprop_saves_every_layer_input_once():
    batch, dims = 8, [5, 7, 6, 3]
    net = linear_relu_stack(dims)
    meter = TrainingMemoryMeter(net)
    with meter:
        out = net(torch.randn(batch, dims[0]))
        # Linear i saves its input (B, D_i); ReLU saves its output, which is the next Linear's input: one
        # storage. Weights are not counted (they are parameters). Sum of the inputs of the 3 layers:
        assert meter.saved_bytes == F32 * batch * sum(dims[:-1])
        out.sum().backward()
    assert meter.saved_bytes == 0  # graph freed -> un-counted
    params = sum(p.numel() for p in net.parameters()) * F32
    assert meter.grad_bytes() == params
    assert meter.peak_saved == F32 * batch * sum(dims[:-1])
    assert meter.peak_saved <= meter.peak_overhead <= meter.peak_saved + params


def test_views_of_one_storage_count_once_and_params_are_excluded():
    w = nn.Parameter(torch.randn(4, 4))
    holder = nn.Module()
    holder.w = w
    meter = TrainingMemoryMeter(holder)
    x = torch.randn(4, 4)
    with meter:
        y = (x[:2] * w[:2]).sum() + (x[2:] * w[2:]).sum()  # two views of x saved, and views of w
        assert meter.saved_bytes == 16 * F32
    y.backward()
    assert meter.saved_bytes == 0


def test_local_rule_peak_is_one_block_for_known_mlp():
    # (1, 8, 8) images -> 64 inputs -> hidden 32 -> hidden 32 -> 10 classes
    batch = 16
    net = build_model(ModelConfig("mlp", 3, 32), (1, 8, 8), 10, seed=0)
    rule = make_rule("tpsgd", net, lambda p: torch.optim.SGD(p, lr=0.1), 10, seed=0)
    meter = TrainingMemoryMeter(net)
    with meter:
        rule.train_step(torch.randn(batch, 1, 8, 8), torch.arange(batch) % 10)
    # fused Linear+ReLU step: block 0 saves only its input (B, 64), the one-hot labels (B, 10) and P_0 (10, 32)
    # (the ReLU output is recomputed in backward); block 1: (B, 32) + (B, 10) + (10, 32);
    # head: input (B, 32), log-softmax (B, 10), int64 labels (B,) and one fp32 scalar weight.
    hidden_peak = F32 * (batch * max(64, 32) + batch * 10 + 10 * 32)
    head_saved = F32 * batch * (32 + 10) + 8 * batch + F32
    assert meter.peak_saved == max(hidden_peak, head_saved)
    # gradients never pile up: at most one block's worth is alive (+ what that block still saves)
    biggest_block = max(unique_bytes(list(b.parameters())) for b in list(net.blocks) + [net.head])
    assert meter.peak_overhead <= meter.peak_saved + biggest_block


def test_backprop_overhead_grows_with_depth_tpsgd_does_not():
    def peak(method, depth):
        net = build_model(ModelConfig("mlp", depth, 64), (1, 8, 8), 10, seed=0)
        rule = make_rule(method, net, lambda p: torch.optim.SGD(p, lr=0.1), 10, seed=0)
        meter = TrainingMemoryMeter(net)
        with meter:
            rule.train_step(torch.randn(512, 1, 8, 8), torch.arange(512) % 10)
        return meter.peak_overhead

    bp2, bp6 = peak("bp", 2), peak("bp", 6)
    tp2, tp6 = peak("tpsgd", 2), peak("tpsgd", 6)
    assert bp6 > 2 * bp2  # four more saved (512, 64) activations
    assert tp6 == tp2  # still one block at a time
    assert tp6 < bp6 / 2


def test_train_reports_consistent_totals(digits):
    r = train(TrainConfig(dataset="digits", model="mlp", method="tpsgd", epochs=1, batch_size=64, max_steps=3),
              data=digits)
    m = r.memory
    assert r.peak_training_bytes == (m["peak_overhead_bytes"] + m["param_bytes"] + m["optimizer_state_bytes"]
                                     + m["extra_state_bytes"])
    # Adam: exp_avg + exp_avg_sq per parameter tensor, plus one 4-byte 'step' scalar per tensor (6 tensors)
    assert m["optimizer_state_bytes"] == 2 * m["param_bytes"] + 6 * F32
    assert m["extra_state_bytes"] == 10 * (256 + 256) * F32  # two stored projections (K=10, D=256)
    assert r.peak_rss_bytes > m["param_bytes"]


def test_optimizer_state_bytes_counts_adam_moments():
    p = nn.Parameter(torch.zeros(10, 10))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    # exp_avg, exp_avg_sq: 2 x 400 bytes, plus the 'step' scalar tensor (4 bytes)
    assert optimizer_state_bytes([opt]) == 2 * 400 + opt.state[p]["step"].numel() * opt.state[p]["step"].element_size()


def test_graphs_never_backwarded_are_freed_not_leaked():
    """A recurrent step whose loss weight is 0 builds a graph nobody backwards; the meter must not keep it
    alive (a pack hook that holds a saved output itself makes a cycle no gc can break)."""
    cell = nn.GRUCell(8, 16)
    meter = TrainingMemoryMeter(cell)
    with meter:
        h = torch.zeros(4, 16)
        out = cell(torch.randn(4, 8), h)
        one_step = meter.saved_bytes
        for _ in range(20):
            out = cell(torch.randn(4, 8), out.detach())
        assert 0 < meter.saved_bytes <= one_step  # only the last step's graph is alive
    del out
    assert meter.saved_bytes == 0
