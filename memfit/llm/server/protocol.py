"""Request bodies of the OpenAI API (the fields memfit honours), as pydantic models.

Validation is strict on purpose: OpenAI answers 400 to `"temperature": "0.5"` or `"stream": "yes"`, and so
do we (pydantic's strict mode still lets an integer stand for a float). Unknown fields are accepted and
ignored, as OpenAI does, so clients that send newer fields keep working. Ranges follow OpenAI's
documentation; checks that need the model (context length, vocabulary) happen later, in `serving.py`.

Responses are built as plain dicts in `serving.py` (their shape is fixed and hot in streaming).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from memfit.llm.engine.params import MAX_LOGPROBS, MAX_STOP_STRINGS

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # OpenAI's limit on choices per request

_CONFIG = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

Stop = Union[str, Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)], None]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool | None = False


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _CONFIG

    model: str | None = Field(None, description="the served model's id (see GET /v1/models); optional")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extensions many clients send through `extra_body`.
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, TokenIds, Annotated[list[str], Field(min_length=1)], Annotated[list[TokenIds], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """image_url, input_audio, file, ...: accepted by the schema, refused with a clear message."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[Union[TextPart, OtherPart]], None] = None
    name: str | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    # memfit extension: keep this conversation's KV cached between turns (same as the X-Session-Id header).
    session_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
