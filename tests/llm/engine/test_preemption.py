"""Preemption modes and priorities end to end on a tiny random Llama: swapping is lossless and recomputes nothing,
on both caches; an urgent request preempts and finishes first; bad priorities and options are refused clearly."""
from __future__ import annotations

import os

import pytest

from memfit.llm.engine.api import LLM
from memfit.llm.engine.errors import RequestError
from memfit.llm.engine.params import SamplingParams
from memfit.memory.budget import MemoryBudgetExceeded
from memfit.llm.kv.swap import MERGE_AT
from memfit.llm.kv.swap_model import OWNER
from tests.llm.engine.test_engine import assert_same_greedy, tiny  # noqa: F401 - the fixture
from tests.memory.test_host_region import resident_bytes


def host_tier_empty(swap) -> None:
    """The host tier holds no chunk; what its budget still holds is its region's warm free pages, as many as the
    kernel holds for the region (mincore), and its tables (no more than sys.getsizeof finds in them), and only the
    tables once the pages are trimmed."""
    from tests.memory.test_host_region import table_sizes

    warm = resident_bytes(swap.region) if swap.region is not None else 0
    meta = swap.region.meta_bytes if swap.region is not None else 0
    assert swap.region is None or table_sizes(swap.region) <= meta
    assert swap.budget.by_owner().get(OWNER, 0) == 0 and swap.budget.used_bytes == meta + warm
    swap.trim()
    assert swap.budget.used_bytes == meta and (swap.region is None or resident_bytes(swap.region) == 0)


PARAMS = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
PROMPTS = [list(range(10 + 3 * i, 30 + 4 * i)) for i in range(8)]
# The virtual cache without eager pages grows page by page, so a tight budget preempts it as often as the paged one.
# ("paged", "groups"): the paged cache with block groups (kv_block_groups), whose swaps copy runs of blocks.
CACHES = [("virtual", "auto"), ("virtual", "token-major"), ("paged", "auto"), ("paged", "groups")]


def count_fed_tokens(engine) -> list[int]:
    """Tokens the runner computes, counted where they enter it (recomputation shows up here)."""
    fed = [0]
    execute = engine.runner.execute

    def counting(scheduled):
        fed[0] += sum(item.num_new for item in scheduled)
        return execute(scheduled)

    engine.runner.execute = counting
    return fed


@pytest.fixture(scope="module")
def expected(tiny):  # noqa: F811
    _, _, path = tiny
    roomy = LLM(str(path), dtype="float32", kv_budget="64MiB")
    return [o.outputs[0].token_ids for o in roomy.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]


