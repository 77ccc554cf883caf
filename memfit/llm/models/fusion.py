"""Fused projections: q/k/v in one linear layer and gate/up in another.

A decode step is a stream of skinny matmuls, each paying a fixed cost (a kernel launch on a GPU, a oneDNN
primitive call on a CPU) that rivals its compute; one (N, q+k+v) matmul instead of three and one
(N, 2 x intermediate) instead of two cut a Llama layer's linear calls from 7 to 4. The fused weight is the
row-wise concatenation, so outputs are column slices of one result: `q, k, v = qkv.split(...)`.

Memory: the concatenation is a new tensor; the originals are dropped from the module (and, when they are
pages of a memory-mapped checkpoint, given back to the kernel), so at most one layer is held twice while
fusing. On a CPU this pays only where the fused weight is then packed for oneDNN (which copies anyway);
without packing, the unfused layers keep their zero-copy mapping, so the engine fuses only on GPUs or
together with packing.
"""
from __future__ import annotations

import torch
from torch import nn

from memfit.memory.pages import drop_file_pages, file_mappings


def _concat(parts: list[nn.Linear], maps) -> nn.Linear:
    w = torch.cat([p.weight.detach() for p in parts], dim=0)  # (sum out, in)
    has_bias = parts[0].bias is not None
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta", dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
    for p in parts:
        drop_file_pages(p.weight.detach(), maps)
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Fuse every decoder layer's q/k/v and gate/up projections in place. Returns the layers fused."""
    from memfit.llm.models.llama import MLP, Attention  # avoid an import cycle

    maps = file_mappings()
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and module.qkv_proj is None:
            module.qkv_proj = _concat([module.q_proj, module.k_proj, module.v_proj], maps)
            del module.q_proj, module.k_proj, module.v_proj
            count += 1
        elif isinstance(module, MLP) and module.gate_up_proj is None:
            module.gate_up_proj = _concat([module.gate_proj, module.up_proj], maps)
            del module.gate_proj, module.up_proj
    return count
