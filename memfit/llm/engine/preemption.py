"""The scheduler's memory pressure (scheduler.py's `Scheduler` inherits it): freeing retained KV, preempting a
victim by recomputation or by swapping its KV to the host tier (synchronously, or asynchronously behind the next
model step), landing asynchronous swap-outs and swap-ins, and the ski-rental rule that has a swapped sequence
refused memory give its host copy up once it has waited as long as recomputing it would take.

Bookkeeping only, as in the rest of the scheduler: KV capacity is taken and given back through the KV manager,
copies through the swap space (kv/swap.py); no tensor is touched here. The state it reads and writes is the
scheduler's (see `Scheduler.__init__`).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from memfit.llm.engine.request import Sequence, SeqStatus
from memfit.llm.engine.step import SchedulerOutput

if TYPE_CHECKING:
    from collections import OrderedDict, deque

    from memfit.llm.engine.policy import Policy
    from memfit.llm.kv.base import KVCacheManager
    from memfit.llm.kv.swap import SwapSpace


class _ModeConfig(Protocol):  # what is read of scheduler.SchedulerConfig (importing it would be a cycle)
    preemption_mode: str


class Preemption:
    """Mixed into `Scheduler`; the attributes below are the scheduler's."""

    kv: KVCacheManager
    swap: SwapSpace | None
    policy: Policy
    waiting: deque[Sequence]
    running: list[Sequence]
    retained: OrderedDict[str, Sequence]
    swapped_sessions: dict[str, Sequence]
    reuse: bool
    recompute_after_wait: bool
    _swapping_out: list[Sequence]
    _sync_only: bool
    num_preemptions: int
    preemptions_by_mode: dict[str, int]
    config: _ModeConfig

    def _free_kv(self, seq_id: int) -> None:
        """Free a sequence's KV on the device and any copy of it on the swap tiers."""
        if self.swap is not None:
            self.swap.discard(seq_id)
        if self.kv.has_seq(seq_id):
            self.kv.free(seq_id)

    def _release(self, seq: Sequence) -> None:
        self._free_kv(seq.seq_id)  # the swap copy first: an asynchronous swap's copies land before the KV is freed
        if seq.swapping_out:
            self._swapping_out.remove(seq)
        seq.swapped = seq.swapping_in = seq.swapping_out = False

    def _evict_retained(self) -> bool:
        if not self.retained:
            return False
        session, seq = self.retained.popitem(last=False)  # least recently used first
        if self.reuse and self._try_swap_out(seq, keep=True):  # to the host tier, for the session's next turn
            # the tiers drop kept copies under pressure without telling the scheduler: forget those sessions
            # here (else one entry, tokens and all, stayed per session that never came back)
            for gone in [k for k, q in self.swapped_sessions.items() if not self.swap.holds(q.seq_id)]:
                del self.swapped_sessions[gone]
            self.swapped_sessions[session] = seq
            self.kv.free(seq.seq_id)
        else:
            self._free_kv(seq.seq_id)
        return True

    def _preempt(self, victim: Sequence, out: SchedulerOutput, needy: Sequence | None = None) -> None:
        """Free the victim's KV (swapped to the host tier first if the mode and the tier allow), requeue it
        at the front, drop it from this step. Not swapped: its tokens are recomputed when it returns. Swapped
        asynchronously (when a sequence other than `needy`, the one the memory is for, is left to run): the KV
        is freed when the copy lands, at the next step."""
        self.running.remove(victim)
        out.scheduled = [s for s in out.scheduled if s.seq is not victim]
        overlap = bool(self.swap is not None and self.swap.threads and not self._sync_only
                       and any(s is not needy for s in self.running))
        if self._try_swap_out(victim, wait=not overlap):
            if self.swap.swapping_out(victim.seq_id):  # type: ignore[union-attr]
                victim.swapping_out = True
                self._swapping_out.append(victim)
            else:
                self.kv.free(victim.seq_id)
            victim.swapped = True
            mode = "swap"
        else:
            self._release(victim)
            victim.num_computed = 0
            victim.num_cached_prompt = 0
            mode = "recompute"
        victim.status = SeqStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.preemptions_by_mode[mode] += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)

    def _try_swap_out(self, victim: Sequence, keep: bool = False, wait: bool = True) -> bool:
        n = victim.num_computed
        if self.swap is None or n == 0 or not self.kv.has_seq(victim.seq_id):
            return False
        if self.config.preemption_mode == "auto" and not self.swap.prefers_swap(n, victim.seq_id):
            return False
        if keep:
            return self.swap.try_swap_out(victim.seq_id, n, keep=True)
        if not wait:
            return self.swap.try_swap_out(victim.seq_id, n, wait=False)
        return self.swap.try_swap_out(victim.seq_id, n)  # False: the host tier is full

    def _preempt_newest(self, out: SchedulerOutput, keep: Sequence) -> bool:
        victim = self.policy.victim(self.running, keep)
        if victim is None:
            return False
        self._preempt(victim, out, needy=keep)
        return True

    def _preempt_for(self, candidate: Sequence, out: SchedulerOutput) -> bool:
        """A preemptive policy makes room for `candidate` by preempting a less urgent running sequence."""
        victim = self.policy.victim(self.running)
        if victim is None or not self.policy.may_preempt_for(candidate, victim):
            return False
        self._preempt(victim, out)
        return True

    def _evict_waiting_holder(self, keep: Sequence) -> bool:
        """Nothing runs and `keep` does not fit: a waiting sequence that holds device KV (a session's next turn,
        adopted with its previous turn's KV) gives it up, swapped out if the mode allows or recomputed later.
        Otherwise waiting holders could fill the memory with nothing running to free it."""
        for other in reversed(self.waiting):
            if other is keep or other.swapped or other.swapping_in or not self.kv.has_seq(other.seq_id):
                continue
            if self._try_swap_out(other):
                self.kv.free(other.seq_id)
                other.swapped = True
            else:
                self._release(other)
                other.num_computed = other.num_cached_prompt = 0
            return True
        return False

    def _waited_past_recompute(self, seq: Sequence) -> bool:
        """The swapped `seq` was refused memory again: has it waited as long as recomputing its history would
        take (the swap space's cost model)? The wait is counted from its first refusal since it was last admitted."""
        cost = self.swap.cost if self.swap is not None else None
        if not self.recompute_after_wait or cost is None:
            return False
        if seq.num_preemptions and self.config.preemption_mode != "auto":
            return False  # preempted in `swap` mode: its KV comes back, however long that takes
        now = time.monotonic()
        if seq.waited_since is None:
            seq.waited_since = now
            return False
        return now - seq.waited_since >= cost.recompute_s(seq.num_computed)

    def _recompute_lost(self, seq: Sequence) -> None:
        """A swap-in could not be served intact: the sequence starts over from token 0, in the memory it was just
        given (it holds num_computed + num_new >= what the first chunk of the recomputation needs), so whatever
        the failed read left there is overwritten before it is read."""
        seq.swapped = seq.swapping_in = False
        seq.num_computed = seq.num_cached_prompt = 0

    def _finish_swap_outs(self) -> None:
        """Land the asynchronous swap-outs (waiting for any still copying) and free their sequences' device KV; a
        failed copy leaves nothing held, and the sequence is recomputed."""
        while self._swapping_out:
            seq = self._swapping_out.pop(0)
            landed = self.swap.finish_swap_out(seq.seq_id)  # type: ignore[union-attr]
            self.kv.free(seq.seq_id)
            seq.swapping_out = False
            if not landed:
                seq.swapped = False
                seq.num_computed = seq.num_cached_prompt = 0

    def _finish_swap_ins(self, wait: bool = False) -> None:
        """Complete the asynchronous swap-ins that have landed (all of them, waiting, when asked or when nothing
        runs: there is no step to overlap with and the sequences would otherwise sit out a step)."""
        for seq in self.waiting:
            if seq.swapping_in and (wait or not self.running or self.swap.swap_in_ready(seq.seq_id)):  # type: ignore[union-attr]
                restored = self.swap.finish_swap_in(seq.seq_id)  # type: ignore[union-attr]
                seq.swapped = seq.swapping_in = False
                if restored is None:
                    self._recompute_lost(seq)