@pytest.mark.parametrize("kind,layout", CACHES)
@pytest.mark.parametrize("mode", ["recompute", "swap", "swap-sync", "swap-noreuse", "auto"])
def test_outputs_under_heavy_preemption_equal_outputs_without_pressure(tiny, expected, kind, layout, mode):  # noqa: F811
    model, _, path = tiny
    probe = LLM(str(path), kv_cache=kind, dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    threads = 0 if mode == "swap-sync" else 2  # swap: swap-ins overlapped with steps on 2 threads
    reuse = mode != "swap-noreuse"  # kept host copies: a second swap-out moves only the new tokens
    mode = mode.removesuffix("-sync").removesuffix("-noreuse")
    groups = layout == "groups"
    llm = LLM(str(path), kv_cache=kind, kv_layout="auto" if groups else layout, kv_block_groups=groups,
              dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
              preemption_mode=mode, swap_space=None if mode == "recompute" else "16MiB", swap_threads=threads,
              swap_reuse=reuse)
    fed = count_fed_tokens(llm.engine)
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
    for ids, g, e in zip(PROMPTS, got, expected):
        assert_same_greedy(model, ids, g, e)
    by_mode = llm.engine.scheduler.preemptions_by_mode
    assert sum(by_mode.values()) >= 5  # heavy preemption
    once = sum(len(p) + PARAMS.max_tokens - 1 for p in PROMPTS)  # every token fed exactly once
    if mode == "recompute":
        assert by_mode["swap"] == 0 and fed[0] > once
    elif mode == "swap":  # resumes without recomputing a token
        assert by_mode["recompute"] == 0 and fed[0] == once
        st = llm.engine.stats()["swap"]
        assert st["out_ops"] > 0 and st["resident_bytes"] == 0
        # Without reuse every byte goes out and back once; with it, what a kept copy held is not moved out again.
        assert st["in_bytes"] == st["out_bytes"] if not reuse else st["in_bytes"] >= st["out_bytes"]
        assert (st["async_swap_ins"] > 0) == (threads > 0)  # overlapped swap-ins happened (only) when asked
        assert (st["async_swap_outs"] > 0) == (threads > 0)  # and swap-outs
        assert llm.engine.swap.region.cached_bytes > 0  # --swap-space given: freed pages kept warm for the next swap
        host_tier_empty(llm.engine.swap)
        if kind == "paged":  # per-block copies, or fewer with block groups (counted at the copy in kv/test_swap_layout)
            blocks = (st["out_bytes"] + st["in_bytes"]) // (llm.engine.kv.block_bytes // (2 * llm.engine.layout.num_layers))
            assert (st["out_ops"] + st["in_ops"] < blocks) if groups else (st["out_ops"] + st["in_ops"] == blocks)
    else:  # auto picks per victim from measured rates, and per swapped victim refused memory whether to wait for
        # its KV or recompute (the ski-rental rule): either way, recomputation only where it chose it
        gave_up = llm.engine.scheduler.admission_waits["gave_up"]
        assert (fed[0] > once) == (by_mode["recompute"] > 0 or gave_up > 0)
    assert llm.engine.kv.stats().num_seqs == 0


def test_a_full_host_tier_falls_back_to_recompute(tiny, expected):  # noqa: F811
    model, _, path = tiny
    probe = LLM(str(path), dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    llm = LLM(str(path), dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
              preemption_mode="swap", swap_space=f"{probe.engine.layout.bytes_per_token * 30}B")
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
    for ids, g, e in zip(PROMPTS, got, expected):
        assert_same_greedy(model, ids, g, e)
    by_mode = llm.engine.scheduler.preemptions_by_mode
    assert by_mode["recompute"] > 0  # room for one short sequence at most: the rest were recomputed
    assert llm.engine.swap.budget.peak_bytes <= llm.engine.swap.budget.limit_bytes


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_an_urgent_request_preempts_and_finishes_first(tiny, mode):  # noqa: F811
    _, _, path = tiny
    llm = LLM(str(path), dtype="float32", kv_budget="64MiB", max_num_seqs=2, scheduling_policy="priority",
              preemption_mode=mode, swap_space=None if mode == "recompute" else "16MiB")
    engine = llm.engine
    long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for i in range(2):
        engine.add_request(prompt_token_ids=PROMPTS[i], params=long, request_id=f"low{i}", priority=5)
    for _ in range(3):
        engine.step()
    engine.add_request(prompt_token_ids=PROMPTS[2], params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                       request_id="urgent", priority=-3)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order[0] == "urgent"
    assert engine.scheduler.preemptions_by_mode[mode] >= 1


def test_set_priority_reorders_waiting_requests_and_refuses_unknown_ids(tiny):  # noqa: F811
    _, _, path = tiny
    llm = LLM(str(path), dtype="float32", kv_budget="64MiB", max_num_seqs=1, scheduling_policy="priority")
    engine = llm.engine
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    for name in ("a", "b", "c"):
        engine.add_request(prompt_token_ids=PROMPTS[0], params=p, request_id=name)
    engine.set_priority("c", -1)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["c", "a", "b"]
    with pytest.raises(KeyError, match="a"):
        engine.set_priority("a", 0)  # finished
    with pytest.raises(RequestError, match="integer"):
        engine.add_request(prompt_token_ids=PROMPTS[0], params=p, priority="high")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="integer"):
        llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=p, priority=1.5)  # type: ignore[arg-type]
    assert not engine.has_unfinished_requests()  # nothing half-queued


def test_bad_engine_options_are_refused_at_start(tiny):  # noqa: F811
    _, _, path = tiny
    with pytest.raises(ValueError, match="fcfs, priority, vtc"):
        LLM(str(path), scheduling_policy="lottery")
    with pytest.raises(ValueError, match="recompute, swap, auto"):
        LLM(str(path), preemption_mode="drop")
    with pytest.raises(ValueError, match="swap"):
        LLM(str(path), preemption_mode="swap", swap_space="lots")
    with pytest.raises(MemoryBudgetExceeded, match="swap-space"):
        LLM(str(path), dtype="float32", memory_budget="2GiB", preemption_mode="swap", swap_space=4)
    for bad in (0, -1, True, 1.5):  # 0 answered every request QueueFull (the CLI refused it; Python did not)
        with pytest.raises(ValueError, match="max_waiting"):
            LLM(str(path), max_waiting=bad)


