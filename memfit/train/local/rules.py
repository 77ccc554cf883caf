"""Learning rules behind one interface: backprop, tpSGD, DRTP and DFA.

All rules train the same `LocalNet` with one optimizer per block (plus one for the head), so "a layer's
update as soon as its forward pass is done" is a plain `optimizers[i].step()`.

- bp: the usual loss.backward() through the whole stack.
- tpsgd (target projection SGD): hidden block i sees its input detached and minimises a local loss
  L(a_i, P_i y*) against a fixed random projection of the one-hot label; its optimizer steps right away.
  The loss is ce, mse or l1 against P_i y*, or contrast: cross-entropy of the scores a_i . P_i[c] against
  every class's projected target (`losses.py`), which stops pulling once the own class's target wins.
- drtp (direct random target projection): same, but the gradient at the block output is the projected
  target itself, dL/da_i = -P_i y* / B, whatever the output is.
- dfa (direct feedback alignment): dL/da_i = B_i e with e = softmax(logits) - y* the output error; e exists
  only after the full forward pass, so every block's local graph is kept until then.
The head always trains on the true cross-entropy, on a detached input for the local rules.
tpSGD and DRTP run Linear+ReLU/Tanh blocks through `fused.LocalLinearStep` (saves only the block input);
other blocks (conv, recurrent) through plain autograd on the block with a closed-form dL/da.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LocalTrainingError
from .fused import linear_activation, local_linear_step
from .leak import leak_credit_step
from .losses import DEFAULT_LOCAL_LOSS, LOCAL_LOSSES, local_loss, local_loss_grad  # noqa: F401 (re-exported)
from .models import LocalNet
from .recurrent import (  # noqa: F401 (TIME_WEIGHTINGS, time_weights re-exported)
    TIME_WEIGHTINGS, dfa_recurrent_outputs, local_layer_major, local_recurrent_step, time_weights,
)

METHODS = ("tpsgd", "bp", "drtp", "dfa")
RNN_CREDITS = ("step", "leak")  # recurrent local rules at window 1: one step, or the GRU's leak path (leak.py)
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class TargetProjection:
    """Fixed random matrix P (K, D), entries uniform in [-1, 1], drawn from a seeded generator.

    With `store=False` the matrix is regenerated from the seed at every use, so it costs no memory between
    steps (the point of the paper's seeded projections); with `store=True` it is kept (faster).
    """

    def __init__(self, num_classes: int, out_shape: tuple[int, ...], seed: int, store: bool = True,
                 scale: float = 1.0):
        self.num_classes, self.out_shape, self.seed, self.scale = num_classes, tuple(out_shape), seed, scale
        self.features = 1
        for s in self.out_shape:
            self.features *= s
        self._matrix = self._generate() if store else None

    def _generate(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return (torch.rand(self.num_classes, self.features, generator=g) * 2 - 1) * self.scale  # (K, D)

    def matrix(self) -> torch.Tensor:
        return self._matrix if self._matrix is not None else self._generate()

    @property
    def nbytes(self) -> int:
        return 0 if self._matrix is None else self._matrix.numel() * self._matrix.element_size()

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """v (B, K): one-hot labels or output errors -> (B, *out_shape) = v @ P."""
        return (v @ self.matrix().to(v.device, v.dtype)).view(v.shape[0], *self.out_shape)


def check_rule_options(method: str, loss: str, target_scale: float, time_weighting: str, rnn_window: int,
                       conv_grid: int, rnn_credit: str, gru_only: bool) -> None:
    """The one check of a rule's options (TrainConfig.validate runs it before any data loads, Rule on build).
    gru_only: every block is a GRU layer (what `rnn_credit="leak"` needs)."""
    if loss not in LOCAL_LOSSES:
        raise LocalTrainingError(f"unknown local loss {loss!r}; choose one of {', '.join(LOCAL_LOSSES)}")
    if not target_scale > 0:
        raise LocalTrainingError(f"--target-scale must be positive (got {target_scale})")
    time_weights(time_weighting, 1)  # validates the name
    if rnn_window < 1:
        raise LocalTrainingError(f"--rnn-window must be at least 1 (got {rnn_window})")
    if conv_grid < 1:
        raise LocalTrainingError(f"--conv-grid must be at least 1 (got {conv_grid})")
    if rnn_credit not in RNN_CREDITS:
        raise LocalTrainingError(f"unknown rnn credit {rnn_credit!r}; choose one of {', '.join(RNN_CREDITS)}")
    if rnn_credit == "leak" and (rnn_window != 1 or time_weighting != "last" or method == "bp" or not gru_only):
        raise LocalTrainingError("--rnn-credit leak needs --model rnn --rnn-cell gru, a local rule (tpsgd, "
                                 "drtp, dfa), --rnn-window 1 and --time-weighting last")


class Rule:
    """Base: per-block optimizers and the head update. `train_step(x, y)` returns (loss, logits).

    target_scale multiplies every projection P_i (the size of tpSGD's targets against the activations);
    time_weighting is how recurrent blocks weigh the local loss of each time step (`time_weights`);
    rnn_window: a recurrent block's state is detached every rnn_window steps (1: no backprop through time);
    fused: Linear+ReLU/Tanh blocks of tpSGD/DRTP take the lean one-node step of `fused.py`."""

    name = "base"

    def __init__(self, net: LocalNet, make_optimizer: OptimizerFactory, num_classes: int, seed: int,
                 loss: str = DEFAULT_LOCAL_LOSS, store_projections: bool = True, target_scale: float = 1.0,
                 time_weighting: str = "square", fused: bool = True, rnn_window: int = 1,
                 conv_grid: int = 1, rnn_credit: str = "step"):
        check_rule_options(self.name, loss, target_scale, time_weighting, rnn_window, conv_grid, rnn_credit,
                           gru_only=all(getattr(b, "cell_type", None) == "gru" for b in net.blocks))
        self.rnn_window, self.conv_grid, self.rnn_credit = rnn_window, conv_grid, rnn_credit
        self.net, self.num_classes, self.loss = net, num_classes, loss
        self.time_weighting, self.fused = time_weighting, fused
        self.optimizers = [make_optimizer(list(b.parameters())) for b in net.blocks]
        self.optimizers.append(make_optimizer(list(net.head.parameters())))
        # seed + 1000 * (i + 1): projections do not depend on the weight-init stream
        self.projections = [
            TargetProjection(num_classes, self.target_shape(shape), seed + 1000 * (i + 1), store_projections,
                             target_scale)
            for i, shape in enumerate(net.block_out_shapes)
        ] if self.uses_projections else []

    uses_projections = True

    @staticmethod
    def target_shape(out_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the projected target/feedback for a block with per-sample output `out_shape`."""
        return out_shape

    @property
    def extra_state_bytes(self) -> int:
        return sum(p.nbytes for p in self.projections)

    def step_layer(self, i: int) -> None:
        self.optimizers[i].step()
        self.optimizers[i].zero_grad(set_to_none=True)  # free the gradient now: it is part of the overhead

    def local_backward(self, i: int, root, grad=None) -> None:
        """Backward from block i's local root(s): its output(s) with dL/da, or a fused step's loss."""
        torch.autograd.backward(root, grad)

    def head_step(self, h: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        logits = self.net.head(self.net.head_input(h.detach()))  # (B, K)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self.step_layer(len(self.optimizers) - 1)
        return loss.item(), logits.detach()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        raise NotImplementedError


class Backprop(Rule):
    name = "bp"
    uses_projections = False

    def train_step(self, x, y):
        logits = self.net(x)  # (B, K); graph spans every layer (and every time step for rnn)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        for i in range(len(self.optimizers)):
            self.step_layer(i)
        return loss.item(), logits.detach()


class LocalTargetRule(Rule):
    """tpSGD and DRTP: forward only, one block at a time, no graph spanning two blocks."""

    fused_kind = "drtp"  # what `fused.LocalLinearStep` computes for this rule

    def hidden_signal(self, i: int, a: torch.Tensor, y_onehot: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(root, dL/droot) for block i's output a: backward from root with that gradient trains block i."""
        raise NotImplementedError

    def hidden_backward(self, i: int, a: torch.Tensor, y_onehot: torch.Tensor, scale: float) -> None:
        self.local_backward(i, *self.hidden_signal(i, a, y_onehot, scale))

    def train_step(self, x, y):
        y_onehot = F.one_hot(y, self.num_classes).to(x.dtype)  # (B, K)
        h = self.net.prepare(x)
        if self.net.recurrent:
            return self._recurrent_step(h, y, y_onehot)
        for i, block in enumerate(self.net.blocks):
            lin_act = linear_activation(block) if self.fused else None
            if lin_act is not None:  # one node saving only h; see fused.py
                root, a = local_linear_step(lin_act[0], lin_act[1], h.detach(), y_onehot,
                                            self.projections[i].matrix().to(h.device, h.dtype), self.fused_kind)
                self.local_backward(i, root)
            else:
                a = block(h.detach())  # (B, *out_shape_i); the graph holds block i only
                self.hidden_backward(i, a, y_onehot, 1.0)
            h = a.detach()  # the input is dropped before the update: one block's activations at a time
            self.step_layer(i)  # update as soon as this block's forward is done
        return self.head_step(h, y)

    def _recurrent_step(self, seq, y, y_onehot):
        """Recurrent blocks: see `recurrent.local_recurrent_step` (time-major, or layer-major windows), or
        `leak.leak_credit_step` (the local signal at h_T sent back along the GRU's leak path)."""
        if self.rnn_credit == "leak":
            last = leak_credit_step(list(self.net.blocks), seq,
                                    lambda hs: [self.hidden_signal(i, h, y_onehot, 1.0)[1] for i, h in enumerate(hs)],
                                    self.local_backward)
            for i in range(len(self.net.blocks)):
                self.step_layer(i)
            return self.head_step(last, y)
        return local_recurrent_step(self, seq, y, y_onehot)

    def _recurrent_layer_major(self, seq, y, y_onehot):
        return local_layer_major(self, seq, y, y_onehot)


class TpSGD(LocalTargetRule):
    """Conv blocks get one target per channel, compared with the channel means of the block output: a 3x3
    filter shared over the map cannot follow a different random target at every position (with full-map
    targets the 2-conv CNN lost ~10 points on Fashion-MNIST), and P_i shrinks from K x CHW to K x C."""

    name = "tpsgd"

    @property
    def fused_kind(self) -> str:
        return self.loss

    def target_shape(self, out_shape):
        if len(out_shape) != 3:
            return out_shape
        g = min(self.conv_grid, out_shape[1], out_shape[2])
        return (out_shape[0], g, g) if g > 1 else out_shape[:1]

    def hidden_signal(self, i, a, y_onehot, scale):
        target = self.projections[i].project(y_onehot)  # (B, D), (B, C) or (B, C, g, g) for conv = P_i y*
        if a.dim() == 4:  # (B, C, H, W) -> (B, C) channel means or (B, C, g, g) region means; saves nothing
            a = a.mean(dim=(2, 3)) if target.dim() == 2 else F.adaptive_avg_pool2d(a, target.shape[2:])
        proj = self.projections[i].matrix().to(a.device, a.dtype)  # (K, D): contrast scores a against each row
        return a, local_loss_grad(self.loss, a, target, proj, y_onehot) * scale  # = d(scale * L(a, P_i y*))/da


class DRTP(LocalTargetRule):
    name = "drtp"

    def hidden_signal(self, i, a, y_onehot, scale):
        target = self.projections[i].project(y_onehot)  # (B, *out_shape)
        return a, -target * (scale / a.shape[0])  # the projected target stands in for dL/da_i


class DFA(Rule):
    """Recurrent blocks: every time step's output gets the same feedback B_i e (the error exists only once,
    at the end), weighted by `time_weights(self.time_weighting, T)` like tpSGD's local losses."""

    name = "dfa"

    def _feedback(self, outs: list[tuple[int, torch.Tensor, float]], logits: torch.Tensor,
                  y: torch.Tensor) -> None:
        err = (F.softmax(logits.detach(), dim=1) - F.one_hot(y, self.num_classes).to(logits.dtype))
        err = err / logits.shape[0]  # (B, K) = dCE/dlogits for the mean cross-entropy
        for i in sorted({i for i, _, _ in outs}):  # one backward per block: its steps may share a graph
            mine = [(a, w) for j, a, w in outs if j == i]
            fb = self.projections[i].project(err)  # (B, *out_shape_i) = B_i e, dL/da_i
            self.local_backward(i, [a for a, _ in mine], [fb * w for _, w in mine])

    def _leak_step(self, seq, y):
        """rnn_credit leak (leak.py): the feedback B_i e at h_T, sent back along the GRU's leak path."""
        out = {}

        def signals(last: list[torch.Tensor]) -> list[torch.Tensor]:
            logits = self.net.head(last[-1])  # (B, K); the head trains on the true loss here
            out["loss"] = F.cross_entropy(logits, y)
            out["loss"].backward()
            out["logits"] = logits.detach()
            err = (F.softmax(out["logits"], dim=1) - F.one_hot(y, self.num_classes).to(logits.dtype)) / len(y)
            return [self.projections[i].project(err) for i in range(len(last))]  # B_i e, (B, H) each

        leak_credit_step(list(self.net.blocks), seq, signals, self.local_backward)
        for i in range(len(self.optimizers)):
            self.step_layer(i)
        return out["loss"].item(), out["logits"]

    def train_step(self, x, y):
        h = self.net.prepare(x)
        if self.net.recurrent and self.rnn_credit == "leak":
            return self._leak_step(h, y)
        # every block's local graph lives until the error is known: (block, output, weight)
        outs: list[tuple[int, torch.Tensor, float]] = []
        if self.net.recurrent:
            last = dfa_recurrent_outputs(self, h, outs)
        else:
            for i, block in enumerate(self.net.blocks):
                a = block(h.detach())
                outs.append((i, a, 1.0))
                h = a.detach()
            last = h
        logits = self.net.head(self.net.head_input(last.detach()))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self._feedback(outs, logits, y)
        for i in range(len(self.optimizers)):
            self.step_layer(i)
        return loss.item(), logits.detach()


RULES: dict[str, type[Rule]] = {"tpsgd": TpSGD, "bp": Backprop, "drtp": DRTP, "dfa": DFA}


def make_rule(method: str, net: LocalNet, make_optimizer: OptimizerFactory, num_classes: int, seed: int,
              loss: str = DEFAULT_LOCAL_LOSS, store_projections: bool = True, **options) -> Rule:
    """options: target_scale, time_weighting, fused, rnn_window, conv_grid, rnn_credit (see `Rule`)."""
    if method not in RULES:
        raise LocalTrainingError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return RULES[method](net, make_optimizer, num_classes, seed, loss, store_projections, **options)
