"""Local losses L(a, t) of tpSGD and their gradients in closed form (no autograd graph needed)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LocalTrainingError

LOCAL_LOSSES = ("mse", "l1", "ce")


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
