"""Through the engine: a batch that arrives after an idle gap takes the finished requests' stale KV slots with their
pages (vAttention's deferred reclamation: kv/virtual.py, LLMEngine._slots_wanted) instead of the idle reclaim giving
them back and the admission committing new ones; and the step arena keeps its pages while the engine is busy
(engine/step_arena.py). Counted by the kernel (tests/llm/kv/kernel_pages.py), not by the caches' own counters."""
from __future__ import annotations

import time

import pytest

from memfit.llm.engine import EngineConfig, LLMEngine, SamplingParams
from tests.llm.engine.test_memory_budget import _run as run_greedy
from tests.llm.kv.kernel_pages import arena_resident_bytes, kernel_page_changes, resident_pages
from tests.llm.tiny_models import make_tiny_model_dir

IDLE_S = 10.0
# 4 requests of 60 prompt tokens, then 4 of 45 (other tokens of the 320: no prefix hit). The tiny model's 32-token pages: the
# first batch holds 3 pages a segment after 5 decode steps, the second needs 2, so the stale rows past its own are
# in the pages it takes (and must never be read).
FIRST = {f"a{i}": [(11 * i + j) % 150 + 3 for j in range(60)] for i in range(4)}
SECOND = {f"b{i}": [(7 * i + 3 * j) % 150 + 160 for j in range(45)] for i in range(4)}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("reuse"))


def _engine(path, **kw) -> LLMEngine:
    opts = dict(model=str(path), dtype="float32", device="cpu", max_num_seqs=4, kv_eager_pages=0, kv_prefault=False,
                kv_reclaim_idle_s=IDLE_S)
    opts.update(kw)
    return LLMEngine(EngineConfig(**opts))


def _run(engine: LLMEngine, prompts: dict[str, list[int]], on_step=None) -> dict[str, list[int]]:
    return run_greedy(engine, prompts, max_tokens=6, on_step=on_step)


def _idle_gap(engine: LLMEngine, seconds: float = 100.0) -> None:
    """As if the engine had been idle for `seconds` with nobody calling maintain (the offline API between batches;
    a server runs maintain while idle and gives due slots back before a new request is queued): every idle
    clock moves back."""
    for slot in list(engine.kv._idle_since):
        engine.kv._idle_since[slot] -= seconds
    if engine._idle_heap._busy_at is not None:
        engine._idle_heap._busy_at -= seconds


def _within_budget(engine: LLMEngine) -> None:
    held = arena_resident_bytes(engine.kv)
    assert held == engine.kv.committed_bytes == engine.ledger.by_owner().get("kv_budget", 0)
    assert held <= engine.kv_budget.limit_bytes


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_batch_after_an_idle_gap_takes_the_stale_slots_pages(tiny_path, prefix_caching):
    """The second batch commits no KV page (the kernel sees none) where the same engine without the reuse commits
    its whole KV again; greedy outputs are the same; the ledger matches the kernel after every step; and once idle
    for kv_reclaim_idle_s with nobody waiting, every KV page and the step arena's go back."""
    runs = {}
    for reuse in (True, False):
        engine = _engine(tiny_path, enable_prefix_caching=prefix_caching)
        if not reuse:
            engine._slots_wanted = lambda: 0  # the idle reclaim gives back everything due, as before
        _run(engine, FIRST)
        _idle_gap(engine)
        changes = kernel_page_changes(engine.kv)
        runs[reuse] = (_run(engine, SECOND, on_step=_within_budget), changes, engine)
    (out, changes, engine), (plain_out, plain_changes, _) = runs[True], runs[False]
    assert out == plain_out and len(out) == len(SECOND)
    assert sum(plain_changes["committed"]) >= sum(engine.kv.bytes_needed(50) for _ in SECOND)  # can fail
    assert sum(changes["committed"]) == 0
    held = arena_resident_bytes(engine.kv)
    assert held > 0
    engine.maintain()  # idle, but not for kv_reclaim_idle_s yet: kept for reuse
    assert arena_resident_bytes(engine.kv) == held
    engine.maintain(time.monotonic() + IDLE_S + 1)
    assert arena_resident_bytes(engine.kv) == engine.ledger.by_owner().get("kv_budget", 0) == 0
    scratch = engine.runner.scratch
    if scratch is not None:
        assert int(resident_pages(scratch.arena.address, scratch.capacity).sum()) == scratch.committed_bytes == 0


def test_the_stale_slots_kept_are_only_for_the_requests_waiting(tiny_path):
    """One request arrives after the gap: one stale slot is kept for it and the other three go back at once."""
    engine = _engine(tiny_path, enable_prefix_caching=False)
    _run(engine, FIRST)
    one_slot = arena_resident_bytes(engine.kv) // len(FIRST)
    _idle_gap(engine)
    engine.add_request(prompt_token_ids=SECOND["b0"], params=SamplingParams(max_tokens=6, ignore_eos=True))
    changes = kernel_page_changes(engine.kv)
    engine.step()
    assert sum(changes["committed"]) == 0 and sum(changes["released"]) >= 3 * one_slot
    assert arena_resident_bytes(engine.kv) <= one_slot


def test_slots_wanted_counts_only_the_requests_that_will_take_a_new_slot(tiny_path):
    """The idle reclaim keeps as many due slots as `_slots_wanted`: waiting requests that will be placed in a new
    slot, up to the slots free. A sequence swapping in or out holds (or is leaving) its own; a retained session
    sequence holds one as a running one does."""
    engine = _engine(tiny_path)
    try:
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        for rid, prompt in list(FIRST.items())[:3]:
            engine.add_request(prompt_token_ids=prompt, params=params, request_id=rid)
        assert engine._slots_wanted() == 3
        first = engine.scheduler.waiting[0]
        first.swapping_in = True
        assert engine._slots_wanted() == 2
        first.swapping_in = False
        engine.scheduler.retained["s"] = object()  # a finished session sequence still holding its slot
        engine.scheduler.retained["t"] = object()
        assert engine._slots_wanted() == 2  # 4 slots, 2 held by retained sequences
        engine.scheduler.retained.clear()
    finally:
        engine.close()
