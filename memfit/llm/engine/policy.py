"""Scheduling policies: who is admitted first, who is preempted first (plain bookkeeping, no tensors).

The scheduler (scheduler.py) asks its policy three things each step:
- `order(running)`: the order running sequences are served in (the first get capacity first);
- `next_waiting(waiting)`: the waiting sequence to admit next (nobody overtakes it: if it does not fit,
  admission stops for this step);
- `victim(running)` / `may_preempt_for(candidate, victim)`: which running sequence gives its KV up first, and
  whether a waiting candidate may take a running sequence's place (only a preemptive policy says yes).

Policies (`--scheduling-policy`):
- `fcfs`: arrival order; the newest running sequence is preempted first; `priority` is accepted and ignored.
- `priority`: lower `priority` first (vLLM's convention; negative values are valid), ties by arrival. It is
  preemptive: a waiting request more urgent than a running one takes its place when memory or the batch's
  sequence limit is short. Starvation guard: *aging* - a request's effective priority drops by one every
  `aging_steps` scheduler steps since it arrived, so any request outranks newer arrivals of a fixed
  priority after at most `aging_steps x (its priority - theirs)` steps. `aging_steps = 0` turns it off.
- `vtc`: Virtual Token Counter fairness between the `user`s of requests (Sheng et al., "Fairness in Serving
  Large Language Models", OSDI'24). Each user has a counter of the service it received, weighted
  `input_weight` per prompt token (charged once, at admission, for the tokens it must prefill) and
  `output_weight` per generated token. The waiting request of the user with the smallest counter is
  admitted first. A user whose queue was empty has its counter *lifted* on arrival to the smallest counter
  of the backlogged users (or, if nobody waits, to the counter of the user that left the queue last), so
  idling banks no credit. Under memory pressure the most-served user's newest sequence is preempted. The
  paper's bound follows: while two users stay backlogged, their counters (their weighted service) differ by
  at most about 2 x max(input_weight x prompt + output_weight x max_tokens) x the batch size.
  Counters of users who have left are dropped (`_prune`) once they are at or below every floor a later arrival
  can be lifted to, so lifting on their return restores the same value: the table holds the users with requests
  in the engine (and those still ahead of the floor), not every user ever seen.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence as Seq
from dataclasses import dataclass

from memfit.llm.engine.request import Sequence

POLICIES = ("fcfs", "priority", "vtc")


@dataclass
class PolicyConfig:
    name: str = "fcfs"
    aging_steps: int = 100  # priority: steps per unit of aging (0 = no starvation guard)
    input_weight: float = 1.0  # vtc: service charged per prompt token prefilled
    output_weight: float = 2.0  # vtc: service charged per generated token (the paper's w_q = 2 w_p)

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        if self.aging_steps < 0:
            raise ValueError(f"priority aging steps must be >= 0, got {self.aging_steps}")
        if self.input_weight < 0 or self.output_weight < 0:
            raise ValueError("vtc token weights must be >= 0")


class Policy:
    """FCFS: arrival order, the newest running sequence is the victim, never preempts for a waiting one."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.step = 0  # scheduler steps so far (the scheduler advances it)
        self._arrivals = 0

    def on_add(self, seq: Sequence, waiting: Seq[Sequence]) -> None:
        if seq.arrival_index < 0:  # a preempted sequence keeps its place in time
            seq.arrival_index = self._arrivals
            seq.arrival_step = self.step
            self._arrivals += 1

    def order(self, running: list[Sequence]) -> list[Sequence]:
        return list(running)

    def next_waiting(self, waiting: Seq[Sequence]) -> Sequence:
        return waiting[0]

    def victim(self, running: list[Sequence], keep: Sequence | None = None) -> Sequence | None:
        for seq in reversed(running):
            if seq is not keep:
                return seq
        return None

    def may_preempt_for(self, candidate: Sequence, victim: Sequence) -> bool:
        return False

    def on_admit(self, seq: Sequence) -> None:
        """`seq` leaves the waiting queue for the running batch."""

    def on_sampled(self, seqs: Iterable[Sequence]) -> None:
        """Each of `seqs` is scheduled to generate one token this step."""


