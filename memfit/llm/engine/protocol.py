"""What a server may ask of an engine: `EngineClient`, a typed protocol that `LLMEngine` implements.

The server (memfit/llm/server) talks to the engine through this and nothing else: no scheduler queues, no
KV manager, no private methods. A different engine (a remote one, or a tensor-parallel group) only has to
offer these calls. All of them are made from the one engine thread (server/async_engine.py), except that
`model_info` is immutable once built and may be read from any thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from memfit.llm.engine.outputs import RequestOutput
from memfit.llm.engine.params import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model that do not change while it is served."""

    model_path: str
    max_model_len: int  # longest sequence (prompt + output) the engine accepts
    vocab_size: int
    dtype: str  # "bfloat16", ...
    device: str
    kv_cache: str  # the KV manager's kind
    kv_budget_bytes: int
    # The engine's own tokenizer (memfit.llm.models.tokenizer.Tokenizer). Shared, not copied: its calls are
    # read-only (encode, decode, chat template) and the Rust tokenizer behind it is safe across threads.
    tokenizer: Any
    max_waiting: int | None = None  # the waiting queue's limit (EngineConfig.max_waiting); None: no limit


@runtime_checkable
class EngineClient(Protocol):
    @property
    def model_info(self) -> ModelInfo: ...

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise what `add_request` would raise for this prompt and these params (RequestError,
        MemoryBudgetExceeded), changing nothing."""

    def max_new_tokens(self, prompt_len: int) -> int:
        """The most tokens a request of `prompt_len` prompt tokens can generate: what the context leaves,
        shortened until one such sequence fits the KV budget."""

    def add_request(self, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                    session_id: str | None = None, priority: int = 0, user: str | None = None) -> str: ...

    def set_priority(self, request_id: str, priority: int) -> None:
        """Change an unfinished request's priority (effective at the next step); KeyError if unknown."""

    def step(self) -> list[RequestOutput]:
        """Run one step. A request that cannot be scheduled even alone raises MemoryBudgetExceeded with
        its `request_id` set (the server fails that request and keeps serving)."""

    def has_unfinished_requests(self) -> bool: ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free its memory; an unknown or finished id is ignored."""

    def maintain(self) -> None:
        """Housekeeping while idle (the server calls it about once a second with nothing to run): give back
        memory idle past its watermark, report background failures."""

    def stats(self) -> dict[str, Any]:
        """A snapshot for /metrics: queue lengths, KV bytes, steps, tokens (a fresh dict every call)."""

    def close(self) -> None: ...
