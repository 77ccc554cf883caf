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
from .losses import local_loss_consuming_target, local_loss_grad_consuming

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


# Rows per slice of the loss and of the backward: their (rows, D) temporaries (target, softmax, dL/da, mask)
# stay small next to the (B, D) output and the (D, D_in) weight gradient, whatever the batch.
CHUNK_ROWS = 256


class LocalLinearStep(torch.autograd.Function):
    """(x, W, b, y* one-hot, P) -> (local loss value, a = act(x W^T + b)); `loss.backward()` fills W.grad, b.grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, y_onehot, proj, kind: str, act: str, scale: float):
        with torch.no_grad():
            a = _activate(torch.addmm(bias, x, weight.t()), act)  # (B, D)
            n, value = a.shape[0], 0.0
            for lo in range(0, n, CHUNK_ROWS):
                ac, yc = a[lo:lo + CHUNK_ROWS], y_onehot[lo:lo + CHUNK_ROWS]
                target = (yc @ proj).view_as(ac)  # (rows, D) = P y*: the loss's workspace
                if kind == "drtp":
                    part = -target.mul_(ac).sum() / ac.shape[0]
                else:
                    part = local_loss_consuming_target(kind, ac, target, proj, yc)
                value += float(part) * ac.shape[0] / n  # per-row means, weighted back to the batch's mean
        ctx.save_for_backward(x, weight, bias, y_onehot, proj)
        ctx.kind, ctx.act, ctx.scale = kind, act, scale
        ctx.mark_non_differentiable(a)
        ctx.set_materialize_grads(False)  # else autograd hands backward a (B, D) tensor of zeros for a's gradient
        return torch.tensor(value * scale, dtype=a.dtype), a

    @staticmethod
    def backward(ctx, grad_value, _grad_a):
        x, weight, bias, y_onehot, proj = ctx.saved_tensors
        n = x.shape[0]
        grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)  # (D, D_in), (D,)
        with torch.no_grad():
            for lo in range(0, n, CHUNK_ROWS):
                xc, yc = x[lo:lo + CHUNK_ROWS], y_onehot[lo:lo + CHUNK_ROWS]
                rows = xc.shape[0]
                a = _activate(torch.addmm(bias, xc, weight.t()), ctx.act)  # recomputed, (rows, D)
                # the activation's mask (or derivative) first: dL/da is then computed in a's storage
                dead = a <= 0 if ctx.act == "relu" else None  # (rows, D) bool: ReLU's zero gradient
                deriv = 1 - a * a if ctx.act == "tanh" else None  # tanh' = 1 - a^2
                target = (yc @ proj).view_as(a)
                if ctx.kind == "drtp":  # the projected target stands in for dL/da
                    g = target.div_(-rows)
                else:
                    g = local_loss_grad_consuming(ctx.kind, a, target, proj, yc)  # (rows, D), a mean over rows
                del target, a
                g.mul_(grad_value * ctx.scale * rows / n)  # the slice's share of the batch's mean
                if dead is not None:
                    g.masked_fill_(dead, 0.0)  # dL/dz
                else:
                    g.mul_(deriv)
                del dead, deriv
                grad_w.addmm_(g.t(), xc)
                grad_b.add_(g.sum(0))
        return None, grad_w, grad_b, None, None, None, None, None


def local_linear_step(linear: nn.Linear, act: str, x: torch.Tensor, y_onehot: torch.Tensor, proj: torch.Tensor,
                      kind: str, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, D_in) detached input -> (scalar local loss to call .backward() on, a (B, D) with no graph)."""
    if kind not in FUSED_KINDS:
        raise LocalTrainingError(f"unknown local loss {kind!r}; choose one of {', '.join(FUSED_KINDS[:-1])}")
    if linear.bias is None:
        raise LocalTrainingError("the fused local step needs a Linear with a bias")
    return LocalLinearStep.apply(x.detach(), linear.weight, linear.bias, y_onehot, proj, kind, act, scale)