class PriorityPolicy(Policy):
    def key(self, seq: Sequence) -> tuple[int, int]:
        aged = (self.step - seq.arrival_step) // self.config.aging_steps if self.config.aging_steps else 0
        return seq.priority - aged, seq.arrival_index

    def order(self, running: list[Sequence]) -> list[Sequence]:
        return sorted(running, key=self.key)

    def next_waiting(self, waiting: Seq[Sequence]) -> Sequence:
        return min(waiting, key=self.key)

    def victim(self, running: list[Sequence], keep: Sequence | None = None) -> Sequence | None:
        # Only a sequence ranked below `keep` gives way to it; otherwise `keep` itself waits.
        others = [s for s in running if s is not keep and (keep is None or self.key(s) > self.key(keep))]
        return max(others, key=self.key) if others else None

    def may_preempt_for(self, candidate: Sequence, victim: Sequence) -> bool:
        return self.key(victim) > self.key(candidate)


class VTCPolicy(Policy):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self.counters: dict[str, float] = {}
        self._last_left: str | None = None  # the user whose last waiting request left the queue most recently
        self._charged: weakref.WeakSet[Sequence] = weakref.WeakSet()  # prompt already charged
        self._seen: weakref.WeakSet[Sequence] = weakref.WeakSet()  # added and maybe unfinished (for _prune)
        self._prune_at = self.PRUNE_MIN

    PRUNE_MIN = 64  # counters kept before the first sweep; each sweep runs when the table has doubled since the last

    @staticmethod
    def user(seq: Sequence) -> str:
        return seq.user or ""

    def counter(self, user: str) -> float:
        return self.counters.get(user, 0.0)

    def _floor(self, backlogged: set[str]) -> float:
        """What an arriving user's counter is lifted to: the least-served backlogged user's counter, or, if
        nobody waits, that of the user who left the queue last."""
        if backlogged:
            return min(self.counter(v) for v in backlogged)
        return self.counter(self._last_left) if self._last_left is not None else 0.0

    def on_add(self, seq: Sequence, waiting: Seq[Sequence]) -> None:
        super().on_add(seq, waiting)
        u = self.user(seq)
        backlogged = {self.user(s) for s in waiting}
        if len(self.counters) >= self._prune_at:
            self._prune(backlogged)  # before `seq` counts as live: its user's counter is not lifted yet
        self._seen.add(seq)
        if u in backlogged:
            return
        # lift to the least-served backlogged user: time away banks no credit
        self.counters[u] = max(self.counter(u), self._floor(backlogged))

    def _prune(self, backlogged: set[str]) -> None:
        """Drop the counters of users with no unfinished request that are at or below every floor to come: on their
        return such a user is lifted to that floor, exactly as if its counter had been kept. Every future floor is
        at least L = min(the backlogged and running users' counters, the last to leave's counter): counters only
        grow, a user that joins the backlog is lifted to the floor of its time, a preempted one re-enters it as it
        is, and the next to leave the queue comes from the backlog. (The floor of the moment is not such a bound: if
        every waiting request is aborted, it falls back to the last to leave's counter.) With nobody admitted yet,
        L is 0. The user who left last is kept, its
        counter being the floor when nobody waits. Run when the table has doubled since the last sweep, so its cost
        is amortised over the arrivals that grew it."""
        live = {self.user(s) for s in self._seen if not s.is_finished}
        if self._last_left is None:
            low = 0.0
        else:
            # the users with a sequence in the engine count too: a preempted one goes back to the queue without
            # being lifted (its counter unchanged), and then sets the floor; without them a pruned user came back
            # at 1.0 where it had left at 104
            low = min([self.counter(self._last_left), *(self.counter(v) for v in backlogged | live)])
        for u in [u for u, c in self.counters.items() if c <= low and u not in live and u != self._last_left]:
            del self.counters[u]
        self._prune_at = max(self.PRUNE_MIN, 2 * len(self.counters))

    def _key(self, seq: Sequence) -> tuple[float, int]:
        return self.counter(self.user(seq)), seq.arrival_index

    def next_waiting(self, waiting: Seq[Sequence]) -> Sequence:
        return min(waiting, key=self._key)

    def victim(self, running: list[Sequence], keep: Sequence | None = None) -> Sequence | None:
        others = [s for s in running if s is not keep and (keep is None or self._key(s) > self._key(keep))]
        return max(others, key=self._key) if others else None

    def on_admit(self, seq: Sequence) -> None:
        self._last_left = self.user(seq)
        if seq not in self._charged:  # a preempted sequence's recomputation is not charged again
            self._charged.add(seq)
            u = self.user(seq)
            new = len(seq.prompt_token_ids) - seq.num_cached_prompt
            self.counters[u] = self.counter(u) + self.config.input_weight * new

    def on_sampled(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            u = self.user(seq)
            self.counters[u] = self.counter(u) + self.config.output_weight


def make_policy(config: PolicyConfig) -> Policy:
    return {"fcfs": Policy, "priority": PriorityPolicy, "vtc": VTCPolicy}[config.name](config)
