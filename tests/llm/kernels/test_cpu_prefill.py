"""memfit's CPU prefill attention (cpu_prefill.cpp via prefill.py): against float64, in the engine."""
from __future__ import annotations

import math

import pytest
import torch

from memfit.llm.kernels.attention import CachedAttention, causal_mask
from memfit.llm.kernels.prefill import amx_function, kernel_for, prefill_attention
from tests.llm.kernels.common import need


def reference(q, k, v, scale, window):
    """float64 causal attention of the last Tq positions over Tk, GQA by repeating K/V heads."""
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    qd, kd, vd = (t.double().transpose(0, 1) for t in (q, k, v))  # (H, T, D)
    kd, vd = kd.repeat_interleave(g, 0), vd.repeat_interleave(g, 0)
    s = (qd @ kd.transpose(1, 2)) * scale
    s = s.masked_fill(~causal_mask(tq, tk, q.device, window), -math.inf)
    return (torch.softmax(s, -1) @ vd).transpose(0, 1)  # (Tq, Hq, D)


CASES = [  # (Tq, Tk, Hq, Hkv, D, window): a whole prompt, chunks after a prefix, ragged blocks, windows
    (128, 128, 12, 4, 64, None), (1, 1, 2, 1, 32, None), (5, 37, 4, 2, 32, None), (50, 300, 6, 6, 128, None),
    (17, 17, 8, 1, 96, None), (33, 90, 4, 2, 64, 20), (70, 70, 14, 2, 64, 31), (9, 200, 3, 3, 128, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq,tk,hq,hkv,d,window", CASES)
def test_matches_float64(dtype, tq, tk, hq, hkv, d, window):
    need(dtype)
    g = torch.Generator().manual_seed(tq * 1000 + tk)
    q = torch.randn(tq, hq, d, generator=g).to(dtype)
    # K/V as a cache holds them: rows of a wider slot (token stride > Hkv * D), one head of several
    cache = torch.randn(2, tk + 7, hkv + 1, d, generator=g).to(dtype)
    k, v = cache[0, 3 : 3 + tk, 1:], cache[1, 3 : 3 + tk, 1:]
    ref = reference(q, k, v, d ** -0.5, window)
    for threads in (1, 2):
        out = torch.full_like(q, float("nan"))
        assert prefill_attention(q, k, v, d ** -0.5, window, out, nthreads=threads)
        err = (out.double() - ref).abs().max().item()
        # fp32: summation order only; bf16: the output's own rounding (2^-8 relative of values below ~4)
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


# The AMX path (bf16 on a core with AMX-BF16): the bundled models' heads (memfit-tiny 8 over 4 of 32, its draft 4
# over 2 of 32), the benchmark shapes (0.1b 12 over 4 of 64, 0.5b 14 over 2 of 64), 96 and 128; whole prompts and
# chunks after a cached prefix, lengths that are not multiples of 16 or 32; GQA 1, 2, 3, 4, 6, 7, 8, 64 (a 32-row
# block starting inside a token's group); windows.
AMX_CASES = [
    (128, 128, 8, 4, 32, None), (37, 37, 4, 2, 32, None), (45, 345, 12, 4, 64, None), (13, 77, 14, 2, 64, None),
    (200, 200, 12, 4, 64, None), (33, 90, 4, 2, 64, 20), (17, 17, 8, 1, 96, None), (50, 300, 6, 6, 128, None),
    (9, 200, 3, 3, 128, 5), (1, 1, 2, 1, 32, None), (1, 70, 12, 4, 64, None), (31, 100, 64, 1, 64, None),
    (20, 53, 16, 2, 128, None), (70, 70, 14, 2, 64, 31)]


def need_amx():
    need(torch.bfloat16)
    if amx_function() is None:
        pytest.skip("no AMX-BF16 here (or Linux refused the tile state): the AMX prefill path can't run")


@pytest.mark.parametrize("tq,tk,hq,hkv,d,window", AMX_CASES)
def test_amx_path_matches_float64(tq, tk, hq, hkv, d, window):
    """Bounded by what it rounds: the output to bf16 (at most 2^-8 relative), and P to bf16 before P x V (2^-8 of
    each weight at most, so 2^-8 of softmax x |V| a row), 1% on top for fp32 sums and the exp polynomial. The mean
    error must also stay within 2x the float64 result's own bf16 rounding (1.2-1.5x measured): a key too many or
    too few, a wrong head, scale or normaliser shifts rows systematically (one key of 128 moves a row by ~|v| / 128)."""
    need_amx()
    check_within_p_rounding(tq, tk, hq, hkv, d, window, "amx", seed=tq * 1000 + tk)


@pytest.mark.parametrize("tq,tk,hq,hkv,d,window", AMX_CASES)
def test_avx512_bf16_path_within_p_rounding(tq, tk, hq, hkv, d, window):
    """The AVX-512 path in bf16 rounds P to bf16 before P x V (vdpbf16ps over key pairs, V packed in pairs), as the
    AMX path does: the same bounds. Odd Tk (a last pair with one key), windows (a row's first key odd) and GQA
    groups that split a PV tile are in the cases; a pair off by one key, or the pair's halves swapped, moves a row's
    mean error far past twice the output's own rounding."""
    need(torch.bfloat16)
    check_within_p_rounding(tq, tk, hq, hkv, d, window, "avx512", seed=tq * 1000 + tk + 1)


def check_within_p_rounding(tq: int, tk: int, hq: int, hkv: int, d: int, window, kernel: str, seed: int) -> None:
    """bf16 attention on `kernel` against a float64 reference: every element within P's bf16 rounding's bound, and
    the mean error within twice the output's own rounding, at 1 and 2 threads."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, hq, d, generator=g).to(torch.bfloat16)
    cache = torch.randn(2, tk + 7, hkv + 1, d, generator=g).to(torch.bfloat16)  # rows of a wider slot
    k, v = cache[0, 3 : 3 + tk, 1:], cache[1, 3 : 3 + tk, 1:]
    ref = reference(q, k, v, d ** -0.5, window)
    bound = 2 ** -8 * 1.01 * (ref.abs() + reference(q, k, v.abs(), d ** -0.5, window)) + 1e-6
    rounding = (ref.to(torch.bfloat16).double() - ref).abs().mean().item()
    for threads in (1, 2):
        out = torch.full_like(q, float("nan"))
        assert prefill_attention(q, k, v, d ** -0.5, window, out, nthreads=threads, kernel=kernel)
        err = (out.double() - ref).abs()
        assert (err <= bound).all(), (err - bound).max().item()
        assert err.mean().item() <= 2 * rounding + 1e-9, (err.mean().item(), rounding)


def test_amx_path_is_the_bf16_default_and_declines_float32():
    need_amx()
    assert kernel_for(torch.bfloat16) == "amx" and kernel_for(torch.float32) == "avx512"
    q, k = torch.randn(4, 2, 64), torch.randn(4, 1, 64)
    assert not prefill_attention(q, k, k, 0.1, None, torch.zeros_like(q), kernel="amx")  # float32: no AMX path
    qb, kb = q.bfloat16(), k.bfloat16()
    outs = {kern: torch.zeros_like(qb) for kern in ("amx", "avx512", None)}
    for kern, out in outs.items():
        assert prefill_attention(qb, kb, kb, 0.1, None, out, kernel=kern)
    assert torch.equal(outs[None], outs["amx"])
    # fewer than AMX_MIN_ROWS (token, query head) rows a KV head: the default is the AVX-512 path
    g = torch.Generator().manual_seed(5)
    # 200 keys: over 50 the two paths' sums happen to round alike (P is bf16 on both), so "amx" ran is not shown
    q1, k1 = torch.randn(1, 4, 64, generator=g).bfloat16(), torch.randn(200, 2, 64, generator=g).bfloat16()
    outs = {kern: torch.zeros_like(q1) for kern in ("amx", "avx512", None)}
    for kern, out in outs.items():
        assert prefill_attention(q1, k1, k1, 0.1, None, out, kernel=kern)
    assert torch.equal(outs[None], outs["avx512"]) and not torch.equal(outs["amx"], outs["avx512"])


def test_declines_what_it_cannot_take():
    need(torch.float32)
    q, k = torch.randn(4, 2, 80), torch.randn(4, 1, 80)  # head size 80: not built
    out = torch.zeros_like(q)
    assert not prefill_attention(q, k, k, 0.1, None, out) and (out == 0).all()
    q, k = torch.randn(4, 2, 64), torch.randn(4, 1, 64)
    assert not prefill_attention(q.double(), k.double(), k.double(), 0.1, None, out.double())
    assert not prefill_attention(q, k[:3], k[:3], 0.1, None, torch.zeros_like(q))  # fewer keys than queries
    qg = q.clone().requires_grad_(True)
    assert not prefill_attention(qg, k, k, 0.1, None, torch.zeros_like(q))  # autograd: the caller's path


class _OneSeqCache:
    """A stand-in KV manager: one sequence whose context is `k`, `v` (what CachedAttention asks of a cache)."""

    fixed_stride = block_tables = False

    def __init__(self, k, v):
        self.k, self.v = k, v

    def plan_step(self, steps, pad_to=None):
        return None

    def write(self, layer, plan, k, v):
        pass

    def context(self, layer, plan, i):
        return self.k, self.v


@pytest.mark.parametrize("kernels", [True, False])
def test_cached_attention_uses_it_only_with_memfit_kernels(kernels, monkeypatch):
    need(torch.float32)
    from types import SimpleNamespace

    from memfit.llm.kernels import attention

    calls = []
    real = attention.cpu_prefill_attention
    monkeypatch.setattr(attention, "cpu_prefill_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = torch.randn(6, 4, 64), torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    step = SimpleNamespace(start=4, num_new=6, end=10)
    ops = SimpleNamespace(decode_attention=None) if kernels else object()  # CpuDecodeOps has decode_attention
    attn = CachedAttention(_OneSeqCache(k, v), [step], 0, 0.125, kernels=ops)
    out = attn(0, q, k[4:], v[4:])
    assert len(calls) == int(kernels)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.125, None), rtol=0, atol=1e-5)
