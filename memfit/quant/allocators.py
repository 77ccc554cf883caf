"""The six allocators, each turning a model and a calibration set into per-layer weight (and activation) bits.

They share quantizers, calibration and the knapsack of allocate.py; only the cost of giving layer l b bits
differs:
- lrp:         contribution score (scores.py) x relative weight distortion ||Q_b(W) - W||^2 / ||W||^2
- lrp-zplus:   the same, with the scores from LRP's bounded rule set (lrp.py, rules="zplus": z+ rule for the
               linear layers, residual additions split by magnitude). lrp's epsilon rules are numerically
               unstable on trained models: their absolute relevance grows ~10x per block towards the input, so
               the scores rank layers by depth rather than by contribution (docs/quant.md).
- sensitivity: KL(fp || model with only layer l quantized to b bits) on the calibration set (Mix-QViT)
- hessian:     Tr(H_l) / n_l x ||Q_b(W) - W||^2, the trace by Hutchinson's estimator (HAWQ-V2)
- context:     the measured in-context damage: KL(fp || the uniform body with only layer l moved to b bits) minus
               KL(fp || the uniform body), widths within one step of the body's (context.py; Mix-QViT measures
               sensitivity "keeping other layers at a baseline", where `sensitivity` keeps them in FP32)
- random:      a seeded U(0,1) importance x relative distortion (spends the budget, ignores the model)
- uniform:     the widest single width that fits
Activation bits (when not fixed) are allocated per activation group (act_groups.py): a layer's width sets its
input's quantizer and, for qkv, also q/k/v and the post-softmax probabilities. Cost: the same importance x the
group's measured relative distortion at b bits (sensitivity: the measured KL of quantizing that group alone;
hessian: its importance Tr(H_l)/n_l as a weight-derived layer importance); the average is weighted by the
group's elements per image. The patch embedding and the heads stay at 8 bits and count toward both averages.
Every cost is taken on the model as it will be quantized: with clipped channel-wise post-LayerNorm activations
(the default) that is the copy with the channel ranges folded in, whose qkv / fc1 weights are W diag(r1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .act_groups import act_groups, group_sensitivity, group_sizes
from .allocate import average_bits, solve_knapsack, uniform_bits
from .errors import QuantError
from .lrp import quantizable_layers
from .qmodel import folded_copy
from .quantizers import BIT_CHOICES, fake_quant_weight

ALLOCATORS = ("lrp", "lrp-zplus", "sensitivity", "hessian", "context", "uniform", "random")
FIXED_BITS = 8
_FIXED_NAMES = ("patch_embed.proj", "head", "head_dist", "head.fc")


@dataclass
class Allocation:
    allocator: str
    weight_bits: dict[str, int]
    act_bits: dict[str, int]
    avg_weight_bits: float
    avg_act_bits: float
    importance: dict[str, float] = field(default_factory=dict)  # the allocator's per-layer signal
    seconds: float = 0.0  # time to compute the costs and solve


def _rel_distortion(w: torch.Tensor, bits: int) -> float:
    return float((fake_quant_weight(w, bits) - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def _kl(model: nn.Module, x: torch.Tensor, ref_logp: torch.Tensor) -> float:
    logp = F.log_softmax(model(x), -1)
    return float(F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean"))


def hutchinson_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], iters: int = 16,
                     seed: int = 0) -> dict[str, float]:
    """Tr(H) of the cross-entropy loss w.r.t. each named layer's weight: E[v^T H v], v Rademacher."""
    layers = quantizable_layers(model)
    weights = [layers[n].weight for n in names]
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    for m in fused:
        m.fused_attn = False  # double backward through the explicit attention path
    gen = torch.Generator().manual_seed(seed)
    traces = torch.zeros(len(names), dtype=torch.float64)
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for _ in range(iters):
                vs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w.dtype) for w in weights]
                hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=True)
                traces += torch.tensor([float((h * v).sum()) for h, v in zip(hv, vs)], dtype=torch.float64)
    finally:
        for m, flag in fused.items():
            m.fused_attn = flag
        model.zero_grad(set_to_none=True)
    return dict(zip(names, (traces / iters).tolist()))


