"""Request bodies of the OpenAI API (the fields memfit honours), as pydantic models.

Validation is strict on purpose: OpenAI answers 400 to `"temperature": "0.5"` or `"stream": "yes"`, and so
do we (pydantic's strict mode still lets an integer stand for a float). Unknown fields are accepted and
ignored, as OpenAI does, so clients that send newer fields keep working. Ranges follow OpenAI's
documentation; checks that need the model (context length, vocabulary) happen later, in `serving.py`.

The JSON schema (served at /openapi.json) must accept exactly what the server accepts. Features the server
refuses in `serving.py` with a message of its own (logit_bias, penalties, suffix, tools, ...) are declared
with only their neutral values (`_only`), and rules between fields (best_of = 1 needs n = 1, echo without logprobs,
top_logprobs needs logprobs) as JSON-schema conditions (`_rules`). Limits of the loaded model (vocabulary,
context) are added to the schema by openapi.py once the model is loaded.

Responses are built as plain dicts in `serving.py` (their shape is fixed and hot in streaming).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from memfit.llm.engine.errors import MAX_USER_CHARS
from memfit.llm.engine.params import MAX_LOGPROBS, MAX_STOP_STRINGS

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # OpenAI's limit on choices per request
MAX_SESSION_ID = 256  # characters of a session id (body field or X-Session-Id header)
MAX_PROMPTS = 256  # prompts in one /v1/completions request (each becomes n engine requests)

_CONFIG = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)



def _whole(value: Any) -> Any:
    """JSON does not tell 2 from 2.0 and neither does JSON schema's "integer": accept a float with no
    fractional part where an integer is due (strict mode refuses strings and bools all the same)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


_WHOLE = BeforeValidator(_whole)  # last in Annotated[...], so that the bounds stay JSON-schema bounds
StopText = Annotated[str, Field(min_length=1)]  # an empty stop string would end every completion at once
Stop = Union[StopText, Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)], None]
TokenIds = Annotated[list[Annotated[int, Field(ge=0), _WHOLE]], Field(min_length=1)]
# An empty prompt string encodes to no tokens, which the engine cannot start from: refused here, so the
# schema says so too (OpenAI's current API also requires a prompt).
PromptText = Annotated[str, Field(min_length=1)]


def _only(json_schema: dict[str, Any], why: str) -> WithJsonSchema:
    """Declare only the values the server accepts for a field it validates itself with a better message."""
    return WithJsonSchema({**json_schema, "description": why})


def _rules(*conditions: dict[str, Any]) -> ConfigDict:
    """The model config plus JSON-schema conditions between fields (checked at run time in serving.py)."""
    return ConfigDict(**_CONFIG, json_schema_extra={"allOf": list(conditions)})


def _when(field: str, value: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """JSON schema: if `field` is present and matches `value`, the body must match `then`."""
    return {"if": {"properties": {field: value}, "required": [field]}, "then": then}


# stream_options means nothing without stream: refused (as OpenAI and vLLM do), not ignored
_STREAM_OPTIONS_NEED_STREAM = _when("stream_options", {"type": "object"},
                                    {"properties": {"stream": {"const": True}}, "required": ["stream"]})


_ZERO = _only({"type": "number", "minimum": 0, "maximum": 0}, "not supported by this server: only 0 is accepted")
_NO = "not supported by this server (a vLLM extension): "
# vLLM's sampling extensions that memfit does not implement, at the one value that changes nothing (None: only
# absent or null). Declared (not left to extra="allow", which ignores a field) so that a client asking for one gets
# a 400 naming it, not other output than it asked for; serving.py refuses any other value.
VLLM_NEUTRAL: dict[str, Any] = {
    "min_tokens": 0, "repetition_penalty": 1.0, "length_penalty": 1.0, "use_beam_search": False,
    "include_stop_str_in_output": False, "prompt_logprobs": None, "allowed_token_ids": None, "bad_words": None,
    "truncate_prompt_tokens": None, "guided_json": None, "guided_regex": None, "guided_choice": None,
    "guided_grammar": None, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "add_generation_prompt": True, "continue_final_message": False, "chat_template": None}
# Every sampling field the server refuses unless neutral (serving.py): OpenAI's penalties and vLLM's extensions.
UNSUPPORTED_NEUTRAL: dict[str, Any] = {"presence_penalty": 0, "frequency_penalty": 0, **VLLM_NEUTRAL}
_NEVER = {"not": {}}  # with `| None`: only null


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool | None = False


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _CONFIG

    model: str | None = Field(None, description="the served model's id (see GET /v1/models); optional")
    max_tokens: Annotated[int, Field(ge=1, le=_INT64_MAX), _WHOLE] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N), _WHOLE] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX), _WHOLE] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0), _ZERO] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0), _ZERO] | None = None
    logit_bias: Annotated[dict[str, float], _only({"type": "object", "maxProperties": 0},
                                                  "not supported by this server: only {} is accepted")] | None = None
    # also the `vtc` scheduling policy's unit of fairness, which keys a counter by it: an id, capped as session_id
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = None
    # memfit/vLLM extension: lower = more urgent (negative allowed); used by --scheduling-policy priority.
    priority: Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX), _WHOLE] | None = None
    # vLLM-style extensions many clients send through `extra_body`.
    top_k: Annotated[int, Field(ge=-1), _WHOLE] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0), _WHOLE]] | None = None
    # vLLM's extensions memfit does not implement: their neutral value only (VLLM_NEUTRAL; serving.py refuses others)
    min_tokens: Annotated[int, _WHOLE, _only({"type": "integer", "const": 0}, _NO + "only 0")] | None = None
    repetition_penalty: Annotated[float, _only({"type": "number", "const": 1}, _NO + "only 1")] | None = None
    length_penalty: Annotated[float, _only({"type": "number", "const": 1}, _NO + "only 1")] | None = None
    use_beam_search: Annotated[bool, _only({"type": "boolean", "const": False}, _NO + "only false")] | None = None
    include_stop_str_in_output: Annotated[bool, _only({"type": "boolean", "const": False},
                                                      _NO + "only false")] | None = None
    prompt_logprobs: Annotated[int, _only(_NEVER, _NO + "only null")] | None = None
    allowed_token_ids: Annotated[list[int], _only(_NEVER, _NO + "only null")] | None = None
    bad_words: Annotated[list[str], _only(_NEVER, _NO + "only null")] | None = None
    truncate_prompt_tokens: Annotated[int, _only(_NEVER, _NO + "only null")] | None = None
    guided_json: Annotated[Union[str, dict[str, Any]], _only(_NEVER, _NO + "only null")] | None = None
    guided_regex: Annotated[str, _only(_NEVER, _NO + "only null")] | None = None
    guided_choice: Annotated[list[str], _only(_NEVER, _NO + "only null")] | None = None
    guided_grammar: Annotated[str, _only(_NEVER, _NO + "only null")] | None = None
    skip_special_tokens: Annotated[bool, _only({"type": "boolean", "const": True}, _NO + "only true")] | None = None
    spaces_between_special_tokens: Annotated[bool, _only({"type": "boolean", "const": True},
                                                         _NO + "only true")] | None = None
    add_generation_prompt: Annotated[bool, _only({"type": "boolean", "const": True}, _NO + "only true")] | None = None
    continue_final_message: Annotated[bool, _only({"type": "boolean", "const": False},
                                                  _NO + "only false")] | None = None
    chat_template: Annotated[str, _only(_NEVER, _NO + "only null")] | None = None


