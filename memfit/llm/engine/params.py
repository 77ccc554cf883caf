"""What a request asks for, as plain data: `SamplingParams` (the OpenAI / vLLM names and meanings), the
`TokenLogprobs` the engine hands back, and the limits the server validates against.

No torch here: the scheduler, the request state and the server's protocol import this module, and none of
them touches a tensor (the sampler that turns logits into tokens is `memfit.llm.engine.sampling`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# Below this a temperature only amplifies rounding error (logits / 1e-9 overflows float32 softmax), and
# the result is argmax anyway, so such rows take the greedy path.
_GREEDY_TEMPERATURE = 1e-5


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of its allowed range; the message names the field and the range."""


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to pick tokens for one request (the OpenAI / vLLM names and meanings)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # keep the k most likely tokens; -1 or 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1.0 = off
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob; 0 = off
    seed: int | None = None  # a request with a seed samples from its own generator
    stop: list[str] | str | None = None  # normalised to a list in __post_init__
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the chosen token's)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> InvalidSamplingParams:
            return InvalidSamplingParams(f"{name} {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", "must be a number in (0, 1] (1 = off)")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (0, -1)):
            raise bad("top_k", "must be an integer >= 1, or -1 / 0 to turn it off")
        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", "must be a number in [0, 1] (0 = off)")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise bad("stop", "must be a string, a list of strings, or None")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidSamplingParams(
                f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
            )
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must contain only non-empty strings")

        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "must be a list of integers >= 0")

    @property
    def greedy(self) -> bool:
        """True when the result is the argmax whatever the draw (temperature 0, or top_k == 1)."""
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1


@dataclass
class TokenLogprobs:
    """The model's log-probability of the chosen token, and of the `logprobs` most likely tokens."""

    token_id: int
    logprob: float
    top: dict[int, float]  # most likely first; includes the chosen token if it is among them