def _sensitivity(model, x, names, layers) -> dict[str, dict[int, float]]:
    """KL of quantizing one layer's weights alone, at every width (activations: act_groups.group_sensitivity)."""
    with torch.no_grad():
        ref = F.log_softmax(model(x), -1)
    costs: dict[str, dict[int, float]] = {}
    for name in names:
        layer = layers[name]
        costs[name] = {}
        original = layer.weight.detach().clone()
        for b in BIT_CHOICES:
            with torch.no_grad():
                layer.weight.copy_(fake_quant_weight(original, b))
            try:
                costs[name][b] = _kl(model, x, ref)
            finally:
                with torch.no_grad():
                    layer.weight.copy_(original)
    return costs


def floor_width(avg_bits: float) -> int:
    """The widest width within `avg_bits` (the smallest width if none is)."""
    return max((b for b in BIT_CHOICES if b <= avg_bits + 1e-9), default=min(BIT_CHOICES))


def around(width: int) -> tuple[int, ...]:
    """`width` and its neighbours in BIT_CHOICES: the widths the `context` allocator measures and chooses from."""
    i = BIT_CHOICES.index(width)
    return BIT_CHOICES[max(0, i - 1):i + 2]


def uniform_budget(model: nn.Module, avg_bits: float) -> float:
    """The average weight bits spent when every free layer takes the widest width <= `avg_bits`, the 8-bit fixed
    layers counted. `uniform` under `avg_bits` itself must come in under it, so on a model whose fixed layers are
    a small share it drops a whole width (W4 -> 3-bit body); benchmarks give it this budget instead, which puts
    its body at that width, as uniform W4A4 means in the papers (RepQ-ViT, LRP-QViT), and spends a little more
    than the mixed allocators."""
    layers = quantizable_layers(model)
    width = floor_width(avg_bits)
    sizes = {n: layers[n].weight.numel() for n in layers if n not in _FIXED_NAMES}
    fixed = {n: (layers[n].weight.numel(), FIXED_BITS) for n in layers if n in _FIXED_NAMES}
    return average_bits({n: width for n in sizes}, sizes, fixed)


