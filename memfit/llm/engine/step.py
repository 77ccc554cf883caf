"""The data one engine step passes along: what the scheduler decided, and what the runner sampled.

    scheduler --SchedulerOutput (ScheduledSeq per sequence)--> runner --StepResult--> engine

Plain data, no torch: the scheduler and the runner both import it, and neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from memfit.llm.engine.params import TokenLogprobs
from memfit.llm.engine.request import Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens fed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """Does this step finish the sequence's pending tokens, so a token is sampled after it?"""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class StepResult:
    """Sampled tokens for the scheduled sequences that sample this step (in `sampled_seqs` order)."""

    sampled_seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