def test_the_memory_timeline_shows_the_host_tier(tiny, tmp_path):  # noqa: F811
    import json

    _, _, path = tiny
    probe = LLM(str(path), dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    timeline = tmp_path / "timeline.jsonl"
    llm = LLM(str(path), dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
              preemption_mode="swap", swap_space="16MiB", timeline=str(timeline))
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
    rows = [json.loads(line) for line in timeline.read_text().splitlines()]
    held = [r["swap_host_resident_bytes"] for r in rows]
    bpt = llm.engine.layout.bytes_per_token
    # Some step held a swapped sequence's KV on the host (at least its prompt), none at the end.
    assert max(held) >= bpt * min(len(p) for p in PROMPTS) and held[-1] == 0
    assert all(r["swap_host_limit_bytes"] == 16 << 20 for r in rows)
    # the region's warm pages are in the timeline too: after the last step, all the kernel holds for it (no chunk left)
    region = llm.engine.swap.region
    assert rows[-1]["swap_host_region_bytes"] == region.meta_bytes + resident_bytes(region) > region.meta_bytes
    assert llm.engine.stats()["swap"]["region_bytes"] == rows[-1]["swap_host_region_bytes"]


def test_aborting_a_request_while_its_kv_swaps_back_in_leaks_nothing(tiny, expected):  # noqa: F811
    model, _, path = tiny
    probe = LLM(str(path), dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    llm = LLM(str(path), dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
              preemption_mode="swap", swap_space="16MiB", swap_threads=2)
    engine = llm.engine
    for i, ids in enumerate(PROMPTS):
        engine.add_request(prompt_token_ids=ids, params=PARAMS, request_id=f"r{i}")
    aborted, done = None, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        in_flight = [s for s in engine.scheduler.waiting if s.swapping_in]
        if aborted is None and in_flight:
            aborted = in_flight[0].request_id
            engine.abort(aborted)
    assert aborted is not None and aborted not in done
    for i, ids in enumerate(PROMPTS):
        if f"r{i}" != aborted:
            assert_same_greedy(model, ids, done[f"r{i}"], expected[i])
    host_tier_empty(engine.swap)
    assert engine.swap.stats.resident_bytes == 0
    assert engine.kv.stats().num_seqs == 0


class FakeSwap:
    """The scheduler's view of a swap space, with swap-ins that land only when the test says so."""

    threads = 2

    def __init__(self) -> None:
        self.held: set[int] = set()
        self.in_flight: set[int] = set()
        self.landed: set[int] = set()

    def prefers_swap(self, n: int) -> bool:
        return True

    def try_swap_out(self, seq_id: int, n: int, wait: bool = True) -> bool:
        self.held.add(seq_id)
        return True

    def swapping_out(self, seq_id: int) -> bool:
        return False  # swap-outs land at once here

    def swap_in(self, seq_id: int) -> int:
        self.held.discard(seq_id)
        return 0

    def start_swap_in(self, seq_id: int) -> None:
        self.held.discard(seq_id)
        self.in_flight.add(seq_id)

    def swap_in_ready(self, seq_id: int) -> bool:
        return seq_id in self.landed

    def finish_swap_in(self, seq_id: int) -> int:
        self.in_flight.discard(seq_id)
        return 0

    def discard(self, seq_id: int) -> None:
        self.held.discard(seq_id)
        self.in_flight.discard(seq_id)


def test_a_step_never_comes_up_empty_while_swap_ins_in_flight_hold_the_memory():
    """Sequence b's swap-in is in flight and holds half the KV; a, running, cannot grow and preempts itself. The
    scheduler must then let b land and run it, not return an empty step (the engine would call that a request that
    can never fit)."""
    from memfit.llm.engine.request import Sequence
    from memfit.llm.engine.scheduler import Scheduler, SchedulerConfig
    from tests.llm.engine.test_scheduler import CountingKV

    swap = FakeSwap()
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, preemption_mode="swap"),
                      CountingKV(24), swap)  # type: ignore[arg-type]
    a = Sequence("a", list(range(1, 11)), SamplingParams(max_tokens=50))
    b = Sequence("b", list(range(1, 11)), SamplingParams(max_tokens=50))
    sched.add(a)
    sched.add(b)
    for _ in range(2):  # both prefill and decode once: 11 tokens each
        for item in sched.schedule().scheduled:
            item.seq.num_computed += item.num_new
            if item.samples:
                item.seq.output_token_ids.append(7)
    # b is preempted by swapping and comes back asynchronously while a runs.
    sched._preempt(b, sched.schedule())
    assert b.swapped and sched.kv.held.get(b.seq_id) is None
    a.num_computed += 1
    a.output_token_ids.append(7)
    out = sched.schedule()  # b is admitted: memory taken, copies in flight, a runs
    assert b.swapping_in and [item.seq for item in out.scheduled] == [a]
    a.num_computed += 1
    a.output_token_ids.append(7)
    a.output_token_ids += [7] * 10  # a now needs more than b leaves free: it can only preempt itself
    out = sched.schedule()
    assert [item.seq for item in out.scheduled] == [b]  # b landed (waited for) and runs; the step is not empty
    assert not b.swapping_in and a in sched.waiting