class PriorityUpdate(BaseModel):
    """PATCH /v1/requests/{id}: a running or queued request's new priority (takes effect at the next step)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    priority: Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX), _WHOLE]


class CompletionRequest(_Sampling):
    model_config = _rules(
        _STREAM_OPTIONS_NEED_STREAM,
        # best_of = 1 means n = 1 (OpenAI: best_of >= n); best_of > 1 is not implemented (as in vLLM V1).
        _when("best_of", {"const": 1}, {"properties": {"n": {"enum": [1, None]}}}),
        # echo together with logprobs would need prompt logprobs, which are not computed.
        {"not": {"properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}},
                 "required": ["echo", "logprobs"]}},
    )
    prompt: Union[PromptText, TokenIds, Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    max_tokens: Annotated[int, Field(ge=1, le=_INT64_MAX), _WHOLE] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), _WHOLE] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N), _WHOLE, _only(
        {"type": "integer", "const": 1}, "best-of-n sampling is not supported by this server: only 1 (with n = 1)")] | None = None
    suffix: Annotated[str, _only({"type": "string", "maxLength": 0},
                                 "not supported by this server: only '' is accepted")] | None = None


class TextPart(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """image_url, input_audio, file, ...: parsed so that serving.py can refuse them with a clear message (the
    JSON schema lists text parts only, as that is all the server accepts)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str


_TEXT_PARTS = _only({"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
                   "content parts; this model reads text only: [{'type': 'text', 'text': ...}, ...]")


class ChatMessage(BaseModel):
    # Every role but the assistant's must carry its content (an assistant's may be null, as after a tool call in
    # OpenAI's API); serving.py refuses the rest with a message naming the field.
    model_config = ConfigDict(**_CONFIG, json_schema_extra={"allOf": [{
        "if": {"properties": {"role": {"const": "assistant"}}},
        "else": {"required": ["content"], "properties": {"content": {"anyOf": [
            {"type": "string"}, {"type": "array", "minItems": 1}]}}}}]})
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, Annotated[list[Union[TextPart, OtherPart]], _TEXT_PARTS], None] = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Annotated[list[Any], _only({"type": "array", "maxItems": 0},
                                           "tool calls are not supported by this server")] | None = None


class ChatCompletionRequest(_Sampling):
    model_config = _rules(_when("top_logprobs", {"type": "integer"},
                                {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}),
                          _STREAM_OPTIONS_NEED_STREAM)
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=_INT64_MAX), _WHOLE] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), _WHOLE] | None = None
    response_format: Annotated[dict[str, Any], _only(
        {"type": "object", "properties": {"type": {"const": "text"}}},
        "only {'type': 'text'} is supported")] | None = None
    tools: Annotated[list[dict[str, Any]], _only({"type": "array", "maxItems": 0},
                                                 "tool calling is not supported by this server")] | None = None
    # without tools only "none" means anything (OpenAI and vLLM refuse the others without tools)
    tool_choice: Annotated[Union[str, dict[str, Any]], _only(
        {"const": "none"}, "tool calling is not supported by this server: only 'none' is accepted")] | None = None
    # memfit extension: keep this conversation's KV cached between turns (same as the X-Session-Id header).
    session_id: Annotated[str, Field(min_length=1, max_length=MAX_SESSION_ID)] | None = None
