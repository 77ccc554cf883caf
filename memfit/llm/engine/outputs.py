"""What the engine returns: the shapes people know from vLLM (`out.outputs[0].text`), plus shortcuts."""
from __future__ import annotations

from dataclasses import dataclass

from memfit.llm.engine.params import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text generated so far (stop strings removed)
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one entry per generated token when requested
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    delta_text: str = ""  # text that became final since the previous output (for streaming)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused from an earlier turn

    # Shortcuts for the single-completion case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
