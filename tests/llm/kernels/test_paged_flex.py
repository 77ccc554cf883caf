"""The paged cache's in-place kernel for GPUs (kernels/paged_flex.py, flex attention over the block table). It runs
compiled; here inductor's CPU template stands in for Triton, so the block lists and the mask function that GPUs
run are checked against a float64 reference on the same shuffled pools the CPU kernel's tests use."""
from __future__ import annotations

import math

import pytest
import torch

from memfit.llm.kernels.attention import CachedAttention
from memfit.llm.kernels.paged_flex import FlexPagedAttention, flex_available, flex_paged_for
from memfit.llm.kv import create_kv_cache
from memfit.llm.kv.base import KVLayout, SeqStep
from memfit.memory.budget import MemoryBudget
from tests.llm.kernels.test_cpu_paged import paged_layout
from tests.llm.kernels.test_cpu_decode import reference_attention

pytestmark = pytest.mark.skipif(not flex_available(), reason="flex attention needs torch >= 2.5")


@pytest.fixture(scope="module")
def flex():
    return FlexPagedAttention(torch.device("cpu"))


def _case(g, lens, hq=12, hkv=4, d=32, bs=16):
    max_len = int(lens.max())
    cache_k = torch.randn(len(lens), max_len, hkv, d, generator=g)  # the contiguous (virtual) layout
    cache_v = torch.randn(len(lens), max_len, hkv, d, generator=g)
    kp, vp, table = paged_layout([cache_k[i, :n] for i, n in enumerate(lens)],
                                 [cache_v[i, :n] for i, n in enumerate(lens)], bs, g)
    q = torch.randn(len(lens), hq, d, generator=g)
    return cache_k, cache_v, kp, vp, table, q


# windows: none; one that starts inside a block (a partial head block, and for the short rows a head and tail in
# the same block); one a whole number of blocks long
@pytest.mark.parametrize("window", [None, 21, 32])
def test_flex_paged_matches_float64_reference(flex, window):
    g = torch.Generator().manual_seed(5)
    # 1 token, a partial tail, an exact block, several blocks with a tail, exact blocks
    lens = torch.tensor([1, 9, 16, 75, 64], dtype=torch.int64)
    cache_k, cache_v, kp, vp, table, q = _case(g, lens)
    assert flex.can_attend_paged(q, kp)
    scale = 1 / math.sqrt(q.shape[-1])
    out = flex.paged_attention(q, kp, vp, table, lens, scale, window)
    ref = reference_attention(q, cache_k, cache_v, torch.arange(len(lens)), lens, scale, window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_flex_paged_writes_new_tokens_then_attends(flex):
    """k_new/v_new land at position lens-1 through the table (the blocks the other rows own are untouched)."""
    g = torch.Generator().manual_seed(6)
    lens = torch.tensor([17, 40, 3], dtype=torch.int64)
    cache_k, cache_v, kp, vp, table, q = _case(g, lens)
    k_new, v_new = torch.randn(3, 4, 32, generator=g), torch.randn(3, 4, 32, generator=g)
    before = kp.clone()
    out = flex.paged_attention(q, kp, vp, table, lens, 0.2, None, k_new, v_new)
    for i, n in enumerate(lens.tolist()):
        cache_k[i, n - 1], cache_v[i, n - 1] = k_new[i], v_new[i]
        blk, off = int(table[i, (n - 1) // 16]), (n - 1) % 16
        assert torch.equal(kp[blk, off], k_new[i])
        before[blk, off] = k_new[i]
    assert torch.equal(kp, before)  # nothing else in the pool moved
    ref = reference_attention(q, cache_k, cache_v, torch.arange(3), lens, 0.2, None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_flex_paged_refuses_layouts_it_cannot_address(flex):
    q = torch.randn(2, 8, 32)
    token_major = torch.zeros(6, 16, 4, 32)
    assert flex.can_attend_paged(q, token_major)
    assert not flex.can_attend_paged(q, token_major.transpose(1, 2).contiguous().transpose(1, 2))  # head-major
    assert not flex.can_attend_paged(q, torch.zeros(6, 8, 4, 32))  # blocks under Triton's 16 rows
    assert not flex.can_attend_paged(torch.randn(2, 6, 32), token_major)  # 6 query heads over 4 KV heads


def _grown_paged_cache(lens, hkv=4, d=32, seed=7):
    """A token-major paged cache (the GPU layout) whose sequences grew block by block in turn, so each one's
    blocks are interleaved with the others', holding random K/V of lens[i] tokens in each of 2 layers."""
    layout = KVLayout(2, hkv, d, torch.float32, max_seq_len=128)
    cache = create_kv_cache("paged", layout, MemoryBudget(64 * 2**20), block_size=16, max_seqs=len(lens),
                            head_major=False)
    g = torch.Generator().manual_seed(seed)
    for n in range(16, max(lens) + 17, 16):
        for sid, total in enumerate(lens):
            if n - 16 < total + 1:
                assert (cache.try_grow if n > 16 else cache.try_allocate)(sid, min(n, total + 1))
    for layer in range(2):
        for sid, n in enumerate(lens):
            k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
            cache.write(layer, cache.plan_step([SeqStep(sid, 0, n)]), k, v)
    return cache


def test_cached_attention_reads_paged_cache_in_place_with_flex():
    """The engine's read path (CachedAttention) on a paged cache with the flex kernel: the same outputs and the
    same cache contents after the step as its gather path, in both layers (the step's mask built once)."""
    lens = [5, 40, 16, 33]
    caches = [_grown_paged_cache(lens) for _ in range(2)]
    g = torch.Generator().manual_seed(8)
    steps = [SeqStep(sid, n, 1) for sid, n in reversed(list(enumerate(lens)))]  # decode, batch out of order
    flex = FlexPagedAttention(torch.device("cpu"))
    attns = [CachedAttention(c, steps, len(steps), 0.25, kernels=k) for c, k in zip(caches, (flex, None))]
    for layer in range(2):
        q = torch.randn(len(steps), 12, 32, generator=g)
        k, v = torch.randn(len(steps), 4, 32, generator=g), torch.randn(len(steps), 4, 32, generator=g)
        got, want = (a(layer, q, k, v) for a in attns)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        held = sorted({b for sid in range(len(lens)) for b in caches[0].block_table(sid)})  # the rest: never written
        for pools_flex, pools_gather in zip(caches[0].pools(layer), caches[1].pools(layer)):
            assert torch.equal(pools_flex[held], pools_gather[held])
    assert attns[0]._paged and attns[1].kernels is None  # the flex run took the in-place path, the other gathered
    for c in caches:
        c.close()


def test_the_kernel_takes_a_pool_on_its_device_however_the_device_is_named():
    from memfit.llm.kernels.paged_flex import same_device

    assert same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not same_device(torch.device("cuda", 0), torch.device("cuda", 1))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))


def test_flex_is_the_paged_path_on_cuda_only():
    layout = KVLayout(1, 4, 32, torch.float32, max_seq_len=64)
    cpu_paged = create_kv_cache("paged", layout, MemoryBudget(8 * 2**20), block_size=16, head_major=False)
    assert flex_paged_for(cpu_paged) is None  # the CPU's in-place paged path is memfit's C++ kernel
    cpu_paged.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 21])
