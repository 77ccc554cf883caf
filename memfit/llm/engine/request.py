"""Request and sequence state: plain data the scheduler reasons about (no tensors, no torch import)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

from memfit.llm.engine.admission import check_user
from memfit.llm.engine.params import SamplingParams, TokenLogprobs


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generation stream. `num_computed` counts the leading tokens whose K/V are in the cache; the
    scheduler feeds the rest (a prompt chunk, or the last sampled token) in the next step."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 2048
    session_id: str | None = None  # keep this sequence's KV after it finishes, for the next turn
    priority: int = 0  # lower = more urgent (vLLM's convention); used by the `priority` policy, may change
    user: str | None = None  # whose request this is: the `vtc` policy shares service fairly between users
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens whose KV came from an earlier turn (not recomputed)
    num_preemptions: int = 0
    swapped: bool = False  # preempted by swapping: its first num_computed tokens' KV wait in the host tier
    swapping_in: bool = False  # that KV is being copied back (asynchronously): not schedulable until it lands
    waited_since: float | None = None  # swapped and refused memory since then (time.monotonic): preemption.py
    swapping_out: bool = False  # that KV is being copied out (asynchronously): its device KV is freed once it lands
    arrival_index: int = -1  # set by the scheduling policy on first arrival (ties, age)
    arrival_step: int = -1  # the scheduler step it arrived at (the priority policy's aging)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    text: str = ""  # detokenized output, stop strings removed
    stop_text_pos: int = 0  # how much of `text` has been checked for stop strings

    def __post_init__(self) -> None:
        # Every way in (LLMEngine.add_request, LLM.generate, the server) builds a Sequence before it queues or
        # allocates anything: an unbounded `user` would otherwise live on as a vtc counter key.
        check_user(self.user)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (the runner calls this every step)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache (the whole prompt at first, then 1 per decode step)."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def check_token_stop(self) -> str | None:
        """Finish reason from the last token alone (eos, stop ids, length), or None."""
        last = self.output_token_ids[-1]
        if last in self.params.stop_token_ids:
            return "stop"
        if not self.params.ignore_eos and last in self.eos_token_ids:
            return "stop"
        if len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= self.max_model_len:
            return "length"
        return None
