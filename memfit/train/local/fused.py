"""Lean local step for Linear + activation blocks: one autograd node that saves only the block's input.

Through plain autograd a tpSGD step on `nn.Sequential(Linear, ReLU)` saves the block input x (B, D_in) for
the weight gradient *and* the activation output a (B, D) for ReLU's backward, and the local loss needs a
again: two activations per block. `LocalLinearStep` is one `torch.autograd.Function` whose hand-written
backward recomputes z = x W^T + b from the saved x, so it holds

    x (B, D_in)  +  y* one-hot (B, K)  +  P (K, D)   (weight and bias are parameters: not activations)

The projection P is saved as a tensor so the bytes of the target stay visible to saved-tensor hooks; the
(B, D) target P y* itself is rebuilt in backward. The recompute is one extra (B, D_in) x (D_in, D) matmul,
the same work bp spends on the input gradient that a local rule never needs.

Backward gives exactly the gradient of `scale * L(act(x W^T + b), P y*)` for L in `LOCAL_LOSSES`, or DRTP's
fixed signal dL/da = -scale * P y* / B (kind "drtp"); the output a is handed on with no graph.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import LocalTrainingError
from .losses import local_loss, local_loss_grad

FUSED_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh"}
FUSED_KINDS = ("mse", "l1", "ce", "contrast", "drtp")


def linear_activation(block: nn.Module) -> tuple[nn.Linear, str] | None:
    """(linear, 'relu' | 'tanh') when `block` is exactly Sequential(Linear, ReLU|Tanh), else None."""
    if isinstance(block, nn.Sequential) and len(block) == 2 and isinstance(block[0], nn.Linear):
        act = FUSED_ACTIVATIONS.get(type(block[1]))
        if act is not None:
            return block[0], act
    return None


def _activate(z: torch.Tensor, act: str) -> torch.Tensor:
    """In place on z: the pre-activation is not needed once a exists (ReLU's mask is a > 0)."""
    return z.clamp_min_(0) if act == "relu" else z.tanh_()


class LocalLinearStep(torch.autograd.Function):
    """(x, W, b, y* one-hot, P) -> (local loss value, a = act(x W^T + b)); `loss.backward()` fills W.grad, b.grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, y_onehot, proj, kind: str, act: str, scale: float):
        with torch.no_grad():
            a = _activate(torch.addmm(bias, x, weight.t()), act)  # (B, D)
            target = (y_onehot @ proj).view_as(a)  # (B, D) = P y*, dropped right after the loss value
            if kind == "drtp":
                value = -(target * a).sum(1).mean()
            else:
                value = local_loss(kind, a, target, proj, y_onehot)
        ctx.save_for_backward(x, weight, bias, y_onehot, proj)
        ctx.kind, ctx.act, ctx.scale = kind, act, scale
        ctx.mark_non_differentiable(a)
        return value * scale, a

    @staticmethod
    def backward(ctx, grad_value, _grad_a):
        x, weight, bias, y_onehot, proj = ctx.saved_tensors
        with torch.no_grad():
            a = _activate(torch.addmm(bias, x, weight.t()), ctx.act)  # recomputed, (B, D)
            target = (y_onehot @ proj).view_as(a)
            if ctx.kind == "drtp":  # the projected target stands in for dL/da
                g = target.div_(-a.shape[0])
            else:
                g = local_loss_grad(ctx.kind, a, target, proj, y_onehot)  # (B, D) = dL/da
            del target
            g.mul_(grad_value * ctx.scale)
            if ctx.act == "relu":
                g.masked_fill_(a <= 0, 0.0)  # dL/dz
            else:
                g.mul_(1 - a * a)  # tanh' = 1 - a^2
            del a
            grad_w = g.t() @ x  # (D, D_in)
            grad_b = g.sum(0)  # (D,)
        return None, grad_w, grad_b, None, None, None, None, None


def local_linear_step(linear: nn.Linear, act: str, x: torch.Tensor, y_onehot: torch.Tensor, proj: torch.Tensor,
                      kind: str, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, D_in) detached input -> (scalar local loss to call .backward() on, a (B, D) with no graph)."""
    if kind not in FUSED_KINDS:
        raise LocalTrainingError(f"unknown local loss {kind!r}; choose one of {', '.join(FUSED_KINDS[:-1])}")
    if linear.bias is None:
        raise LocalTrainingError("the fused local step needs a Linear with a bias")
    return LocalLinearStep.apply(x.detach(), linear.weight, linear.bias, y_onehot, proj, kind, act, scale)
