"""Who runs next: FCFS continuous batching with chunked prefill and preemption by recomputation.

The scheduler only does bookkeeping. It takes KV capacity by attempt (`try_allocate`/`try_grow`, which
either take it or change nothing) and gives it back (`free`); it never touches a tensor, and hands the
runner a plain list of (sequence, number of new tokens).

Each step:
1. running sequences first, oldest first: each gets its next token (decode) or its next prompt chunk;
   if the KV manager cannot grow one, the newest running sequence is preempted (its KV freed, it goes
   back to the front of the queue and is recomputed later), until the older one fits;
2. then waiting sequences, first come first served, while the step's token budget, the sequence limit
   and KV memory allow; a long prompt is split into chunks across steps (chunked prefill).
KV kept from finished conversation turns (`retained`) is the first thing given up under pressure.
A commit the OS or driver refuses (the budget allowed it, the memory was not there) is local: the sequence
that asked waits, or is preempted itself; no other sequence is preempted for it.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memfit.llm.engine.request import Sequence, SeqStatus
from memfit.llm.engine.step import ScheduledSeq, SchedulerOutput

if TYPE_CHECKING:  # the scheduler holds the KV manager but never imports its tensor code
    from memfit.llm.kv.base import KVCacheManager


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one batch
    max_num_batched_tokens: int = 512  # tokens (prefill + decode) in one step
    max_waiting: int | None = None  # queue limit (the server answers 429 past it); None = unbounded

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.retained: OrderedDict[str, Sequence] = OrderedDict()  # session id -> finished seq holding KV
        self.num_preemptions = 0  # total, for metrics

    # ---- queue management ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    def finish(self, seq: Sequence, reason: str) -> None:
        """Called by the engine when a running sequence is done. Its KV is freed, or retained for the
        sequence's session so the next turn only prefills its new tokens."""
        self.running.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq.session_id is not None and reason != "abort" and self.kv.has_seq(seq.seq_id):
            old = self.retained.pop(seq.session_id, None)
            if old is not None and old.seq_id != seq.seq_id:
                self.kv.free(old.seq_id)
            self.retained[seq.session_id] = seq
        else:
            self._release(seq)

    def take_retained(self, session_id: str) -> Sequence | None:
        """Hand over a session's retained sequence (the engine adopts its KV for the next turn)."""
        return self.retained.pop(session_id, None)

    def drop_retained(self, session_id: str) -> None:
        seq = self.retained.pop(session_id, None)
        if seq is not None:
            self.kv.free(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: Sequence) -> None:
        if self.kv.has_seq(seq.seq_id):
            self.kv.free(seq.seq_id)

    # ---- memory pressure --------------------------------------------------------------------------------
    def _evict_retained(self) -> bool:
        if not self.retained:
            return False
        _, seq = self.retained.popitem(last=False)  # least recently used first
        self.kv.free(seq.seq_id)
        return True

    def _preempt(self, victim: Sequence, out: SchedulerOutput) -> None:
        """Preemption by recomputation: free the KV, requeue at the front, drop from this step."""
        self.running.remove(victim)
        self._release(victim)
        victim.status = SeqStatus.WAITING
        victim.num_computed = 0
        victim.num_cached_prompt = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        out.scheduled = [s for s in out.scheduled if s.seq is not victim]

    def _preempt_newest(self, out: SchedulerOutput, keep: Sequence) -> bool:
        for victim in reversed(self.running):
            if victim is not keep:
                self._preempt(victim, out)
                return True
        return False

    def _ensure_capacity(self, seq: Sequence, num_tokens: int, out: SchedulerOutput, may_preempt: bool) -> bool:
        """Make `seq` hold capacity for `num_tokens`, freeing retained KV (and, if allowed, preempting
        newer running sequences) until it fits."""
        holds = self.kv.has_seq(seq.seq_id)
        while True:
            if holds:
                if self.kv.try_grow(seq.seq_id, num_tokens):
                    return True
            elif self.kv.try_allocate(seq.seq_id, num_tokens):
                return True
            if getattr(self.kv, "last_refused", False):
                # The OS or driver refused memory the budget allowed: this sequence waits (or is preempted)
                # and no other is touched for it.
                return False
            if self._evict_retained():
                continue
            if may_preempt and self._preempt_newest(out, keep=seq):
                continue
            return False

    # ---- the step ----------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running sequences, oldest first. Preempting a newer one may drop it from this step too,
        #    so the token budget is recomputed from what is still scheduled.
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted earlier in this loop
            budget = self.config.max_num_batched_tokens - out.num_tokens
            if budget <= 0:
                break
            num_new = min(seq.num_pending, budget)
            if not self._ensure_capacity(seq, seq.num_computed + num_new, out, may_preempt=True):
                # Nothing left to preempt and it still does not fit: it waits for memory itself.
                self._preempt(seq, out)
                continue
            out.scheduled.append(ScheduledSeq(seq, num_new))
        budget = self.config.max_num_batched_tokens - out.num_tokens

        # 2. Waiting sequences, first come first served. Preempted sequences sit at the front.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq in out.preempted:
                break  # do not re-admit in the same step what was just preempted for memory
            num_new = min(seq.num_pending, budget)
            if not self._ensure_capacity(seq, seq.num_computed + num_new, out, may_preempt=False):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out
