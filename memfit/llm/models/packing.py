"""Prepacked CPU linear layers: decode on a CPU is a stream of skinny matmuls (a few rows times a large
weight), and oneDNN runs them markedly faster from weights reordered once into its blocked layout than
from PyTorch's row-major ones (measured here: about 1.7x for a 0.1B bf16 model at batch 1 and 8; see
benchmarks/decode_throughput.py). This is what PyTorch's own compiler does for frozen CPU graphs; we
do it eagerly, on the model, once after loading.

The packed weight *replaces* the original, and the original's pages of the memory-mapped checkpoint are
given back to the kernel (`memfit.memory.pages.drop_file_pages`), so packing costs no extra resident
memory once done; while packing, at most one layer's weight is held twice.

A tied `lm_head` shares its matrix with the token embedding, which the lookup still needs in row-major
form. When that matrix is memory-mapped from the checkpoint we pack the head anyway and give back the
embedding's resident pages: a lookup reads only the rows of the step's tokens, which page back in from the
file on demand, so the resident embedding shrinks to the rows in use instead of being held twice. (The
head is a large part of a small model's decode: Qwen2.5-0.5B's is 136M of its 494M parameters.) When the
embedding is ordinary memory (e.g. converted to another dtype at load), the head is left unpacked.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _ops_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout. x: (N, in) -> (N, out)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())  # opaque mkldnn tensor
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.dtype = w.dtype
        self.nbytes = w.numel() * w.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, packed=oneDNN"


def _self_check(dtype: torch.dtype) -> bool:
    """Packing is a private PyTorch API; make sure it computes the right thing on this build/CPU."""
    try:
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(64, 48, bias=True).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(48, 64, generator=g))
            lin.bias.copy_(torch.randn(48, generator=g))
        x = torch.randn(5, 64, generator=g).to(dtype)
        ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        got = PackedLinear(lin)(x).float()
        tol = 1e-3 if dtype == torch.float32 else 0.1 * ref.abs().max().item() / 8
        return bool((got - ref).abs().max().item() <= tol)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        log.info("oneDNN linear packing unavailable: %s", exc)
        return False


def can_pack_for_cpu(dtype: torch.dtype) -> bool:
    """Would `pack_linears_for_cpu` pack a CPU model of `dtype` on this build?"""
    return dtype in (torch.float32, torch.bfloat16) and _ops_available() and _self_check(dtype)


def pack_linears_for_cpu(model: nn.Module) -> int:
    """Replace the model's nn.Linear layers by PackedLinear (CPU, float32/bfloat16). Returns how many
    were packed; 0 when the platform can't (the model is then left untouched)."""
    first = next(model.parameters(), None)  # not a list of them all: it would keep every replaced weight alive
    if first is None or first.device.type != "cpu" or not can_pack_for_cpu(first.dtype):
        return 0
    del first
    from memfit.memory.pages import drop_file_pages, file_mappings, is_file_backed

    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    maps = file_mappings()
    # (parent, name) pairs only: a list of the modules themselves would keep every replaced weight alive
    todo = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]
    count = 0
    for parent, name in todo:
        child = getattr(parent, name)
        if tied and name == "lm_head" and parent is model and not is_file_backed(child.weight.detach(), maps):
            continue  # packing would hold the embedding matrix twice
        setattr(parent, name, PackedLinear(child))
        drop_file_pages(child.weight.detach(), maps)
        del child  # the parent no longer holds it: its weight (e.g. a fused copy) goes now
        count += 1
    return count
