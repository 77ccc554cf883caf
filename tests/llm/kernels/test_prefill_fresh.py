"""prefill_attention_fresh (kernels/prefill.py): several prompts' chunks with no cached prefix in one kernel call must
give, bit for bit, what one prefill_attention call a chunk gives, and CachedAttention must use it only for such
chunks (a chunk after a cached prefix reads the cache, chunk by chunk)."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.kernels import prefill
from memfit.llm.kernels.prefill import prefill_attention, prefill_attention_fresh
from tests.llm.kernels.common import need

# (rows of each chunk, Hq, Hkv, D, window): the benchmark's 32 x 128 shape cut short, ragged lengths, one row,
# GQA 1/3/4, every head size, a window
CASES = [([128, 128, 128], 12, 4, 64, None), ([5, 37, 1, 64], 4, 2, 32, None), ([17, 200], 8, 8, 96, None),
         ([33, 70, 9], 6, 2, 128, 20)]


def chunked(q, k, v, chunks, window, d):
    out = torch.full_like(q, float("nan"))
    for start, n in chunks.tolist():
        s = slice(start, start + n)
        assert prefill_attention(q[s], k[s], v[s], d ** -0.5, window, out[s], kernel="avx512")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens,hq,hkv,d,window", CASES)
def test_one_call_has_the_bits_of_one_call_a_chunk(dtype, lens, hq, hkv, d, window, monkeypatch):
    need(dtype)
    monkeypatch.setattr(prefill, "_forced", "avx512")  # the fresh path runs the AVX-512 kernel (AMX picks per chunk)
    g = torch.Generator().manual_seed(sum(lens))
    gap = 3  # rows between chunks that no chunk covers (a chunk after a cached prefix sits there in a step)
    starts = [sum(lens[:i]) + gap * i for i in range(len(lens))]
    n = starts[-1] + lens[-1] + 2  # + padding rows
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype)  # the q/k/v matmul's output, sliced as a layer does
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
    chunks = torch.tensor(list(zip(starts, lens)), dtype=torch.int64)
    want = chunked(q, k, v, chunks, window, d)
    got = torch.full_like(q, float("nan"))
    assert prefill_attention_fresh(q, k, v, chunks, d ** -0.5, window, got)
    covered = torch.zeros(n, dtype=torch.bool)
    for start, ln in zip(starts, lens):
        covered[start : start + ln] = True
    assert torch.equal(got[covered].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want[covered].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert got[~covered].isnan().all()  # rows outside the chunks untouched


def test_refuses_what_it_cannot_take(monkeypatch):
    need(torch.bfloat16)
    monkeypatch.setattr(prefill, "_forced", "avx512")
    q = torch.randn(10, 4, 64).to(torch.bfloat16)
    k = v = torch.randn(10, 2, 64).to(torch.bfloat16)
    out = torch.empty_like(q)
    ok = torch.tensor([[0, 4], [4, 6]])
    assert not prefill_attention_fresh(q, k, v, torch.tensor([[0, 4], [4, 7]]), 0.1, None, out)  # past the rows
    assert not prefill_attention_fresh(q, k, v, torch.tensor([[-1, 4]]), 0.1, None, out)
    assert not prefill_attention_fresh(q, k, v, ok.int(), 0.1, None, out)  # not int64
    assert not prefill_attention_fresh(q, k, v, ok, 0.1, None, out[:, :, :32])  # shapes differ
    assert not prefill_attention_fresh(q.float(), k, v, ok, 0.1, None, out)  # dtypes differ
    assert prefill_attention_fresh(q, k, v, ok, 0.1, None, out)


def test_not_where_amx_is_the_choice(monkeypatch):
    need(torch.bfloat16)
    monkeypatch.setattr(prefill, "kernel_for", lambda dtype: "amx")
    q = torch.randn(8, 4, 64).to(torch.bfloat16)
    k = v = torch.randn(8, 2, 64).to(torch.bfloat16)
    assert not prefill_attention_fresh(q, k, v, torch.tensor([[0, 4], [4, 4]]), 0.1, None, torch.empty_like(q))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_steps_match_the_chunk_by_chunk_loop(dtype, monkeypatch):
    """memfit-tiny, greedy, one step of six prompts: two share a 40-token prefix (prefix caching: the second is a chunk
    after a cached prefix once the first is cached, which the loop attends), the rest fresh (one call). The tokens
    and their log-probabilities are those of the loop over every chunk, and the one call ran."""
    need(getattr(torch, dtype))
    from memfit.llm.engine.api import LLM
    from memfit.llm.engine.params import SamplingParams
    from memfit.llm.kernels import attention

    g = torch.Generator().manual_seed(7)
    shared = torch.randint(5, 200, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(5, 200, (9,), generator=g).tolist()]
    prompts += [torch.randint(5, 200, (n,), generator=g).tolist() for n in (23, 64, 1, 130)]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=1)
    calls = []
    real = attention.prefill_attention_fresh
    spy = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # noqa: E731
    results = {}
    for fresh in (True, False):
        monkeypatch.setattr(attention, "prefill_attention_fresh", spy if fresh else (lambda *a, **kw: False))
        llm = LLM(model="memfit-tiny", dtype=dtype)
        try:
            first = llm.generate(sampling_params=params, prompt_token_ids=[prompts[0]])  # caches the shared prefix
            rest = llm.generate(sampling_params=params, prompt_token_ids=[shared + [7, 8, 9]] + prompts[1:])
        finally:
            llm.engine.close()
        results[fresh] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in first + rest]
    assert calls  # the one-call path ran in the prefill steps
    assert results[True] == results[False]
