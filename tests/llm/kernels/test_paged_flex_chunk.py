"""Chunk attention through the paged cache's block table on flex attention (kernels/paged_flex_chunk.py): a prefill
or verify chunk with a cached prefix, read in place on a GPU. Inductor's CPU template does not compile this mask
function (a C++ compile error in torch 2.14's generated code), so on the CPU the tests check its two halves
separately: the block lists against the exact causal/window visibility, and the mask function with eager flex
attention (which evaluates it at every position, so the lists play no part). The CUDA test runs them together."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.kernels import paged_flex_chunk
from memfit.llm.kernels.paged_flex import flex_available
from memfit.llm.kernels.paged_flex_chunk import Q_BLOCK, FlexPagedChunk
from tests.llm.kernels.test_cpu_paged import paged_layout

pytestmark = pytest.mark.skipif(not flex_available(), reason="flex attention needs torch >= 2.5")

CASES = [(40, 9, None), (100, 200, None), (16, 16, None), (130, 70, 50), (5, 300, 33), (0, 140, None)]


def _chunk(seed, start, n, hq=12, hkv=4, d=32, bs=16):
    g = torch.Generator().manual_seed(seed)
    end = start + n
    k, v = torch.randn(end, hkv, d, generator=g), torch.randn(end, hkv, d, generator=g)
    kp, vp, table = paged_layout([k], [v], bs, g)
    return k, v, kp, vp, table[0], torch.randn(n, hq, d, generator=g)


def _reference(q, k, v, start, window, scale):
    end, n = k.shape[0], q.shape[0]
    qpos, kpos = torch.arange(start, start + n)[:, None], torch.arange(end)[None]
    keep = kpos <= qpos
    if window:
        keep &= kpos > qpos - window
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("nhd,khd->hnk", q.double(), k.double().repeat_interleave(g, 1)) * scale
    p = s.masked_fill(~keep, float("-inf")).softmax(-1)
    return torch.einsum("hnk,khd->nhd", p, v.double().repeat_interleave(g, 1))


@pytest.mark.parametrize("start,n,window", CASES)
def test_block_lists_cover_exactly_what_the_chunk_sees(start, n, window):
    """Full blocks: every row of the query block sees all of them; full + partial: every block some row sees."""
    _, _, kp, _, table, q = _chunk(1, start, n)
    chunk = FlexPagedChunk(torch.device("cpu"))
    bs, nb = kp.shape[1], kp.shape[0]
    mask = chunk._block_mask(table[: -(-(start + n) // bs)], n, start, window, nb, bs)
    inv = {int(p): lg for lg, p in enumerate(table.tolist())}
    for j in range(-(-n // Q_BLOCK)):
        rows = torch.arange(start + j * Q_BLOCK, start + min(n, (j + 1) * Q_BLOCK))  # positions of its rows
        full = {inv[int(p)] for p in mask.full_kv_indices[0, 0, j, : int(mask.full_kv_num_blocks[0, 0, j])]}
        part = {inv[int(p)] for p in mask.kv_indices[0, 0, j, : int(mask.kv_num_blocks[0, 0, j])]}
        assert not full & part
        lo = (rows - (window or 10**9) + 1).clamp(min=0)  # each row sees positions [lo, row]
        for lb in range(-(-(start + n) // bs)):
            pos = torch.arange(lb * bs, (lb + 1) * bs)
            seen = (pos[None] <= rows[:, None]) & (pos[None] >= lo[:, None])  # (rows, bs)
            assert (lb in full) == bool(seen.all()), (j, lb)
            assert (lb in full or lb in part) == bool(seen.any()), (j, lb)


@pytest.mark.parametrize("start,n,window", CASES)
def test_mask_function_matches_float64_reference_in_eager_flex(monkeypatch, start, n, window):
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(paged_flex_chunk, "_compiled_flex", lambda: flex_attention)  # eager: the mask everywhere
    k, v, kp, vp, table, q = _chunk(2, start, n)
    out = FlexPagedChunk(torch.device("cpu")).attention(q, kp, vp, table, start, start + n, 0.2, window)
    torch.testing.assert_close(out.double(), _reference(q, k, v, start, window, 0.2), rtol=1e-5, atol=1e-5)


def test_a_failed_compile_gathers_the_chunk_instead(monkeypatch):
    def broken():
        def fn(*args, **kwargs):
            raise RuntimeError("no Triton here")
        return fn

    monkeypatch.setattr(paged_flex_chunk, "_compiled_flex", broken)
    k, v, kp, vp, table, q = _chunk(3, 130, 70)
    chunk = FlexPagedChunk(torch.device("cpu"))
    out = chunk.attention(q, kp, vp, table, 130, 200, 0.2, 50)
    torch.testing.assert_close(out.double(), _reference(q, k, v, 130, 50, 0.2), rtol=1e-5, atol=1e-5)
    assert "no Triton here" in chunk.failed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("start,n,window", CASES)
def test_flex_chunk_on_cuda_matches_reference(start, n, window):
    k, v, kp, vp, table, q = _chunk(4, start, n)
    dev = torch.device("cuda")
    chunk = FlexPagedChunk(dev)
    out = chunk.attention(q.to(dev), kp.to(dev), vp.to(dev), table.to(dev), start, start + n, 0.2, window)
    assert chunk.failed is None
    torch.testing.assert_close(out.double().cpu(), _reference(q, k, v, start, window, 0.2), rtol=1e-4, atol=1e-4)