def run_turn(engine, ids, session, params=PARAMS):
    rid = engine.add_request(prompt_token_ids=ids, params=params, session_id=session)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out
    raise AssertionError("the turn did not finish")


@pytest.mark.parametrize("kind", ["virtual", "paged"])
def test_a_conversations_next_turn_swaps_its_evicted_kv_back_in_instead_of_prefilling(tiny, kind):  # noqa: F811
    """Turn 1 of a session finishes; other requests press its retained KV out to the host tier; turn 2 (turn 1's
    tokens plus a new message) swaps it back in: only the new message is prefilled, and the greedy output equals a
    roomy engine's. A third turn after another eviction moves only the tokens turn 2 added."""
    model, _, path = tiny
    probe = LLM(str(path), kv_cache=kind, dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    roomy = LLM(str(path), kv_cache=kind, dtype="float32", kv_budget="64MiB").engine
    llm = LLM(str(path), kv_cache=kind, dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0,
              kv_prefault=False, preemption_mode="swap", swap_space="16MiB", swap_threads=0)
    engine = llm.engine
    engine.swap.merge_at = MERGE_AT  # merges within 3 turns on both caches (the virtual one's default waits for 8)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ids = list(range(5, 25))
    for turn in range(3):
        got = run_turn(engine, ids, "conv", params)
        want = run_turn(roomy, ids, "conv", params)
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        if turn:
            # Swapped in, not prefilled: all but the new message and the last answer token (never fed, so no KV).
            assert got.num_cached_tokens == len(ids) - 4 - 1
        assert "conv" in engine.scheduler.retained
        generated = llm.generate(prompt_token_ids=PROMPTS[:4], sampling_params=PARAMS)  # presses "conv" out
        assert len(generated) == 4 and "conv" in engine.scheduler.swapped_sessions
        seq = engine.scheduler.swapped_sessions["conv"]
        if turn:  # the kept copy held the earlier turns: the eviction copied only from where this turn started;
            # once the copy held merge_at chunks, it merged them and those tokens into one (kv/swap_pairs.py)
            last = engine.swap._copies[seq.seq_id].chunks[-1]
            n = got.num_cached_tokens
            lo = 0 if turn >= engine.swap.merging_at() else n - n % engine.swap.granule
            assert (last.lo, last.hi) == (lo, seq.num_computed)
        assert engine.swap.valid_tokens(seq.seq_id) == seq.num_computed
        ids = ids + got.outputs[0].token_ids + [40 + turn, 41, 42, 43]
    assert engine.swap.stats.in_bytes > 0 and engine.swap.budget.by_owner()[OWNER] == engine.swap.held_bytes()
    engine.end_session("conv")
    for s in list(engine.scheduler.swapped_sessions):
        engine.end_session(s)
    host_tier_empty(engine.swap)
    assert engine.kv.stats().num_seqs == 0


def test_sessions_whose_kept_copies_the_tier_dropped_are_forgotten(tiny):  # noqa: F811
    """Many one-turn sessions that never come back: their finished KV goes to a small host tier, which drops the
    oldest kept copies under pressure. The scheduler forgets those sessions (it kept one entry, tokens and all,
    per session: 196 after 200 sessions of which 8 were still held)."""
    _, _, path = tiny
    probe = LLM(str(path), dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    llm = LLM(str(path), dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
              preemption_mode="swap", swap_space=f"{4 * one_seq}B", swap_threads=0)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i in range(40):
        run_turn(engine, list(range(5 + i % 7, 45 + i % 7)), f"s{i}", params)
    sched = engine.scheduler
    assert engine.swap.stats.kept_evictions > 0  # the tier did drop kept copies
    assert sched.swapped_sessions  # and holds some
    assert all(engine.swap.holds(q.seq_id) for q in sched.swapped_sessions.values())
    assert len(sched.swapped_sessions) + len(sched.retained) < 40


@pytest.mark.parametrize("fault", ["none", "write-error", "flipped-byte", "full"])
def test_the_ssd_tier_serves_swaps_and_every_io_failure_falls_back_to_recompute(tiny, expected, tmp_path, fault,  # noqa: F811
                                                                               monkeypatch):
    """A host tier for ~30 tokens pushes swapped KV down to the SSD tier. Injected faults: every write fails; every
    write lands with one byte flipped (each read then fails its checksum); the SSD tier holds one 4 KiB extent.
    Every request still finishes with the unpressured greedy output, and no tier holds anything at the end."""
    from memfit.memory.extent_store import ExtentStore, segment_offsets

    model, _, path = tiny
    probe = LLM(str(path), dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    real_write = ExtentStore.write_segments  # every write of the store (one extent, or several laid out together)
    if fault == "write-error":
        def write(self, offset, segments, digests=None, staged=None):
            raise OSError(5, "Input/output error (injected)")
        monkeypatch.setattr(ExtentStore, "write_segments", write)
    elif fault == "flipped-byte":
        def write(self, offset, segments, digests=None, staged=None):  # lands intact and checksummed, then rots
            real_write(self, offset, segments, digests, staged)
            sizes = [sum(len(b) for b in seg) for seg in segments]
            fd = os.open(self.path, os.O_RDWR)  # buffered: the kernel writes it back before an O_DIRECT read
            try:
                for at, n in zip(segment_offsets(offset, sizes), sizes):  # one byte in every extent written
                    if n:
                        os.pwrite(fd, bytes([os.pread(fd, 1, at + n // 2)[0] ^ 0x01]), at + n // 2)
                os.fsync(fd)
            finally:
                os.close(fd)
        monkeypatch.setattr(ExtentStore, "write_segments", write)
    llm = LLM(str(path), dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
              preemption_mode="swap", swap_space=f"{probe.engine.layout.bytes_per_token * 30}B",
              swap_ssd_path=str(tmp_path), swap_ssd_space="4KiB" if fault == "full" else "16MiB")
    engine = llm.engine
    fed = count_fed_tokens(engine)
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
    for ids, g, e in zip(PROMPTS, got, expected):
        assert_same_greedy(model, ids, g, e)
    ssd = {t["tier"]: t for t in engine.stats()["swap"]["tiers"]}["ssd"]
    assert ssd["direct_io"] == (ssd["direct_io_fallback"] is None)  # O_DIRECT in use, or the reason why not
    by_mode = engine.scheduler.preemptions_by_mode
    if fault == "none":
        assert ssd["out_bytes"] > 0 and ssd["in_bytes"] > 0 and ssd["io_errors"] == 0
    elif fault == "write-error":  # recomputed: at once (a synchronous write), or when an asynchronous one failed
        once = sum(len(p) + PARAMS.max_tokens - 1 for p in PROMPTS)
        assert ssd["io_errors"] > 0 and ssd["out_bytes"] == 0 and fed[0] > once
    elif fault == "flipped-byte":  # written, never served: every read failed its checksum and was recomputed
        assert ssd["out_bytes"] > 0 and ssd["io_errors"] > 0 and ssd["in_bytes"] == 0
    else:
        assert by_mode["recompute"] > 0 and engine.swap.ssd.budget.peak_bytes <= 4096
    host_tier_empty(engine.swap)
    assert engine.swap.ssd.budget.used_bytes == 0
    assert engine.kv.stats().num_seqs == 0
    llm.engine.close()


@pytest.mark.parametrize("kind", ["virtual", "paged"])
def test_an_asynchronous_swap_out_keeps_the_victims_kv_until_its_slow_copy_lands(tiny, expected, kind,  # noqa: F811
                                                                                 monkeypatch):
    """Every swap-out copy is made slow (it sleeps before reading the KV), so the steps after a preemption run
    while it copies. Freeing the victim's KV before the copy lands would let those steps reuse and overwrite its
    memory (or the cache give it back to the OS): the copy would read another sequence's K/V or zeros, and the
    greedy outputs would differ. The copy also checks, as it ends, that its sequence still holds its KV."""
    import time

    import memfit.llm.kv.swap as swap_mod

    model, _, path = tiny
    probe = LLM(str(path), kv_cache=kind, dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    llm = LLM(str(path), kv_cache=kind, dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0,
              kv_prefault=False, preemption_mode="swap", swap_space="16MiB", swap_threads=2, swap_reuse=False)
    engine, copy_out, try_swap_out = llm.engine, swap_mod._copy_out, llm.engine.swap.try_swap_out
    owner: dict[int, int] = {}  # host buffer address -> the sequence its copy is for
    freed_early = []

    def recording_swap_out(seq_id, n, keep=False, wait=True):
        ok = try_swap_out(seq_id, n, keep=keep, wait=wait)
        if ok and engine.swap.swapping_out(seq_id):
            owner[engine.swap._copies[seq_id].chunks[-1].buf.data_ptr()] = seq_id
        return ok

    def slow_copy_out(runs, buf):
        time.sleep(0.05)
        seq_id = owner[buf.data_ptr()]
        seconds = copy_out(runs, buf)
        if not engine.kv.has_seq(seq_id):
            freed_early.append(seq_id)
        return seconds

    monkeypatch.setattr(engine.swap, "try_swap_out", recording_swap_out)
    monkeypatch.setattr(swap_mod, "_copy_out", slow_copy_out)
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
    st = engine.stats()["swap"]
    assert st["async_swap_outs"] > 0 and not freed_early
    for ids, g, e in zip(PROMPTS, got, expected):
        assert_same_greedy(model, ids, g, e)
    host_tier_empty(engine.swap)
    assert engine.kv.stats().num_seqs == 0


@pytest.mark.parametrize("recompute_cost", ["free", "dear", "never-give-up"])
def test_a_swapped_sequence_refused_memory_recomputes_once_it_has_waited_as_long_as_that_takes(tiny, expected,  # noqa: F811
                                                                                               recompute_cost):
    """The scheduler's ski-rental rule (`auto` mode): a swapped sequence refused memory for its whole history waits
    at most the modelled time to recompute it, then drops its host copy and comes back for its first chunk. Modelled
    free (a fast GPU's prefill), it gives up at its second refusal and recomputes; modelled dear (a slow CPU's), it
    waits for its KV; with the rule off it always waits. The outputs stay those of an unpressed run either way.
    (Preemption itself is left to swap here: `prefers_swap` is patched, so every victim is swapped.)"""
    model, _, path = tiny
    probe = LLM(str(path), dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    llm = LLM(str(path), dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
              preemption_mode="auto", swap_space="16MiB", swap_threads=0, swap_reuse=False)
    llm.engine.swap.prefers_swap = lambda num_tokens, seq_id=None: True
    cost = llm.engine.swap.cost
    cost.flops_per_s = 1e30 if recompute_cost == "free" else 1.0
    cost.observe_compute = lambda tokens, seconds: None  # keep the modelled rate whatever the steps measure
    llm.engine.scheduler.recompute_after_wait = recompute_cost != "never-give-up"
    fed = count_fed_tokens(llm.engine)
    got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)]
    for ids, g, e in zip(PROMPTS, got, expected):
        assert_same_greedy(model, ids, g, e)
    waits = llm.engine.scheduler.admission_waits
    assert waits["swapped"] > 0  # swapped sequences were refused memory
    once = sum(len(p) + PARAMS.max_tokens - 1 for p in PROMPTS)  # every token fed exactly once
    if recompute_cost == "free":
        assert waits["gave_up"] > 0 and fed[0] > once  # they recomputed what they had swapped out
    else:
        assert waits["gave_up"] == 0 and fed[0] == once
    host_tier_empty(llm.engine.swap)
    assert llm.engine.kv.stats().num_seqs == 0  # dropped copies freed
