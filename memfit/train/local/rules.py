"""Learning rules behind one interface: backprop, tpSGD, DRTP and DFA.

All rules train the same `LocalNet` with one optimizer per block (plus one for the head), so "a layer's
update as soon as its forward pass is done" is a plain `optimizers[i].step()`.

- bp: the usual loss.backward() through the whole stack.
- tpsgd (target projection SGD): hidden block i sees its input detached and minimises a local loss
  L(a_i, P_i y*) against a fixed random projection of the one-hot label; its optimizer steps right away.
- drtp (direct random target projection): same, but the gradient at the block output is the projected
  target itself, dL/da_i = -P_i y* / B, whatever the output is.
- dfa (direct feedback alignment): dL/da_i = B_i e with e = softmax(logits) - y* the output error; e exists
  only after the full forward pass, so every block's local graph is kept until then.
The head always trains on the true cross-entropy, on a detached input for the local rules.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LocalTrainingError
from .models import LocalNet, detach_state

METHODS = ("tpsgd", "bp", "drtp", "dfa")
LOCAL_LOSSES = ("mse", "l1", "ce")
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class TargetProjection:
    """Fixed random matrix P (K, D), entries uniform in [-1, 1], drawn from a seeded generator.

    With `store=False` the matrix is regenerated from the seed at every use, so it costs no memory between
    steps (the point of the paper's seeded projections); with `store=True` it is kept (faster).
    """

    def __init__(self, num_classes: int, out_shape: tuple[int, ...], seed: int, store: bool = True):
        self.num_classes, self.out_shape, self.seed = num_classes, tuple(out_shape), seed
        self.features = 1
        for s in self.out_shape:
            self.features *= s
        self._matrix = self._generate() if store else None

    def _generate(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(self.num_classes, self.features, generator=g) * 2 - 1  # (K, D)

    def matrix(self) -> torch.Tensor:
        return self._matrix if self._matrix is not None else self._generate()

    @property
    def nbytes(self) -> int:
        return 0 if self._matrix is None else self._matrix.numel() * self._matrix.element_size()

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """v (B, K): one-hot labels or output errors -> (B, *out_shape) = v @ P."""
        return (v @ self.matrix().to(v.device, v.dtype)).view(v.shape[0], *self.out_shape)


def local_loss(kind: str, a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss summed over features, averaged over the batch: a, target (B, ...) -> scalar.

    mse is 0.5 * sum (a - t)^2, so its gradient is exactly (a - t) / B.
    """
    a, target = a.flatten(1), target.flatten(1)  # (B, D)
    if kind == "mse":
        return 0.5 * (a - target).pow(2).sum(1).mean()
    if kind == "l1":
        return (a - target).abs().sum(1).mean()
    if kind == "ce":  # soft cross-entropy: the target's softmax is the distribution to match
        return -(F.softmax(target, dim=1) * F.log_softmax(a, dim=1)).sum(1).mean()
    raise LocalTrainingError(f"unknown local loss {kind!r}; choose one of {', '.join(LOCAL_LOSSES)}")


def local_loss_grad(kind: str, a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """dL/da of `local_loss` in closed form, (B, ...) like `a`, computed without an autograd graph.

    tpSGD feeds this straight into a.backward(): the loss itself never builds a graph, so its softmax or
    difference tensors are never saved for backward; only the block's own graph is.
    """
    with torch.no_grad():
        a2, t2 = a.flatten(1), target.flatten(1)  # (B, D)
        if kind == "mse":
            g = a2 - t2
        elif kind == "l1":
            g = torch.sign(a2 - t2)
        elif kind == "ce":
            g = F.softmax(a2, dim=1) - F.softmax(t2, dim=1)
        else:
            raise LocalTrainingError(f"unknown local loss {kind!r}; choose one of {', '.join(LOCAL_LOSSES)}")
        return (g / a.shape[0]).view_as(a)


class Rule:
    """Base: per-block optimizers and the head update. `train_step(x, y)` returns (loss, logits)."""

    name = "base"

    def __init__(self, net: LocalNet, make_optimizer: OptimizerFactory, num_classes: int, seed: int,
                 loss: str = "mse", store_projections: bool = True):
        if loss not in LOCAL_LOSSES:
            raise LocalTrainingError(f"unknown local loss {loss!r}; choose one of {', '.join(LOCAL_LOSSES)}")
        self.net, self.num_classes, self.loss = net, num_classes, loss
        self.optimizers = [make_optimizer(list(b.parameters())) for b in net.blocks]
        self.optimizers.append(make_optimizer(list(net.head.parameters())))
        # seed + 1000 * (i + 1): projections do not depend on the weight-init stream
        self.projections = [
            TargetProjection(num_classes, self.target_shape(shape), seed + 1000 * (i + 1), store_projections)
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

    def hidden_backward(self, i: int, a: torch.Tensor, y_onehot: torch.Tensor, scale: float) -> None:
        raise NotImplementedError

    def train_step(self, x, y):
        y_onehot = F.one_hot(y, self.num_classes).to(x.dtype)  # (B, K)
        h = self.net.prepare(x)
        if self.net.recurrent:
            return self._recurrent_step(h, y, y_onehot)
        for i, block in enumerate(self.net.blocks):
            a = block(h.detach())  # (B, *out_shape_i); the graph holds block i only
            self.hidden_backward(i, a, y_onehot, 1.0)
            self.step_layer(i)  # update as soon as this block's forward is done
            h = a.detach()
        return self.head_step(h, y)

    def _recurrent_step(self, seq, y, y_onehot):
        """seq (B, T, F). Time-major: at each step every layer gets its local target; gradients add up over
        the T steps and each layer steps once at the end of the sequence. No backprop through time.

        Step t's loss is weighted by (t+1)^2 (weights sum to 1): early steps have seen only the first rows
        and cannot know the class yet (uniform weights cost ~4 points on row-wise Fashion-MNIST)."""
        batch, steps = seq.shape[:2]
        states = [blk.init_state(batch, seq) for blk in self.net.blocks]
        norm = steps * (steps + 1) * (2 * steps + 1) / 6  # sum of (t+1)^2
        inp = seq[:, 0]
        for t in range(steps):
            inp = seq[:, t]  # (B, F)
            for i, blk in enumerate(self.net.blocks):
                out, state = blk.step(inp.detach(), states[i])  # out (B, H)
                self.hidden_backward(i, out, y_onehot, (t + 1) ** 2 / norm)
                states[i] = detach_state(state)
                inp = out.detach()
        for i in range(len(self.net.blocks)):
            self.step_layer(i)
        return self.head_step(inp, y)


class TpSGD(LocalTargetRule):
    """Conv blocks get one target per channel, compared with the channel means of the block output: a 3x3
    filter shared over the map cannot follow a different random target at every position (with full-map
    targets the 2-conv CNN lost ~10 points on Fashion-MNIST), and P_i shrinks from K x CHW to K x C."""

    name = "tpsgd"

    @staticmethod
    def target_shape(out_shape):
        return out_shape[:1] if len(out_shape) == 3 else out_shape

    def hidden_backward(self, i, a, y_onehot, scale):
        target = self.projections[i].project(y_onehot)  # (B, D) or (B, C) for conv = P_i y*
        if a.dim() == 4:
            a = a.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C); mean saves nothing for backward
        a.backward(local_loss_grad(self.loss, a, target) * scale)  # = d(scale * L(a, P_i y*))/da


class DRTP(LocalTargetRule):
    name = "drtp"

    def hidden_backward(self, i, a, y_onehot, scale):
        target = self.projections[i].project(y_onehot)  # (B, *out_shape)
        a.backward(-target * (scale / a.shape[0]))  # the projected target stands in for dL/da_i


class DFA(Rule):
    name = "dfa"

    def _feedback(self, outs: list[tuple[int, torch.Tensor]], logits: torch.Tensor, y: torch.Tensor,
                  scale: float) -> None:
        err = (F.softmax(logits.detach(), dim=1) - F.one_hot(y, self.num_classes).to(logits.dtype))
        err = err / logits.shape[0]  # (B, K) = dCE/dlogits for the mean cross-entropy
        for i, a in outs:
            a.backward(self.projections[i].project(err) * scale)  # dL/da_i = B_i e

    def train_step(self, x, y):
        h = self.net.prepare(x)
        outs: list[tuple[int, torch.Tensor]] = []  # every block's local graph lives until the error is known
        if self.net.recurrent:
            batch, steps = h.shape[:2]
            states = [blk.init_state(batch, h) for blk in self.net.blocks]
            inp = h[:, 0]
            for t in range(steps):
                inp = h[:, t]
                for i, blk in enumerate(self.net.blocks):
                    out, state = blk.step(inp.detach(), states[i])
                    outs.append((i, out))
                    states[i] = detach_state(state)
                    inp = out.detach()
            scale, last = 1.0 / steps, inp
        else:
            for i, block in enumerate(self.net.blocks):
                a = block(h.detach())
                outs.append((i, a))
                h = a.detach()
            scale, last = 1.0, h
        logits = self.net.head(self.net.head_input(last.detach()))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self._feedback(outs, logits, y, scale)
        for i in range(len(self.optimizers)):
            self.step_layer(i)
        return loss.item(), logits.detach()


RULES: dict[str, type[Rule]] = {"tpsgd": TpSGD, "bp": Backprop, "drtp": DRTP, "dfa": DFA}


def make_rule(method: str, net: LocalNet, make_optimizer: OptimizerFactory, num_classes: int, seed: int,
              loss: str = "mse", store_projections: bool = True) -> Rule:
    if method not in RULES:
        raise LocalTrainingError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return RULES[method](net, make_optimizer, num_classes, seed, loss, store_projections)