def test_flex_paged_on_cuda_matches_reference_and_is_chosen(window, monkeypatch):
    """On CUDA the paged cache's read path picks flex by itself (Triton's kernel), and agrees with the gather."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(9)
    lens = torch.tensor([1, 9, 16, 75, 64], dtype=torch.int64)
    cache_k, cache_v, kp, vp, table, q = _case(g, lens)
    flex = FlexPagedAttention(dev)
    out = flex.paged_attention(q.to(dev), kp.to(dev), vp.to(dev), table.to(dev), lens.to(dev), 0.2, window)
    ref = reference_attention(q, cache_k, cache_v, torch.arange(len(lens)), lens, 0.2, window)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    layout = KVLayout(1, 4, 32, torch.bfloat16, max_seq_len=128, device=dev)
    cache = create_kv_cache("paged", layout, MemoryBudget(64 * 2**20), block_size=16, max_seqs=4)
    assert flex_paged_for(cache) is not None
    for sid, n in enumerate([5, 40, 16, 33]):
        assert cache.try_allocate(sid, n + 1)
        cache.write(0, cache.plan_step([SeqStep(sid, 0, n)]), *(torch.randn(2, n, 4, 32, device=dev).to(torch.bfloat16)))
    steps = [SeqStep(sid, n, 1) for sid, n in enumerate([5, 40, 16, 33])]
    qd = torch.randn(4, 12, 32, device=dev).to(torch.bfloat16)
    kd, vd = torch.zeros(4, 4, 32, device=dev, dtype=torch.bfloat16), torch.zeros(4, 4, 32, device=dev, dtype=torch.bfloat16)
    attn = CachedAttention(cache, steps, 4, 0.2)
    calls = flex_paged_for(cache).calls
    got = attn(0, qd, kd, vd)
    assert attn._paged and flex_paged_for(cache).calls == calls + 1  # flex ran (a cuda vs cuda:0 check once
    # sent every step to the gather while this still passed)
    monkeypatch.setenv("MEMFIT_PAGED_FLEX", "0")
    gathered = CachedAttention(cache, steps, 4, 0.2)
    want = gathered(0, qd, kd, vd)
    assert not gathered._paged
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    cache.close()


@pytest.mark.parametrize("window", [None, 21])
def test_a_failed_compile_gathers_instead_and_says_so(monkeypatch, caplog, window):
    """If flex attention cannot compile (or would recompile past dynamo's limit), the step still comes out right,
    from the gather path, and the kernel records why so later steps gather from the start."""
    from memfit.llm.kernels import paged_flex

    def broken():
        def fn(*args, **kwargs):
            raise RuntimeError("no Triton here")
        return fn

    monkeypatch.setattr(paged_flex, "_compiled_flex", broken)
    g = torch.Generator().manual_seed(10)
    lens = torch.tensor([1, 9, 16, 75, 64], dtype=torch.int64)
    cache_k, cache_v, kp, vp, table, q = _case(g, lens)
    flex = FlexPagedAttention(torch.device("cpu"))
    out = flex.paged_attention(q, kp, vp, table, lens, 0.2, window)
    ref = reference_attention(q, cache_k, cache_v, torch.arange(len(lens)), lens, 0.2, window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert flex.failed and "no Triton here" in flex.failed
    assert "gathers its blocks instead" in caplog.text


def test_the_engine_does_not_import_flex_attention_until_it_is_used():
    """Importing flex attention pulls in sympy (~35 MiB resident): a CPU engine must not pay for a GPU path."""
    import subprocess
    import sys

    code = ("import sys, memfit.llm.kernels.attention, memfit.llm.kernels.paged_flex as p; assert p.flex_available(); "
            "print(sorted(m for m in ('sympy', 'torch.nn.attention.flex_attention', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
