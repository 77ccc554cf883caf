"""Batched cached-prefix chunks (kernels/chunk_batch.py) against per-sequence attention (attend_one)."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.kernels import chunk_batch
from memfit.llm.kernels.attention import attend_one


def run_case(dtype, bridge, mask_shift=0, monkeypatch=None):
    torch.manual_seed(0)
    S, L, hkv, hq, d, scale = 12, 96, 2, 4, 16, 0.25
    k_all = torch.randn(S, L, hkv, d).to(dtype)
    v_all = torch.randn(S, L, hkv, d).to(dtype)
    # chunks of different lengths (1..5 rows), slots out of order with gaps (1, 3, 4 ... empty)
    slots, starts, nnew = [7, 2, 5, 10, 0], [20, 3, 70, 40, 9], [5, 3, 1, 4, 2]
    ends = [s + n for s, n in zip(starts, nnew)]
    pre = 3  # decode rows before the chunks
    rows, r = [], pre
    for n in nnew:
        rows.append(r)
        r += n
    q = torch.randn(r, hq, d).to(dtype)
    runs, width_q = chunk_batch.plan_chunks(rows, starts, ends, slots, 64, L, q.device, bridge)
    if mask_shift:
        for c in runs:
            c.qpos.add_(mask_shift).clamp_(max=L - 1)
    out = torch.zeros_like(q)
    chunk_batch.attend_chunks(q, k_all, v_all, runs, width_q, scale, out)
    assert torch.isfinite(out).all()
    assert (out[:pre] == 0).all()  # rows outside the chunks untouched
    worst = 0.0
    for row, s, e, n in zip(rows, slots, ends, nnew):
        ref = attend_one(q[row : row + n].float(), k_all[s, :e].float(), v_all[s, :e].float(), scale)
        worst = max(worst, (out[row : row + n].float() - ref).abs().max().item())
    return worst


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bridge", [False, True])
def test_batched_chunks_match_per_sequence(dtype, tol, bridge):
    assert run_case(dtype, bridge) <= tol


@pytest.mark.parametrize("shift", [1, -1])
def test_mask_off_by_one_is_caught(shift):
    assert run_case(torch.float32, False, mask_shift=shift) > 1e-3


def test_cached_attention_batches_verify_chunks_on_a_virtual_cache(monkeypatch):
    """Through CachedAttention on the bundled engine's path: the spec engine tests cover the tokens; here the
    batched plan must be taken for two or more chunks with cached prefixes."""
    from memfit.llm.kernels.attention import CachedAttention

    class Step:
        def __init__(self, start, n):
            self.start, self.num_new, self.end = start, n, start + n

    class KV:
        fixed_stride, block_tables = True, False

        def plan_step(self, steps, pad_to=1):
            return type("P", (), {"slots": [4, 1, 2]})()

    att = CachedAttention(KV(), [Step(5, 3), Step(9, 2), Step(0, 4)], num_decode=0, scale=1.0)
    att.kv.strided = lambda layer: (torch.zeros(6, 64, 1, 8), torch.zeros(6, 64, 1, 8))
    att.kv.layout = type("Lay", (), {"device": torch.device("cpu")})()
    idx, runs, width_q = att._chunk_plan
    assert idx == {0, 1} and width_q == 3
    monkeypatch.setenv("MEMFIT_CHUNK_LOOP", "1")
    att2 = CachedAttention(KV(), [Step(5, 3), Step(9, 2)], num_decode=0, scale=1.0)
    assert att2._chunk_plan is None


@pytest.mark.parametrize("bridge", [False, True])
def test_stacked_explicit_masks_match_per_sequence_masked_attention(bridge):
    """Tree verification's path: each chunk brings its own (count, end) mask (random here: the prefix always
    visible, the chunk's own keys at random), stacked per run; every real row gets its sequence's masked answer."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    S, L, hkv, hq, d, scale = 12, 96, 2, 4, 16, 0.25
    k_all, v_all = torch.randn(2, S, L, hkv, d, generator=g)
    slots, starts, nnew = [7, 2, 5, 10, 0], [20, 3, 70, 40, 9], [5, 3, 1, 4, 2]
    ends = [s + n for s, n in zip(starts, nnew)]
    rows = [sum(nnew[:i]) for i in range(len(nnew))]
    q = torch.randn(sum(nnew), hq, d, generator=g)
    masks = [torch.cat([torch.ones(n, s, dtype=torch.bool), torch.rand(n, n, generator=g) < 0.5], dim=1)
             for s, n in zip(starts, nnew)]
    runs, width_q = chunk_batch.plan_chunks(rows, starts, ends, slots, 64, L, q.device, bridge, masks)
    assert all(c.mask is not None and c.mask.shape == (c.run.span, 1, width_q, c.run.length) for c in runs)
    out = chunk_batch.attend_chunks(q, k_all, v_all, runs, width_q, scale, torch.zeros_like(q))
    for row, s, e, n, m in zip(rows, slots, ends, nnew, masks):
        ref = F.scaled_dot_product_attention(q[row : row + n].transpose(0, 1), k_all[s, :e].transpose(0, 1),
                                             v_all[s, :e].transpose(0, 1), attn_mask=m, scale=scale,
                                             enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[row : row + n], ref, rtol=1e-5, atol=1e-5)
