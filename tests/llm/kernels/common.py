"""Helpers for the kernel tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from memfit.llm.kernels import build


def need(dtype: torch.dtype) -> None:
    """Skip (with the reason) where memfit's CPU kernels can't run `dtype` on this machine."""
    reason = build.unavailable_reason(dtype)
    if reason is not None:
        pytest.skip(f"memfit CPU kernels unavailable for {dtype}: {reason}")


def make_linear(n: int, k: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    """A seeded (k -> n) linear layer in `dtype`, with a random bias when asked."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(dtype).requires_grad_(False)
    lin.weight.copy_(torch.randn(n, k, generator=g))
    if bias:
        lin.bias.copy_(torch.randn(n, generator=g))
    return lin
