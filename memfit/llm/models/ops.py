"""The decoder's element-wise math (RMSNorm, rotary embedding, SwiGLU's product) and the greedy pick, as one
swappable object.

`out` arguments are hints: where a method can write its result into the given tensors (memfit's kernels, for the
step arena of memfit/memory/scratch.py) it does and returns them; the reference ignores them. Callers use what
is returned, never `out` itself.

`TorchOps` is the reference, in PyTorch, and what training and autograd use. A model's modules call
`self.ops.<op>`; the engine may swap in `memfit.llm.kernels.decode.CpuDecodeOps`, which runs the same math
in memfit's C++ kernels on the CPU at inference time (and falls back to these methods for anything else).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    # Whether a matmul kernel may fold silu_mul into its store (BlockedLinear.silu_mul_rows): only where its
    # bits are this class's silu_mul kernel's (CpuDecodeOps), never PyTorch's F.silu.
    fuses_silu_mul = False
    # Whether the q/k/v matmul may rotate q and k in its store (BlockedLinear.rope_rows): only where its bits are
    # this class's rope kernel's (CpuDecodeOps), never PyTorch's ops.
    fuses_rope = False

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h = residual + x (h = x without a residual); returns (h, RMSNorm(h) * weight). x: (N, C). out: (h, normed)
        hints (h's may be `residual` itself)."""
        h = x if residual is None else residual + x
        # Normalise in float32 (as the reference implementation does), scale in the model dtype.
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        return h, weight * hf.to(h.dtype)

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin_signed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (N, Hq, D) and k (N, Hkv, D) by the step's (N, 1, D) tables. Rolling by D/2 swaps the
        halves, [x2, x1]; times [-sin, sin] that is rotate_half(x) * sin."""
        half = q.shape[-1] // 2
        return q * cos + q.roll(half, -1) * sin_signed, k * cos + k.roll(half, -1) * sin_signed

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU(gate) * up, (N, I) each. out: a hint (may be `gate` itself)."""
        return F.silu(gate) * up

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy pick per row of (B, V) logits, the first index among ties. `max(dim)` rather than `argmax`:
        on a CPU bf16 argmax is 4x slower (benchmarks/decode_ops.py: 3.66 vs 0.85 ms for 32 x 32000)."""
        return logits.max(dim=-1).indices


TORCH_OPS = TorchOps()
