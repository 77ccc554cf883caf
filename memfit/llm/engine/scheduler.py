"""Who runs next: continuous batching with chunked prefill, a scheduling policy, and preemption.

The scheduler only does bookkeeping. It takes KV capacity by attempt (`try_allocate`/`try_grow`, which
either take it or change nothing) and gives it back (`free`); it never touches a tensor, and hands the
runner a plain list of (sequence, number of new tokens).

Each step (the order and the victims are the policy's, policy.py: fcfs, priority, vtc):
1. running sequences first, in the policy's order (fcfs: oldest first): each gets its next token (decode)
   or its next prompt chunk; if the KV manager cannot grow one, the policy's victim (fcfs: the newest
   running sequence) is preempted, until the first one fits;
2. then waiting sequences, in the policy's order, while the step's token budget, the sequence limit and KV
   memory allow; a long prompt is split into chunks across steps (chunked prefill). A preemptive policy
   (priority) preempts a less urgent running sequence to make room for a more urgent waiting one.
Preemption (`preemption_mode`): `recompute` frees the victim's KV and recomputes it later; `swap` has the
swap space (kv/swap.py, behind the `SwapSpace` calls in preemption.py) copy the victim's KV to the host tier first and
copy it back when it is admitted again, so nothing is recomputed; `auto` asks the swap space's cost model
which is cheaper for this victim. A full host tier falls back to recomputation.
KV kept from finished conversation turns (`retained`) is the first thing given up under pressure; with a swap
space that reuses copies (`reuse`, cross-turn reuse) it goes to the host tier (`swapped_sessions`), moving only
the tokens its kept copy lacks, and the session's next turn swaps it back in instead of prefilling it. A swap-in
that cannot be served (`swap_in` returns None: an SSD read failed its checksum) recomputes the sequence.
Asynchronous swap-out (a swap space with threads, FastSwitch's swap manager): when something else can run this
step, a victim's KV is copied out on the swap pool while the model step runs, and its device KV is freed only at
the next `schedule()`, once the copy has landed (`_finish_swap_outs`); meanwhile it is still counted in the KV
budget. The sequence that needed the memory sits out this one step (it is not preempted, and nobody else is
preempted for it) and gets it at the next. When nothing else would run, the overlap would not pay (there is no
step to hide the copy behind, and waiting a step only delays everyone), so the swap-outs land at once and the
step is scheduled again with synchronous swaps.
A commit the OS or driver refuses (the budget allowed it, the memory was not there) is local: the sequence
that asked waits, or is preempted itself; no other sequence is preempted for it.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memfit.llm.engine.policy import PolicyConfig, make_policy
from memfit.llm.engine.preemption import Preemption
from memfit.llm.engine.request import Sequence, SeqStatus
from memfit.llm.engine.step import ScheduledSeq, SchedulerOutput

if TYPE_CHECKING:  # the scheduler holds the KV manager but never imports its tensor code
    from memfit.llm.kv.base import KVCacheManager
    from memfit.llm.kv.swap import SwapSpace

PREEMPTION_MODES = ("recompute", "swap", "auto")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one batch
    max_num_batched_tokens: int = 512  # tokens (prefill + decode) in one step
    max_waiting: int | None = None  # queue limit (the server answers 429 past it); None = unbounded
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # fcfs | priority | vtc (policy.py)
    preemption_mode: str = "recompute"  # recompute | swap | auto (swap needs a swap space)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"unknown preemption mode {self.preemption_mode!r}; choose one of "
                             f"{', '.join(PREEMPTION_MODES)}")


class Scheduler(Preemption):
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, swap: SwapSpace | None = None) -> None:
        if config.preemption_mode != "recompute" and swap is None:
            raise ValueError(f"preemption_mode {config.preemption_mode!r} needs a swap space")
        self.config = config
        self.kv = kv
        self.swap = swap if config.preemption_mode != "recompute" else None
        self.policy = make_policy(config.policy)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.retained: OrderedDict[str, Sequence] = OrderedDict()  # session id -> finished seq holding KV
        self.swapped_sessions: dict[str, Sequence] = {}  # session id -> finished seq whose KV is on the swap tiers
        self.reuse = self.swap is not None and getattr(self.swap, "reuse", False)
        self._swapping_out: list[Sequence] = []  # victims whose KV is being copied out (landed at the next step)
        self._sync_only = False  # a second pass over an empty step: no more asynchronous swap-outs
        self.num_preemptions = 0  # total, for metrics
        self.preemptions_by_mode = {"recompute": 0, "swap": 0}
        # times the policy's next waiting sequence was refused memory (a step may ask up to three times), by whether
        # its KV waits on the swap tiers (it needs room for its whole history) or is to be computed (its first chunk)
        self.admission_waits = {"swapped": 0, "fresh": 0, "gave_up": 0}
        # A swapped sequence refused memory for its whole history waits at most as long as recomputing that
        # history is modelled to take, then drops its host copy and asks for its first chunk only (the
        # ski-rental rule: never more than twice the better of waiting and recomputing). Where prefill is cheap
        # (a GPU) it soon recomputes; where it is dear (a CPU) it waits for its KV. It applies to a conversation's
        # next turn whose previous turn's KV is on the host (cross-turn reuse, which only saves a prefill), and
        # in the `auto` mode to preempted sequences too; `swap` promises preempted ones no recomputation.
        # False: always wait.
        self.recompute_after_wait = True

    # ---- queue management ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.policy.on_add(seq, self.waiting)
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
                self._free_kv(old.seq_id)
            self._drop_swapped_session(seq.session_id, keep=seq.seq_id)
            self.retained[seq.session_id] = seq
        else:
            self._release(seq)

    def take_retained(self, session_id: str) -> Sequence | None:
        """Hand over a session's retained sequence (the engine adopts its KV for the next turn)."""
        return self.retained.pop(session_id, None)

    def take_swapped_session(self, session_id: str) -> Sequence | None:
        """Hand over a session's finished sequence whose KV waits on the swap tiers (None if it was evicted)."""
        seq = self.swapped_sessions.pop(session_id, None)
        return seq if seq is not None and self.swap is not None and self.swap.holds(seq.seq_id) else None

    def drop_retained(self, session_id: str) -> None:
        seq = self.retained.pop(session_id, None)
        if seq is not None:
            self._free_kv(seq.seq_id)
        self._drop_swapped_session(session_id)

    def _drop_swapped_session(self, session_id: str, keep: int | None = None) -> None:
        seq = self.swapped_sessions.pop(session_id, None)
        if seq is not None and seq.seq_id != keep and self.swap is not None:
            self.swap.discard(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def set_priority(self, seq: Sequence, priority: int) -> None:
        """Takes effect at the next `schedule()`: the policy reads priorities afresh every step."""
        seq.priority = priority

    def _ensure_capacity(self, seq: Sequence, num_tokens: int, out: SchedulerOutput, may_preempt: bool) -> bool:
        """Make `seq` hold capacity for `num_tokens`, freeing retained KV (and, if allowed, preempting
        newer running sequences) until it fits."""
        holds = self.kv.has_seq(seq.seq_id)
        while True:
            if holds:
                if self.kv.try_grow(seq.seq_id, num_tokens, self._final_tokens(seq)):
                    return True
            elif self._try_allocate(seq, num_tokens):
                return True
            if getattr(self.kv, "last_refused", False):
                # The OS or driver refused memory the budget allowed: this sequence waits (or is preempted)
                # and no other is touched for it.
                return False
            if self._evict_retained():
                continue
            if self._swapping_out:
                return False  # memory is on its way back (swap-outs land at the next step): nobody else goes for it
            if may_preempt and self._preempt_newest(out, keep=seq):
                continue
            if may_preempt and self._evict_waiting_holder(seq):  # before a running sequence preempts itself
                continue
            return False

    @staticmethod
    def _final_tokens(seq: Sequence) -> int:
        """The most tokens whose K/V `seq` will hold: the last sampled token is never fed back (the sequence stops
        on it), so a KV cache that commits ahead of the writes stops at prompt + max_tokens - 1."""
        return min(len(seq.prompt_token_ids) + seq.params.max_tokens - 1, seq.max_model_len)

    def _try_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """New KV for `seq`. With prefix caching a sequence with nothing computed starts from the longest
        cached prefix of its tokens: num_computed jumps past it and only the rest is prefilled."""
        final = self._final_tokens(seq)
        if seq.num_computed == 0 and getattr(self.kv, "prefix_caching", False):
            cached = self.kv.try_allocate_prefix(seq.seq_id, seq.all_token_ids, num_tokens, final)
            if cached is None:
                return False
            seq.num_computed = seq.num_cached_prompt = cached
            return True
        return self.kv.try_allocate(seq.seq_id, num_tokens, final)  # positional: parallel/mirror.py logs args only

    # ---- the step ----------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.policy.step += 1
        self._finish_swap_outs()  # they had the last model step to overlap with
        self._finish_swap_ins()
        self._schedule_running(out)
        self._admit_waiting(out)
        if not out.scheduled and self._swapping_out:
            # Nothing else runs this step, so an asynchronous swap-out has nothing to overlap with: land them now
            # (freeing their KV) and schedule again, swapping synchronously.
            self._finish_swap_outs()
            self._sync_only = True
            try:
                self._schedule_running(out)
                self._admit_waiting(out)
            finally:
                self._sync_only = False
        if not out.scheduled and any(s.swapping_in for s in self.waiting):
            # Nothing can run while swap-ins in flight hold memory: let them land, and admit them now.
            self._finish_swap_ins(wait=True)
            self._admit_waiting(out, skip_preempted=True)
        self.policy.on_sampled(item.seq for item in out.scheduled if item.samples)
        return out

    def _schedule_running(self, out: SchedulerOutput) -> None:
        # 1. Running sequences, in the policy's order. Preempting a later one may drop it from this step too,
        #    so the token budget is recomputed from what is still scheduled.
        for seq in self.policy.order(self.running):
            if seq not in self.running:
                continue  # preempted earlier in this loop
            budget = self.config.max_num_batched_tokens - out.num_tokens
            if budget <= 0:
                break
            num_new = min(seq.num_pending, budget)
            if not self._ensure_capacity(seq, seq.num_computed + num_new, out, may_preempt=True):
                if self._swapping_out:
                    continue  # its memory lands with the swap-outs in flight: it sits out this step, still running
                # Nothing left to preempt and it still does not fit: it waits for memory itself.
                self._preempt(seq, out)
                continue
            out.scheduled.append(ScheduledSeq(seq, num_new))
        # 2. Waiting sequences, in the policy's order (fcfs: preempted sequences sit at the front): _admit_waiting.

    def _admit_waiting(self, out: SchedulerOutput, skip_preempted: bool = False) -> None:
        budget = self.config.max_num_batched_tokens - out.num_tokens
        while self.waiting and budget > 0:
            ready = [s for s in self.waiting if not (s.swapping_in or s.swapping_out)
                     and not (skip_preempted and s in out.preempted)]
            if not ready:
                break
            seq = self.policy.next_waiting(ready)
            if seq in out.preempted:
                break  # do not re-admit in the same step what was just preempted for memory
            if len(self.running) >= self.config.max_num_seqs and not self._preempt_for(seq, out):
                break
            budget = self.config.max_num_batched_tokens - out.num_tokens
            num_new = min(seq.num_pending, budget)
            if not self._admit_capacity(seq, num_new, out):
                self.admission_waits["swapped" if seq.swapped else "fresh"] += 1
                # (not while swap-outs are in flight: their memory lands within this step's schedule)
                if seq.swapped and not self._swapping_out and self._waited_past_recompute(seq):
                    self.swap.discard(seq.seq_id)  # type: ignore[union-attr]
                    self._recompute_lost(seq)
                    self.admission_waits["gave_up"] += 1
                    continue  # asks again, for its first chunk only
                break  # nobody overtakes the policy's next sequence
            seq.waited_since = None
            num_new = min(seq.num_pending, budget)  # a cached prefix (prefix caching) leaves fewer to compute
            if seq.swapping_in:
                continue  # its KV is on its way back, overlapping this step; admitted once it has landed
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.policy.on_admit(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget = self.config.max_num_batched_tokens - out.num_tokens

    def _admit_capacity(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """KV for a waiting sequence: preempting only sequences the policy ranks below it; a swapped
        sequence gets its KV back from the host tier (no recomputation)."""
        while not self._ensure_capacity(seq, seq.num_computed + num_new, out, may_preempt=False):
            if getattr(self.kv, "last_refused", False) or self._swapping_out:
                return False  # (swap-outs in flight: the memory comes at the next step)
            if not (self._preempt_for(seq, out) or (not self.running and self._evict_waiting_holder(seq))):
                return False
        if seq.swapped:
            if self.swap.threads and out.scheduled:  # type: ignore[union-attr]
                self.swap.start_swap_in(seq.seq_id)  # type: ignore[union-attr]
                seq.swapping_in = True
                return True
            restored = self.swap.swap_in(seq.seq_id)  # type: ignore[union-attr]  # nothing to overlap with: synchronous
            seq.swapped = False
            if restored is None:
                self._recompute_lost(seq)
        return True
