"""AdamW on flat fp32 buffers, in place and in chunks, plus the dynamic loss scale for fp16.

Why not `torch.optim.AdamW`: its state lives in `optimizer.state` as whole tensors, but here the master
weights and moments are swapped in one group at a time (and may be views of a pool slot), so the update
runs on whatever buffers the store hands over. The update goes in fixed-size chunks, as DeepSpeed's CPU
Adam does, so its temporaries (the denominator) are one chunk, not one group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHUNK = 1 << 20  # elements per chunk of the update


@dataclass
class AdamW:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def update(self, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
               step: int, grad_scale: float = 1.0) -> None:
        """One AdamW step (step counts from 1) on flat fp32 tensors; `grad` is divided by `grad_scale`."""
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        step_size = self.lr / bc1
        for s in range(0, master.numel(), CHUNK):
            p, m, v = master[s : s + CHUNK], exp_avg[s : s + CHUNK], exp_avg_sq[s : s + CHUNK]
            g = grad[s : s + CHUNK]
            if grad_scale != 1.0:
                g = g / grad_scale
            if self.weight_decay:
                p.mul_(1 - self.lr * self.weight_decay)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16 (DeepSpeed's defaults: initial 2**16, halve on overflow, double after
    1000 clean steps; deepspeed/runtime/fp16/loss_scaler.py DynamicLossScaler). Static 1 for bf16/fp32."""

    scale: float = 1.0
    dynamic: bool = False
    window: int = 1000
    min_scale: float = 1.0
    clean_steps: int = 0

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> LossScaler:
        return cls(scale=2.0**16, dynamic=True) if dtype == torch.float16 else cls()

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.scale = max(self.scale / 2, self.min_scale)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.window == 0:
                self.scale *= 2

    def to_json(self) -> dict:
        return {"scale": self.scale, "dynamic": self.dynamic, "clean_steps": self.clean_steps}
