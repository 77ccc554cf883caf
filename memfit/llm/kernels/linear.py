"""RowMajorLinear: decode-sized matmuls through memfit's own CPU kernel, on the checkpoint's own weight.

A decode step on a CPU is a stream of skinny matmuls, bound by reading the weights. oneDNN needs its
weights reordered into a blocked layout (models/packing.py, a copy), and even then streams them at about
half the machine's read bandwidth at one row; the row-major kernel (cpu_linear.cpp) reads each weight row
once, start to end, and reaches most of it. The weight is *not* copied: it stays the memory-mapped
checkpoint tensor, so wrapping costs no memory at all.

Inputs of more than `max_rows` rows (prefill) go to F.linear (oneDNN's GEMM on the same row-major weight), in
oneDNN's row buckets (models/packing.py: it keeps a kernel per row count otherwise).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from memfit.llm.kernels.build import get_cpu_linear
from memfit.llm.models.packing import in_row_buckets

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 64  # decode batches; measured in benchmarks/decode_throughput.py (docs/engine.md)


class RowMajorLinear(nn.Module):
    """y = x W^T + b with W the wrapped nn.Linear's own (N, K) row-major weight. x: (..., K) -> (..., N)."""

    def __init__(self, linear: nn.Linear, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        super().__init__()
        w = linear.weight
        if w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous():
            raise ValueError("RowMajorLinear needs a contiguous 2-D CPU weight")
        fn = get_cpu_linear(w.dtype)
        if fn is None:
            raise RuntimeError(f"memfit's CPU linear kernel is unavailable for {w.dtype} (see the log)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = w  # the same Parameter: shares storage with the checkpoint (and a tied embedding)
        self.bias = linear.bias
        if self.bias is not None and not self.bias.is_contiguous():
            self.bias = nn.Parameter(self.bias.detach().contiguous(), requires_grad=False)
        self.max_rows = max_rows
        self._fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K), a view when x allows
        m = x2.shape[0]
        w = self.weight
        if (m == 0 or x.dtype != w.dtype or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return F.linear(x, w, self.bias)
        if m > self.max_rows:
            # oneDNN's GEMM, which keeps a kernel per row count (the tied head of memfit-tiny in bf16: 124 MiB of heap
            # over row counts 66-299, test_cpu_linear): in row buckets, as models/packing.py runs its linears
            return in_row_buckets(x, self.out_features, lambda t: F.linear(t, w, self.bias))
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.empty(m, self.out_features, dtype=x.dtype)  # (M, N)
        b = self.bias
        self._fn(x2.data_ptr(), x2.stride(0), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                 self.out_features, m, self.out_features, self.in_features, torch.get_num_threads())
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def direct_rows(self) -> int:
        """Calls of up to this many rows run on memfit's kernel; more on oneDNN (packing.warm_row_buckets reads it)."""
        return self.max_rows

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}, "
                f"kernel=memfit row-major (rows <= {self.max_rows})")


def can_use_row_major(dtype: torch.dtype) -> bool:
    """Can `use_row_major_linears` wrap a CPU model of `dtype` on this machine?"""
    return get_cpu_linear(dtype) is not None


def use_row_major_linears(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Replace the model's CPU nn.Linear layers by RowMajorLinear (zero-copy). Returns how many; 0 when
    the kernel is unavailable (the model is then left untouched)."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or not can_use_row_major(params[0].dtype):
        return 0
    count = 0
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.is_contiguous():
                setattr(parent, name, RowMajorLinear(child, max_rows))
                count += 1
    return count