def allocate_bits(model: nn.Module, allocator: str, avg_bits: float, calib_x: torch.Tensor, calib_y: torch.Tensor,
                  act_bits: int | None = None, avg_act_bits: float | None = None, seed: int = 0,
                  attention: str = "cp", cache: dict | None = None, channelwise: bool = True) -> Allocation:
    """Per-layer bits for `model` under `avg_bits` (and `act_bits` fixed, or allocated under `avg_act_bits`).

    `channelwise`: the costs are taken on the model as `quantize_model` will quantize it, i.e. with the clipped
    channel-wise post-LayerNorm ranges of `calib_x` folded in (qmodel.folded_copy). The folding computes the same
    function but changes the weights of qkv / fc1 / reduction to W diag(r1), and those are what the weight
    quantizer rounds; False: the weights as they are (the per-tensor mode, which folds nothing).
    `cache`: a dict the caller keeps for one model and one calibration set; the costs (scores, traces,
    sensitivities, distortions), which do not depend on the budget, are computed once into it and reused by
    later calls at other budgets. `seconds` then counts only this call's work."""
    memo = cache if cache is not None else {}

    def once(key: tuple, compute):
        key = (channelwise, *key)  # the folded and the unfolded model have different costs
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    if allocator not in ALLOCATORS:
        raise QuantError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    if (act_bits is None) == (avg_act_bits is None):
        raise QuantError("give either --act-bits (every activation at that width) or --avg-act-bits (allocated)")
    t0 = time.perf_counter()
    model.eval()
    fp = model  # activation groups are measured on the FP model: the folded copy computes the same function
    if channelwise:
        model = once(("folded",), lambda: folded_copy(model, calib_x))
    layers = quantizable_layers(model)
    fixed = [n for n in layers if n in _FIXED_NAMES]
    free = [n for n in layers if n not in fixed]
    w_sizes = {n: layers[n].weight.numel() for n in layers}
    # elements per image each layer's activation width quantizes (its input; for qkv also q/k/v and the softmax)
    a_sizes = once(("a_sizes",), lambda: group_sizes(fp, calib_x[:1]))
    w_fixed = {n: (w_sizes[n], FIXED_BITS) for n in fixed}
    a_fixed = {n: (a_sizes[n], FIXED_BITS) for n in fixed}
    w_free_sizes = {n: w_sizes[n] for n in free}
    a_free_sizes = {n: a_sizes[n] for n in free}
    w_dist = once(("w_dist",), lambda: {n: {b: _rel_distortion(layers[n].weight.detach(), b) for b in BIT_CHOICES}
                                         for n in free})
    a_dist = None
    if act_bits is None:
        a_dist = once(("a_dist",), lambda: act_groups(fp, calib_x[:64], free, channelwise).dist)
    importance: dict[str, float] = {}
    if allocator in ("lrp", "lrp-zplus"):
        from .scores import contribution_scores

        rules = "zplus" if allocator == "lrp-zplus" else "epsilon"
        scores = once(("lrp", attention, rules),
                      lambda: contribution_scores(model, calib_x, calib_y, attention=attention, rules=rules))
        importance = {n: v for n, v in scores.mean.items() if n in free}
    elif allocator == "random":
        gen = torch.Generator().manual_seed(seed)
        importance = dict(zip(free, torch.rand(len(free), generator=gen).tolist()))
    elif allocator == "hessian":
        trace = once(("hessian", seed),
                     lambda: hutchinson_trace(model, calib_x[:128], calib_y[:128], free, seed=seed))
        importance = {n: trace[n] / w_sizes[n] for n in free}
    elif allocator == "context":
        from .context import context_damage

        w0 = floor_width(avg_bits)
        a0 = act_bits if act_bits is not None else floor_width(avg_act_bits)
        a_widths = around(a0) if act_bits is None else ()
        damage = once(("context", w0, a0, a_widths),
                      lambda: context_damage(fp, calib_x, {n: w0 for n in free}, {n: a0 for n in free}, around(w0),
                                             a_widths, channelwise=channelwise, fixed_bits=FIXED_BITS))
        importance = {n: damage["weights"][n][min(around(w0))] for n in free}
    if allocator == "uniform":
        wb = uniform_bits(w_free_sizes, avg_bits, w_fixed)
    elif allocator == "sensitivity":
        w_cost = once(("sensitivity", "weights"),
                      lambda: _sensitivity(model, calib_x[:128], free, layers))
        importance = {n: w_cost[n][min(BIT_CHOICES)] for n in free}
        wb = solve_knapsack(w_cost, w_free_sizes, avg_bits, w_fixed)
    elif allocator == "context":
        wb = solve_knapsack(damage["weights"], w_free_sizes, avg_bits, w_fixed)
    elif allocator == "hessian":
        # relative distortion x ||W||^2 = HAWQ's absolute ||Q(W) - W||^2
        sq = {n: float(layers[n].weight.detach().pow(2).sum()) for n in free}
        wb = solve_knapsack({n: {b: importance[n] * w_dist[n][b] * sq[n] for b in BIT_CHOICES} for n in free},
                            w_free_sizes, avg_bits, w_fixed)
    else:
        wb = solve_knapsack({n: {b: importance[n] * w_dist[n][b] for b in BIT_CHOICES} for n in free},
                            w_free_sizes, avg_bits, w_fixed)
    if act_bits is not None:
        ab = {n: act_bits for n in free}
    elif allocator == "uniform":
        ab = uniform_bits(a_free_sizes, avg_act_bits, a_fixed, what="--avg-act-bits")
    elif allocator == "sensitivity":
        a_cost = once(("sensitivity", "acts"), lambda: group_sensitivity(fp, calib_x[:128], free, channelwise))
        ab = solve_knapsack(a_cost, a_free_sizes, avg_act_bits, a_fixed, what="--avg-act-bits")
    elif allocator == "context":
        ab = solve_knapsack(damage["acts"], a_free_sizes, avg_act_bits, a_fixed, what="--avg-act-bits")
    else:
        ab = solve_knapsack({n: {b: importance[n] * a_dist[n][b] for b in BIT_CHOICES} for n in free},
                            a_free_sizes, avg_act_bits, a_fixed, what="--avg-act-bits")
    weight_bits = {n: wb.get(n, FIXED_BITS) for n in layers}
    acts_bits = {n: ab.get(n, FIXED_BITS) for n in layers}
    return Allocation(allocator, weight_bits, acts_bits,
                      average_bits(wb, w_free_sizes, w_fixed), average_bits(ab, a_free_sizes, a_fixed),
                      importance, time.perf_counter() - t0)

