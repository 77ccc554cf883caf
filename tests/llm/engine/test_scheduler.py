"""Scheduler policy tests against a bookkeeping-only KV manager (the scheduler never touches tensors)."""
from __future__ import annotations

import pytest

from memfit.llm.engine.request import Sequence, SeqStatus
from memfit.llm.engine.params import SamplingParams
from memfit.llm.engine.scheduler import Scheduler, SchedulerConfig


class CountingKV:
    """Capacity in tokens, one token = one unit; takes capacity by attempt, as the KV managers do."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.held: dict[int, int] = {}

    def _used(self) -> int:
        return sum(self.held.values())

    def try_allocate(self, seq_id: int, n: int, final_tokens: int | None = None) -> bool:
        assert seq_id not in self.held
        if self._used() + n > self.capacity_tokens:
            return False
        self.held[seq_id] = n
        return True

    def try_grow(self, seq_id: int, n: int, final_tokens: int | None = None) -> bool:
        if self._used() - self.held[seq_id] + max(n, self.held[seq_id]) > self.capacity_tokens:
            return False
        self.held[seq_id] = max(n, self.held[seq_id])
        return True

    def free(self, seq_id: int) -> None:
        del self.held[seq_id]

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self.held


def seq(name: str, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def run_step(sched: Scheduler) -> list[tuple[str, int]]:
    """Schedule, then pretend the runner computed and sampled (as the runner/engine would)."""
    out = sched.schedule()
    # Every scheduled sequence holds KV for the tokens it will have after the step, counted from the
    # sequences themselves (not from the fake's ledger, which refuses any overrun by construction).
    for item in out.scheduled:
        assert sched.kv.held.get(item.seq.seq_id, -1) >= item.seq.num_computed + item.num_new
    assert sum(item.seq.num_computed + item.num_new for item in out.scheduled) <= sched.kv.capacity_tokens
    result = []
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed += item.num_new
        if samples:
            item.seq.output_token_ids.append(7)
        result.append((item.seq.request_id, item.num_new))
    return result


def wait_holding_session_kv(sched: Scheduler, s: Sequence, tokens: int) -> None:
    """Queue s as engine/sessions.adopt_session_kv leaves a session's next turn: `tokens` of KV held, the rest to
    prefill."""
    assert sched.kv.try_allocate(s.seq_id, tokens)
    s.num_computed = s.num_cached_prompt = tokens
    sched.add(s)


def run_until_done(sched: Scheduler, max_steps: int) -> None:
    """Step until nothing is left (at most max_steps), finishing sequences at max_tokens; never an empty step."""
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        assert run_step(sched)  # never an empty step with work left
        for s in [s for s in sched.running if len(s.output_token_ids) >= s.params.max_tokens]:
            sched.finish(s, "length")


def test_fcfs_with_chunked_prefill_and_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), CountingKV(1000))
    a, b = seq("a", 15), seq("b", 4)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == [("a", 10)]  # a's first chunk fills the step
    assert run_step(sched) == [("a", 5), ("b", 4)]  # a finishes prefill, b fits behind it
    assert run_step(sched) == [("a", 1), ("b", 1)]  # both decode
    assert a.status is SeqStatus.RUNNING and len(a.output_token_ids) == 2


def test_max_num_seqs_limits_the_batch():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), CountingKV(1000))
    for name in "abc":
        sched.add(seq(name, 3))
    assert [n for n, _ in run_step(sched)] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_preemption_by_recomputation_frees_newest_and_requeues_it_first():
    kv = CountingKV(capacity_tokens=12)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), kv)
    a, b = seq("a", 6), seq("b", 6)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == [("a", 6), ("b", 6)]  # memory now full
    out = sched.schedule()  # a needs a 7th token slot: b (newest) is preempted
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [(s.seq.request_id, s.num_new) for s in out.scheduled] == [("a", 1)]
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert sched.waiting[0] is b and not kv.has_seq(b.seq_id)
    # b's generated token must be recomputed with its prompt: 6 prompt + 1 output pending.
    assert b.num_pending == 7


def test_head_of_queue_is_not_overtaken_when_memory_is_short():
    kv = CountingKV(capacity_tokens=10)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), kv)
    sched.add(seq("a", 8))
    run_step(sched)
    sched.add(seq("big", 5))
    sched.add(seq("small", 1))
    names = [n for n, _ in run_step(sched)]
    assert names == ["a"]  # neither big (does not fit) nor small (would overtake big) is admitted


def test_retained_session_kv_is_given_up_before_preempting():
    kv = CountingKV(capacity_tokens=10)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), kv)
    a = seq("a", 6)
    a.session_id = "chat"
    sched.add(a)
    run_step(sched)
    sched.finish(a, "stop")
    assert kv.has_seq(a.seq_id) and "chat" in sched.retained
    sched.add(seq("b", 8))
    assert run_step(sched) == [("b", 8)]
    assert not kv.has_seq(a.seq_id) and not sched.retained


def test_abort_releases_kv():
    kv = CountingKV(capacity_tokens=100)
    sched = Scheduler(SchedulerConfig(), kv)
    a = seq("a", 5)
    sched.add(a)
    run_step(sched)
    sched.abort(a)
    assert kv.held == {} and a.finish_reason == "abort" and not sched.has_unfinished()


def test_invalid_config_is_refused():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0)


def test_token_slice_equals_slicing_all_tokens():
    s = seq("a", 5)
    s.output_token_ids = [10, 11, 12]
    for start in range(9):
        for end in range(start, 9):
            assert s.token_slice(start, end) == s.all_token_ids[start:end]


def test_waiting_turns_holding_their_sessions_kv_cannot_fill_the_memory_with_nothing_running():
    """Two sessions' next turns wait, each holding its previous turn's KV (adopted from the session), and together
    they leave neither room to grow. With nothing running, one gives its KV up (recomputed later): both finish."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), CountingKV(60))
    a, b = seq("a", 40), seq("b", 40)
    for s in (a, b):
        wait_holding_session_kv(sched, s, 25)
    run_until_done(sched, 40)
    assert a.is_finished and b.is_finished and sched.kv.held == {}


def test_a_running_sequence_takes_a_waiting_turns_kv_before_preempting_itself():
    """r runs and must grow; w waits holding its session's KV and leaves r no room. r takes w's KV (w is recomputed
    later) instead of preempting itself, which left an empty step with nothing running."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), CountingKV(60))
    r, w = seq("r", 30, max_tokens=20), seq("w", 30)
    sched.add(r)
    run_step(sched)  # r's prefill
    wait_holding_session_kv(sched, w, 25)
    run_until_done(sched, 60)
    assert r.is_finished and w.is_finished and r.num_preemptions == 0 and sched.kv.held == {}
