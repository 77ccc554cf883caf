"""Automatic prefix caching through the engine, on the bundled memfit-tiny (2048 positions).

Requests that share a long prefix arrive after the first one's prefill: they must produce the same greedy
tokens as with prefix caching off, skip the cached tokens, and hold the prefix once. Memory is measured
outside the cache's counters: the memfd's allocated blocks for the virtual cache (each physical page once,
never RSS), the block tables against the pool and the budget for the paged one.
"""
from __future__ import annotations

import argparse

import pytest

from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams
from memfit.llm.engine.config import add_engine_args
from tests.llm.kv.kernel_pages import arena_resident_bytes, assert_paged_tables_consistent

KINDS = ["virtual", "paged"]


def engine_for(kind: str, prefix: bool, **kw) -> LLMEngine:
    opts = dict(model="memfit-tiny", device="cpu", kv_cache=kind, enable_prefix_caching=prefix, threads=1,
                kv_budget="64MiB", max_num_batched_tokens=512)
    opts.update(kw)
    return LLMEngine(EngineConfig(**opts))


def held(engine: LLMEngine) -> int:
    kv = engine.kv
    kv.sync()
    if engine.config.kv_cache == "virtual":
        got = arena_resident_bytes(kv)  # memfd st_blocks with prefix caching, /proc/self/pagemap without
        assert got == kv.committed_bytes
        return got
    live = [s.seq_id for s in engine.scheduler.running]
    return assert_paged_tables_consistent(kv, live)


def run_shared(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[dict, dict, int]:
    """The first request alone until it has its first token, then the rest at once; returns the outputs, the
    cached tokens per request, and the most KV held at any step after that."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.add_request(prompt_token_ids=prompts[0], params=params, request_id="r0")
    outs, cached, peak = {}, {}, 0
    while "r0" not in cached:
        for o in engine.step():
            cached[o.request_id] = o.num_cached_tokens
    for i, p in enumerate(prompts[1:], 1):
        engine.add_request(prompt_token_ids=p, params=params, request_id=f"r{i}")
    while engine.has_unfinished_requests():
        for o in engine.step():
            cached[o.request_id] = o.num_cached_tokens
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        peak = max(peak, held(engine))
    return outs, cached, peak


def prompts_with_prefix(prefix_len: int, n: int, suffix: int) -> list[list[int]]:
    prefix = [(37 * i + 11) % 4000 + 5 for i in range(prefix_len)]
    return [prefix + [(97 * i + 13 * k) % 4000 + 5 for i in range(suffix)] for k in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_outputs_are_the_same_with_and_without_sharing(kind):
    prompts = prompts_with_prefix(300, 4, 20) + [prompts_with_prefix(300, 1, 0)[0][:150] + [7, 8, 9]]
    plain, _, _ = run_shared(engine_for(kind, False, dtype="float32"), prompts, 12)
    engine = engine_for(kind, True, dtype="float32")
    shared, cached, _ = run_shared(engine, prompts, 12)
    assert shared == plain
    assert cached["r0"] == 0 and all(cached[f"r{i}"] >= 288 for i in (1, 2, 3)) and cached["r4"] >= 144
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] == sum(cached.values())
    assert stats["prefix_cached_bytes"] > 0  # the finished requests' blocks are kept for the next one
    # a request that comes later still finds the prefix among the finished ones, and answers the same
    again, cached_again, _ = run_shared(engine, prompts[1:2], 12)
    assert cached_again["r0"] >= 288 and again["r0"] == plain["r1"]


@pytest.mark.parametrize("kind", KINDS)
def test_many_requests_sharing_a_long_prefix_hold_it_once(kind):
    n, prefix, suffix, out = 8, 1536, 32, 32
    prompts = prompts_with_prefix(prefix, n, suffix)
    opts = dict(max_model_len=2048, max_num_seqs=n, max_num_batched_tokens=2048)
    engine = engine_for(kind, True, **opts)
    _, cached, peak = run_shared(engine, prompts, out)
    assert all(cached[f"r{i}"] >= prefix - 16 for i in range(1, n))
    kv = engine.kv
    one_prefix = kv.bytes_needed(prefix)
    # each request's own tokens, rounded to whole blocks, plus the eager pages the virtual cache commits ahead
    ahead = getattr(kv, "eager_pages", 0) * getattr(kv, "num_segments", 0) * getattr(kv, "page", 0)
    per_request = kv.bytes_needed(suffix + out + 2 * kv.prefix_block) + ahead
    assert one_prefix <= peak <= one_prefix + n * per_request, (peak, one_prefix, per_request)
    # without sharing each request holds the prefix itself (so the bound above can fail)
    _, _, plain_peak = run_shared(engine_for(kind, False, **opts), prompts, out)
    assert plain_peak >= n * one_prefix
    assert plain_peak >= 5 * peak


@pytest.mark.parametrize("kind", KINDS)
def test_cached_prefixes_give_way_under_budget_pressure(kind):
    probe = engine_for(kind, True, max_model_len=2048)
    one = probe.kv.bytes_needed(1200)
    probe.close()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = prompts_with_prefix(1100, 1, 0)[0]
    b = [(13 * i + 5) % 4000 + 5 for i in range(1100)]
    outs: dict[str, dict] = {}
    for prefix in (True, False):
        engine = engine_for(kind, prefix, max_model_len=2048, kv_budget=int(1.5 * one))
        got = outs[str(prefix)] = {}
        for rid, p in (("a", a), ("b", b)):
            engine.add_request(prompt_token_ids=p, params=params, request_id=rid)
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        got[rid] = o.outputs[0].token_ids
                assert held(engine) <= engine.kv_budget.limit_bytes
            if prefix and rid == "a":
                assert engine.kv.cached_bytes > 0.5 * one  # a's blocks are cached once it finished
        assert engine.scheduler.num_preemptions == 0
        if prefix:
            again = engine.add_request(prompt_token_ids=a, params=params, request_id="a2")
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        # b needed the room: a's cached blocks were evicted (paged: the LRU tail blocks first)
                        assert o.num_cached_tokens < len(a) - 200
                        got[again] = o.outputs[0].token_ids
    assert outs["True"]["a"] == outs["True"]["a2"] == outs["False"]["a"]
    assert outs["True"]["b"] == outs["False"]["b"]


def test_the_flag_turns_it_off_everywhere():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert EngineConfig.from_args(p.parse_args([])).enable_prefix_caching
    config = EngineConfig.from_args(p.parse_args(["--no-prefix-caching"]))
    assert not config.enable_prefix_caching
    engine = LLMEngine(config.with_overrides(device="cpu", kv_budget="16MiB"))
    assert not engine.kv.prefix_caching and engine.stats()["prefix_cache_hit_tokens"] == 0
