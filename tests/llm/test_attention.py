"""Attention helpers: the hand-written bf16 decode path agrees with PyTorch's SDPA in float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memfit.llm.attention import causal_mask, decode_attention


def reference(q, k, v, lens, scale):
    outs = []
    for i in range(q.shape[0]):
        n = int(lens[i]) if lens is not None else k.shape[1]
        qi = q[i : i + 1].float().unsqueeze(2)  # (1, Hq, 1, D)
        ki = k[i : i + 1, :n].float().transpose(1, 2)
        vi = v[i : i + 1, :n].float().transpose(1, 2)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale, enable_gqa=True).squeeze(2))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [True, False])
def test_decode_attention_matches_reference(dtype, tol, masked):
    torch.manual_seed(0)
    cache = torch.randn(6, 40, 2, 16).to(dtype)  # a strided view into a larger buffer, as from the KV cache
    k, v = cache[:3, :33], cache[3:, :33]
    q = torch.randn(3, 6, 16).to(dtype)  # GQA: 6 query heads over 2 KV heads
    lens = torch.tensor([33, 5, 17]) if masked else None
    got = decode_attention(q, k, v, lens, 0.25).float()
    assert (got - reference(q, k, v, lens, 0.25)).abs().max().item() < tol


def test_causal_mask_offsets_and_window():
    m = causal_mask(2, 5, torch.device("cpu"))
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    w = causal_mask(1, 5, torch.device("cpu"), window=2)
    assert w.tolist() == [[False, False, False, True, True]]
