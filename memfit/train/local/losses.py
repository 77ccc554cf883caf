"""Local losses L(a, t) of tpSGD and their gradients in closed form (no autograd graph needed).

mse, l1 and ce compare the block output a with its own projected target t = P y* (P: K x D, y* one-hot).
contrast scores a against the projected target of *every* class, s_c = a . P_c (the rows of P, (B, K)
scores), and takes the cross-entropy of softmax(s) with the true class:

    L = mean_b [ -a . P y*  +  log sum_c exp(a . P_c) ]      dL/da = (softmax(a P^T) - y*) P / B

The first term is DRTP's pull towards the projected target; the second stops the pull once the own class's
target is matched far better than the others' (the gradient vanishes as softmax(a P^T) -> y*), so the block
is not driven to one fixed code per class (ce and mse are zero only at a = P y*, which erases every input
detail the next block or time step could use). `target_scale` multiplies P, so it is the inverse temperature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LocalTrainingError

LOCAL_LOSSES = ("mse", "l1", "ce", "contrast")
# The one default: the CLI, TrainConfig, Rule and make_rule all take it (memory probes ran mse while the
# accuracy runs ran ce before they shared it).
DEFAULT_LOCAL_LOSS = "ce"


def _contrast_inputs(kind: str, proj: torch.Tensor | None, y_onehot: torch.Tensor | None):
    if proj is None or y_onehot is None:
        raise LocalTrainingError(f"local loss {kind!r} needs the projection P and the one-hot labels")
    return proj.to(y_onehot.dtype)


def local_loss(kind: str, a: torch.Tensor, target: torch.Tensor, proj: torch.Tensor | None = None,
               y_onehot: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss summed over features, averaged over the batch: a, target (B, ...) -> scalar.

    mse is 0.5 * sum (a - t)^2, so its gradient is exactly (a - t) / B. contrast also needs proj (K, D)
    and y_onehot (B, K) (see the module docstring).
    """
    a, target = a.flatten(1), target.flatten(1)  # (B, D)
    if kind == "mse":
        return 0.5 * (a - target).pow(2).sum(1).mean()
    if kind == "l1":
        return (a - target).abs().sum(1).mean()
    if kind == "ce":  # soft cross-entropy: the target's softmax is the distribution to match
        return -(F.softmax(target, dim=1) * F.log_softmax(a, dim=1)).sum(1).mean()
    if kind == "contrast":
        p = _contrast_inputs(kind, proj, y_onehot)
        return -(y_onehot * F.log_softmax(a @ p.t(), dim=1)).sum(1).mean()  # scores (B, K)
    raise LocalTrainingError(f"unknown local loss {kind!r}; choose one of {', '.join(LOCAL_LOSSES)}")


def local_loss_grad(kind: str, a: torch.Tensor, target: torch.Tensor, proj: torch.Tensor | None = None,
                    y_onehot: torch.Tensor | None = None) -> torch.Tensor:
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
        elif kind == "contrast":
            p = _contrast_inputs(kind, proj, y_onehot)
            g = (F.softmax(a2 @ p.t(), dim=1) - y_onehot) @ p  # (B, K) @ (K, D)
        else:
            raise LocalTrainingError(f"unknown local loss {kind!r}; choose one of {', '.join(LOCAL_LOSSES)}")
        return (g / a.shape[0]).view_as(a)


# -- in place, for the fused step (fused.py): the allocator's peak within a step counts every (B, D) buffer ---


def _softmax_(t: torch.Tensor) -> torch.Tensor:
    """Row softmax of a (B, D) tensor in its own storage."""
    t.sub_(t.amax(1, keepdim=True)).exp_()
    return t.div_(t.sum(1, keepdim=True))


def local_loss_consuming_target(kind: str, a: torch.Tensor, target: torch.Tensor, proj: torch.Tensor | None = None,
                                y_onehot: torch.Tensor | None = None) -> torch.Tensor:
    """`local_loss` for 2-D a, target (B, D), using target's storage as its workspace (target is garbage after);
    at most one new (B, D) buffer (ce's log-softmax)."""
    b = a.shape[0]
    if kind == "mse":
        return target.sub_(a).pow_(2).sum() * (0.5 / b)
    if kind == "l1":
        return target.sub_(a).abs_().sum() / b
    if kind == "ce":
        return -F.log_softmax(a, dim=1).mul_(_softmax_(target)).sum() / b
    return local_loss(kind, a, target, proj, y_onehot)  # contrast: its (B, K) scores are small


def local_loss_grad_consuming(kind: str, a: torch.Tensor, target: torch.Tensor, proj: torch.Tensor | None = None,
                              y_onehot: torch.Tensor | None = None) -> torch.Tensor:
    """`local_loss_grad` for 2-D a, target (B, D), computed in a's storage (a and target are garbage after;
    the caller takes what it needs of a, the activation's mask or derivative, first)."""
    b = a.shape[0]
    if kind == "mse":
        g = a.sub_(target)
    elif kind == "l1":
        g = a.sub_(target).sign_()
    elif kind == "ce":
        g = _softmax_(a).sub_(_softmax_(target))
    else:
        return local_loss_grad(kind, a, target, proj, y_onehot)
    return g.div_(b)
