"""Attention helpers: the hand-written bf16 decode path agrees with PyTorch's SDPA in float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memfit.llm.kernels.attention import SMALL_ATTENTION_ELEMS, Workspace, attend_one, causal_mask, decode_attention


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


@pytest.mark.parametrize("masked", [True, False])
def test_long_bf16_decode_attention_uses_the_workspace_and_matches(masked):
    """Past SMALL_ATTENTION_ELEMS the bf16 path copies K/V head-major into the workspace: same results, and
    the second call reuses the same memory."""
    torch.manual_seed(1)
    b, length, hkv, d = 4, 600, 2, 64
    assert b * length * hkv * d > SMALL_ATTENTION_ELEMS
    cache = torch.randn(2 * b, length + 7, hkv, d).to(torch.bfloat16)
    k, v = cache[:b, :length], cache[b:, :length]  # strided views, as from the cache
    q = torch.randn(b, 3 * hkv, d).to(torch.bfloat16)
    lens = torch.tensor([600, 1, 333, 64]) if masked else None
    ws = Workspace()
    first = decode_attention(q, k, v, lens, 0.125, ws)
    ptrs = [t.data_ptr() for t in ws._bufs.values()]
    second = decode_attention(q, k, v, lens, 0.125, ws)
    assert [t.data_ptr() for t in ws._bufs.values()] == ptrs and ws.nbytes == 2 * b * length * hkv * d * 2
    assert torch.equal(first, second)
    assert torch.equal(first, decode_attention(q, k, v, lens, 0.125))  # a throwaway workspace: same numbers
    assert (first.float() - reference(q, k, v, lens, 0.125)).abs().max().item() < 2e-2


def test_short_bf16_decode_token_takes_the_float32_path():
    torch.manual_seed(2)
    k, v = torch.randn(2, 40, 2, 16).to(torch.bfloat16)
    q = torch.randn(1, 4, 16).to(torch.bfloat16)
    got = attend_one(q, k, v, 0.25)
    want = attend_one(q.float(), k.float(), v.float(), 0.25).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def virtual_cache_with_gaps(dtype):
    """A one-layer virtual cache holding sequences 0, 2, 3, 5 in slots 0, 2, 3, 5 (1 and 4 freed: gaps)
    -> (cache, lens by sequence, generator, (Hq, Hkv, D))."""
    from memfit.llm.kv import create_kv_cache
    from memfit.llm.kv.base import KVLayout, SeqStep
    from memfit.memory.budget import MemoryBudget

    hq, hkv, d = 8, 2, 32
    layout = KVLayout(1, hkv, d, dtype, max_seq_len=200)
    cache = create_kv_cache("virtual", layout, MemoryBudget(2**24), max_seqs=8, prefault=False)
    g = torch.Generator().manual_seed(0)
    lens = {0: 70, 1: 5, 2: 130, 3: 64, 4: 33, 5: 90}
    for sid, n in lens.items():
        assert cache.try_allocate(sid, n + 1)
        kv = torch.randn(2, n, hkv, d, generator=g).to(dtype)
        cache.write(0, cache.plan_step([SeqStep(sid, 0, n)]), kv[0], kv[1])
    cache.free(1)
    cache.free(4)
    return cache, lens, g, (hq, hkv, d)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_virtual_decode_with_slot_gaps_reads_views_not_a_gather(dtype, tol, monkeypatch):
    """Decode rows whose slots have gaps and are out of order go through runs of views of the virtual cache
    (kernels/slot_runs.py), never through context_batch's gather, with the per-sequence answer."""
    from memfit.llm.kernels.attention import CachedAttention
    from memfit.llm.kernels.slot_runs import slot_runs
    from memfit.llm.kv.base import SeqStep
    from memfit.llm.kv.virtual import VirtualKVCache

    cache, lens, g, (hq, hkv, d) = virtual_cache_with_gaps(dtype)  # runs [0], [2, 3], [5]
    batch = [5, 3, 0, 2]  # not in slot order either
    assert [cache.slot_of(s) for s in batch] == [5, 3, 0, 2]
    runs = slot_runs([5, 3, 0, 2], [lens[s] + 1 for s in batch], 64, 192, torch.device("cpu"))
    assert [(r.lo, r.rows) for r in runs] == [(0, [2]), (2, [3, 1]), (5, [0])]
    assert runs[1].index is not None and runs[0].index is None  # rows 3, 1 must be picked out; row 2 is a slice
    assert runs[0].length == 128 and runs[1].length == 192  # each run reads up to its own longest, padded
    steps = [SeqStep(s, lens[s], 1) for s in batch]
    q = torch.randn(4, hq, d, generator=g).to(dtype)
    k_new, v_new = torch.randn(2, 4, hkv, d, generator=g).to(dtype)
    monkeypatch.setattr(VirtualKVCache, "context_batch", lambda *a: pytest.fail("gathered a decode batch"))
    attn = CachedAttention(cache, steps, num_decode=4, scale=d ** -0.5)
    out = attn(0, q, k_new, v_new)
    for i, st in enumerate(steps):
        kc, vc = cache.context(0, attn.plan, i)  # (end, Hkv, D) views: the new token included
        ref = reference(q[i : i + 1], kc.unsqueeze(0), vc.unsqueeze(0), None, d ** -0.5)
        torch.testing.assert_close(out[i : i + 1].float(), ref, rtol=tol, atol=tol)
    cache.close()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_bridged_slot_runs_give_the_per_sequence_answer(dtype, tol, monkeypatch):
    """Runs joined across empty slots (what CUDA uses: one launch, not one a run) give each row the answer of
    its own sequence; the empty slots they read are made readable first, and nothing is gathered."""
    from memfit.llm.kernels import attention as attention_mod
    from memfit.llm.kernels.slot_runs import slot_runs
    from memfit.llm.kv.base import SeqStep
    from memfit.llm.kv.virtual import VirtualKVCache

    cpu = torch.device("cpu")
    runs = slot_runs([5, 3, 0, 2], [71, 65, 71, 131], 64, 192, cpu, bridge=True)
    assert [(r.lo, r.span, r.rows, r.gaps) for r in runs] == [(0, 6, [2, 3, 1, 0], [1, 4])]
    assert runs[0].lens.tolist() == [71, 1, 131, 65, 1, 71]  # the gaps attend to one position
    far = slot_runs([0, 1, 9], [10, 10, 10], 64, 192, cpu, bridge=True)  # 7 empty slots for 3 rows: not joined
    assert [(r.lo, r.span, r.rows) for r in far] == [(0, 2, [0, 1]), (9, 1, [2])]

    cache, lens, g, (hq, hkv, d) = virtual_cache_with_gaps(dtype)
    batch = [5, 3, 0, 2]
    monkeypatch.setattr(attention_mod, "bridges_gaps", lambda device: True)
    monkeypatch.setattr(VirtualKVCache, "context_batch", lambda *a: pytest.fail("gathered a decode batch"))
    readable = []
    monkeypatch.setattr(VirtualKVCache, "make_slots_readable", lambda self, slots: readable.extend(slots))
    steps = [SeqStep(s, lens[s], 1) for s in batch]
    q = torch.randn(4, hq, d, generator=g).to(dtype)
    k_new, v_new = torch.randn(2, 4, hkv, d, generator=g).to(dtype)
    attn = attention_mod.CachedAttention(cache, steps, num_decode=4, scale=d ** -0.5)
    out = attn(0, q, k_new, v_new)
    assert readable == [(1, 192), (4, 192)]
    for i, st in enumerate(steps):
        kc, vc = cache.context(0, attn.plan, i)
        ref = reference(q[i : i + 1], kc.unsqueeze(0), vc.unsqueeze(0), None, d ** -0.5)
        torch.testing.assert_close(out[i : i + 1].float(), ref, rtol=tol, atol=tol)
    cache.close()


