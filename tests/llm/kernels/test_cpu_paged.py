"""memfit's paged decode attention (cpu_paged.cpp, CpuDecodeOps.paged_attention): it reads K/V through a block
table in place, so it must agree with a float64 reference, and bit for bit with the virtual cache's kernel
(the same arithmetic, attend.h) on the same rows laid out contiguously."""
from __future__ import annotations

import math

import pytest
import torch

from memfit.llm.kernels.decode import set_by_seq_min_bytes, set_decode_amx
from tests.llm.kernels.test_cpu_decode import ops_for, reference_attention


@pytest.fixture(autouse=True)
def _avx512_decode():
    """Both readers on AVX-512: the default mode on an AMX host ("auto") reads head-major paged blocks on the tiles
    and some per-layer rows on AVX-512 (fewer than 4 query heads a KV head, rows wider than 512 bytes), two
    arithmetics (test_decode_amx.py checks the tiles' readers agree)."""
    old = set_decode_amx(False)
    yield
    if old is not None:
        set_decode_amx(old)


def paged_layout(rows_k, rows_v, block_size, g, spare=3):
    """Scatter each sequence's rows (list of (T_i, Hkv, D)) into shuffled blocks of a pool with `spare` unused
    blocks of noise; -> pools (blocks, bs, Hkv, D) and the (B, nb_max) table (padded with block 0)."""
    nbs = [-(-k.shape[0] // block_size) for k in rows_k]
    total = sum(nbs) + spare
    hkv, d = rows_k[0].shape[1:]
    kp = torch.randn(total, block_size, hkv, d, generator=g).to(rows_k[0].dtype)  # noise where nothing is written
    vp = torch.randn(total, block_size, hkv, d, generator=g).to(rows_k[0].dtype)
    perm = torch.randperm(total, generator=g).tolist()
    table = torch.zeros(len(rows_k), max(nbs), dtype=torch.int64)
    for i, (k, v) in enumerate(zip(rows_k, rows_v)):
        ids, perm = perm[: nbs[i]], perm[nbs[i]:]
        table[i, : nbs[i]] = torch.tensor(ids)
        for j, blk in enumerate(ids):
            part = slice(j * block_size, min((j + 1) * block_size, k.shape[0]))
            n = part.stop - part.start
            kp[blk, :n], vp[blk, :n] = k[part], v[part]
    return kp, vp, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,hq,hkv", [(32, 4, 4), (64, 12, 4), (128, 14, 2)])
@pytest.mark.parametrize("block_size", [4, 16, 32])  # shorter than, equal to and longer than the kernel's 16-row chunk
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("head_major", [False, True])  # inside a block: token, head (GPU) or head, token (CPU)
def test_paged_attention_matches_float64_and_the_strided_kernel(dtype, head_dim, hq, hkv, block_size, window,
                                                                head_major):
    ops = ops_for(dtype)
    g = torch.Generator().manual_seed(11)
    lens = torch.tensor([1, 33, 80, 16], dtype=torch.int64)  # 1 token, a 16-row tail, several blocks, one exact block
    max_len = int(lens.max())
    cache_k = torch.randn(len(lens), max_len, hkv, head_dim, generator=g).to(dtype)  # the contiguous (virtual) layout
    cache_v = torch.randn(len(lens), max_len, hkv, head_dim, generator=g).to(dtype)
    kp, vp, table = paged_layout([cache_k[i, :n] for i, n in enumerate(lens)],
                                 [cache_v[i, :n] for i, n in enumerate(lens)], block_size, g)
    if head_major:  # the same (blocks, bs, Hkv, D) view over (blocks, Hkv, bs, D) storage
        kp, vp = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kp, vp))
    q = torch.randn(len(lens), hq, head_dim, generator=g).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    assert ops.can_attend_paged(q, kp)
    out = ops.paged_attention(q, kp, vp, table, lens, scale, window)
    slots = torch.arange(len(lens), dtype=torch.int64)
    ref = reference_attention(q, cache_k, cache_v, slots, lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    strided = ops.decode_attention(q, cache_k, cache_v, slots, lens, scale, window)
    assert torch.equal(out, strided)  # same arithmetic in the same order: only the row addresses differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,hq,hkv", [(64, 12, 4), (128, 14, 2), (32, 16, 8)])
@pytest.mark.parametrize("window", [None, 300])
def test_long_contexts_read_all_heads_in_one_pass_to_the_same_bits(dtype, head_dim, hq, hkv, window):
    """From 256 tokens (and, by default, 24 MiB of K and V a step on AVX-512, any on AMX tiles: set to 0 here, so these
    small contexts take it)
    a per-layer (heads side by side) cache is read one sequence at a time, every head on a block of tokens in turn
    (attend.h's attend_heads); the paged reader keeps the head-by-head kernel. Same bits, and a float64 reference:
    lengths around the 16-token chunks and 64-token blocks, one short row beside them. With the default threshold
    the same call runs head by head (on AVX-512), to the same bits again."""
    ops = ops_for(dtype)
    old = set_by_seq_min_bytes(0)
    g = torch.Generator().manual_seed(17)
    lens = torch.tensor([256, 1, 300, 517], dtype=torch.int64)
    max_len = int(lens.max())
    cache_k = torch.randn(len(lens), max_len, hkv, head_dim, generator=g).to(dtype)
    cache_v = torch.randn(len(lens), max_len, hkv, head_dim, generator=g).to(dtype)
    kp, vp, table = paged_layout([cache_k[i, :n] for i, n in enumerate(lens)],
                                 [cache_v[i, :n] for i, n in enumerate(lens)], 16, g)
    kp, vp = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kp, vp))  # head-major blocks, as on a CPU
    q = torch.randn(len(lens), hq, head_dim, generator=g).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    slots = torch.arange(len(lens), dtype=torch.int64)
    try:
        strided = ops.decode_attention(q, cache_k, cache_v, slots, lens, scale, window)
    finally:
        set_by_seq_min_bytes(old)
    ref = reference_attention(q, cache_k, cache_v, slots, lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(strided.double(), ref, rtol=tol, atol=tol)
    assert torch.equal(strided, ops.paged_attention(q, kp, vp, table, lens, scale, window))
    assert old == -1 and torch.equal(strided, ops.decode_attention(q, cache_k, cache_v, slots, lens, scale, window))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_writes_the_new_rows_into_their_blocks(dtype):
    ops = ops_for(dtype)
    g = torch.Generator().manual_seed(12)
    hq, hkv, d, bs = 8, 2, 64, 16
    kp = torch.randn(6, bs, hkv, d, generator=g).to(dtype)
    vp = torch.randn(6, bs, hkv, d, generator=g).to(dtype)
    table = torch.tensor([[4, 1, 0], [5, 2, 0]], dtype=torch.int64)  # row 1 holds 2 blocks (padded with 0)
    lens = torch.tensor([33, 17], dtype=torch.int64)  # new tokens at 32 (block 0, offset 0) and 16 (block 2, 0)
    kv_new = torch.randn(2, 2 * hkv * d, generator=g).to(dtype)  # fused, as a k/v split of the projection gives
    k_new, v_new = (t.view(2, hkv, d) for t in kv_new.split(hkv * d, dim=-1))
    expect_k, expect_v = kp.clone(), vp.clone()
    expect_k[0, 0], expect_v[0, 0] = k_new[0], v_new[0]
    expect_k[2, 0], expect_v[2, 0] = k_new[1], v_new[1]
    q = torch.randn(2, hq, d, generator=g).to(dtype)
    out = ops.paged_attention(q, kp, vp, table, lens, 0.125, k_new=k_new, v_new=v_new)
    assert torch.equal(kp, expect_k) and torch.equal(vp, expect_v)  # exactly those rows changed
    flat_k = [expect_k[table[i]].flatten(0, 1)[: lens[i]] for i in range(2)]  # (T, Hkv, D) per row, gathered
    flat_v = [expect_v[table[i]].flatten(0, 1)[: lens[i]] for i in range(2)]
    ck = torch.zeros(2, 33, hkv, d, dtype=dtype)
    cv = torch.zeros(2, 33, hkv, d, dtype=dtype)
    for i in range(2):
        ck[i, : lens[i]], cv[i, : lens[i]] = flat_k[i], flat_v[i]
    ref = reference_attention(q, ck, cv, torch.arange(2), lens, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_paged_attention_refuses_block_sizes_it_cannot_address():
    ops = ops_for(torch.float32)
    q = torch.zeros(1, 4, 64)
    assert not ops.can_attend_paged(q, torch.zeros(3, 12, 4, 64))  # not a power of two
    assert not ops.can_attend_paged(torch.zeros(1, 4, 48), torch.zeros(3, 16, 4, 48))  # a head size it was not built for
    assert ops.can_attend_paged(q, torch.zeros(3, 16, 4, 64))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_on_the_paged_kernel_gives_the_gather_path_tokens(tmp_path, dtype, monkeypatch):
    """`--kv-cache paged` decodes through the paged kernel (the whole-step stack, and op by op) with the tokens of
    the gather path, and of the virtual cache; with the kernel it never gathers a decode batch."""
    ops_for(getattr(torch, dtype))
    from memfit.llm.engine.llm_engine import LLMEngine
    from memfit.llm.kv.paged import PagedKVCache
    from tests.llm.kernels.test_cpu_decode import _greedy
    from tests.llm.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path, family="llama", dtype=dtype, hidden_size=128)
    prompts = [list(range(3, 23)), list(range(40, 45)), list(range(7, 40))]  # 20, 5, 33 tokens: partial blocks
    opts = {"model": str(path), "device": "cpu", "kv_budget": "8MiB", "max_num_seqs": 3, "block_size": 4}
    gather = _greedy(LLMEngine(**opts, kv_cache="paged", cpu_kernels=False, cpu_linear="onednn"), prompts)
    assert _greedy(LLMEngine(**opts, kv_cache="virtual", cpu_kernels=False, cpu_linear="onednn"), prompts) == gather

    def no_gather(*a, **k):
        raise AssertionError("a decode batch was gathered")

    monkeypatch.setattr(PagedKVCache, "context_batch", no_gather)
    stack = LLMEngine(**opts, kv_cache="paged", cpu_linear="blocked")
    assert stack.runner.stack is not None  # whole decode steps in one C++ call, through the block tables
    assert _greedy(stack, prompts) == gather
    op_by_op = LLMEngine(**opts, kv_cache="paged", cpu_linear="onednn")
    assert op_by_op.runner.stack is None and op_by_op.backends.cpu_kernels
    assert _greedy(op_by_op, prompts) == gather


def test_kernels_read_every_cache_layout_to_the_same_output():
    """Per-layer and head-major virtual caches, and the paged cache (head-major blocks), hold the same tokens at
    other strides: through CachedAttention with memfit's kernels, a decode step gives bit-identical outputs."""
    ops = ops_for(torch.bfloat16)
    from memfit.llm.kernels.attention import CachedAttention
    from memfit.llm.kv import create_kv_cache
    from memfit.llm.kv.base import KVLayout, SeqStep
    from memfit.memory.budget import MemoryBudget

    hq, hkv, d = 8, 2, 64
    layout = KVLayout(2, hkv, d, torch.bfloat16, max_seq_len=96)
    g = torch.Generator().manual_seed(13)
    lens = [40, 7, 90]
    data = [torch.randn(2, n, hkv, d, generator=g).to(torch.bfloat16) for n in lens]
    q = torch.randn(3, hq, d, generator=g).to(torch.bfloat16)
    k_new, v_new = torch.randn(2, 3, hkv, d, generator=g).to(torch.bfloat16)
    outs = []
    for kind, opts in (("virtual", {"max_seqs": 3, "prefault": False}),
                       ("virtual", {"max_seqs": 3, "prefault": False, "head_major": True}),
                       ("paged", {"block_size": 16})):
        cache = create_kv_cache(kind, layout, MemoryBudget(2**24), **opts)
        for sid, (n, kv) in enumerate(zip(lens, data)):
            assert cache.try_allocate(sid, n + 1)
            cache.write(1, cache.plan_step([SeqStep(sid, 0, n)]), kv[0], kv[1])
        attn = CachedAttention(cache, [SeqStep(s, n, 1) for s, n in enumerate(lens)], 3, d ** -0.5, kernels=ops)
        assert attn.kernels is not None
        outs.append(attn(1, q, k_new.clone(), v_new.clone()))
        cache.close()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