@pytest.mark.parametrize("kind", ["virtual", "paged"])
def test_a_lone_decode_row_takes_the_batched_path_on_gpus(kind, monkeypatch):
    """On a GPU one decode row goes through decode_plan and decode_attention (4-D SDPA), not attend_one's 3-D
    call (10x the kernel time there); the answer is the per-sequence one. Forced here on the CPU."""
    from memfit.llm.kernels import attention as attention_mod
    from memfit.llm.kv import create_kv_cache
    from memfit.llm.kv.base import KVLayout, SeqStep
    from memfit.memory.budget import MemoryBudget

    g = torch.Generator().manual_seed(12)
    layout = KVLayout(1, 2, 32, torch.float32, max_seq_len=256)
    cache = create_kv_cache(kind, layout, MemoryBudget(64 * 2**20), max_seqs=2)
    assert cache.try_allocate(1, 71)
    cache.write(0, cache.plan_step([SeqStep(1, 0, 70)]), *torch.randn(2, 70, 2, 32, generator=g))
    q, k_new, v_new = torch.randn(1, 6, 32, generator=g), *torch.randn(2, 1, 2, 32, generator=g)
    steps = [SeqStep(1, 70, 1)]
    per_sequence = attention_mod.CachedAttention(cache, steps, 1, 0.2)
    want = per_sequence(0, q, k_new, v_new)
    assert per_sequence.decode_plan is None  # the CPU's way: attend_one
    monkeypatch.setattr(attention_mod, "batch_one_row", lambda device: True)
    monkeypatch.setattr(attention_mod, "attend_one", lambda *a, **k: pytest.fail("went through attend_one"))
    batched = attention_mod.CachedAttention(cache, steps, 1, 0.2)
    got = batched(0, q, k_new, v_new)
    assert batched.decode_plan is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cache.close()
