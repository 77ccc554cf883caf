"""The OpenAPI contract: what each route can answer, declared so that `/openapi.json` tells the truth.

FastAPI documents a 422 for every route with a body and nothing else; this server answers 400 instead
(OpenAI's status for a malformed request) plus 401/404/413/429/500/503 in OpenAI's error shape, streams
`text/event-stream`, and serves `/metrics` as Prometheus text. `responses(...)` builds the `responses=` of
one route from the statuses it can answer, and `install_openapi` drops FastAPI's undeclared 422 and adds
the bearer scheme when an API key is set. The response models below document the bodies `serving.py`
builds as plain dicts (they are hot in streaming); tests/llm/server/test_schema_conformance.py checks
the two agree by running schemathesis against a live server.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from memfit.llm.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_exceeded, server_error or service_unavailable")
    param: str | None = Field(description="the request field at fault, e.g. 'messages[0].content'")
    code: str | None = Field(description="e.g. invalid_value, context_length_exceeded, queue_full, not_ready")


class ErrorResponse(BaseModel):
    """OpenAI's error body; every error this server answers has it."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = Field(None, description="the context length; present once the model is loaded")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(ge=0, description="prompt tokens whose KV came from the session's cache")


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None


class PriorityUpdated(BaseModel):
    id: str = Field(description="the response id the priority was set for")
    object: Literal["request.priority"]
    priority: int
    num_requests: int = Field(description="engine requests (the response's choices) still running or queued")


class Health(BaseModel):
    status: str = Field(description="'ok' when ready; else loading, failed, stopping or stopped")
    message: str | None = Field(None, description="why the server is not ready (503 only)")


# Why each status can be answered; a route lists the ones that apply to it.
_WHEN = {
    400: "Malformed request: bad JSON, a wrong type or an out-of-range value, an empty prompt, token ids outside "
         "the vocabulary, prompt + max_tokens longer than the context, an unsupported feature, or a sequence that "
         "could never fit the KV budget.",
    401: "Missing or wrong API key: send `Authorization: Bearer <key>`.",
    404: "The model named in the request is not the one served (or, for /v1/requests/{id}, no such request is "
         "running or queued).",
    413: "The request body is larger than the server's limit (--max-body-size).",
    429: "The waiting queue is full (--max-waiting); retry later.",
    500: "The engine failed while running the request (other requests keep being served).",
    503: "The model is loading, failed to load, or the server is shutting down.",
}
# With `stream: true`: server-sent events. In OpenAPI 3.1 the media type's schema describes one event, the
# SSE fields as a client parses them: no `event:` line (so "message"), `data` a JSON chunk or "[DONE]".
_SSE = {"text/event-stream": {"schema": {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"const": "message"},
        "data": {"type": "string", "description": "one JSON chunk (chat.completion.chunk / text_completion) in "
                                                  "OpenAI's order, an error object, or `[DONE]` last"},
    },
}}}


def responses(ok: type[BaseModel] | None, *errors: int, ok_description: str = "Success",
              stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: its 200 (JSON `ok`, plus SSE when it streams) and each error status it
    can answer, all with OpenAI's error body."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": ok_description}
        if stream:
            out[200]["content"] = _SSE
    for status in errors:
        out[status] = {"model": ErrorResponse, "description": _WHEN[status]}
    return out


METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format 0.0.4",
          "content": {METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}},
    500: {"model": ErrorResponse, "description": "A bug while rendering the metrics."},
}


def _exact_request_schemas(schema: dict[str, Any]) -> None:
    """Put pydantic's own JSON schema of the request bodies in `components`: FastAPI's OpenAPI model stores
    `minimum`/`maximum` as floats, which turns the seed's bound 2**63 - 1 into 2**63 (a value refused)."""
    from memfit.llm.server.protocol import ChatCompletionRequest, CompletionRequest, PriorityUpdate

    components = schema["components"]["schemas"]
    for model in (CompletionRequest, ChatCompletionRequest, PriorityUpdate):
        exact = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(exact.pop("$defs", {}))
        components[model.__name__] = exact


def _model_limits(schema: dict[str, Any], max_model_len: int, vocab_size: int) -> None:
    """What only the loaded model decides: token ids below its vocabulary size, at most `max_model_len - 1`
    prompt tokens or new tokens. (That prompt + max_tokens must fit the context too cannot be said in JSON
    schema: the server answers 400 `context_length_exceeded`.)"""
    c = schema["components"]["schemas"]
    for member in c["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        items = member.get("items", {})
        token_list = member if items.get("type") == "integer" else items if items.get("type") == "array" else None
        if token_list is not None:  # token ids, or one of a list of token-id prompts
            token_list["items"]["maximum"] = vocab_size - 1
            token_list["maxItems"] = max_model_len - 1
    for name, field in (("CompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_tokens"),
                        ("ChatCompletionRequest", "max_completion_tokens")):
        c[name]["properties"][field]["anyOf"][0]["maximum"] = max_model_len - 1


def _prune_unreferenced(schema: dict[str, Any]) -> None:
    """Drop component schemas nothing refers to (FastAPI's HTTPValidationError once the 422s are gone, the
    content-part models that the request schema replaces with the text parts it accepts)."""
    import json

    schemas = schema["components"]["schemas"]
    while True:
        text = json.dumps({k: v for k, v in schema.items() if k != "components"}) + json.dumps(schemas)
        unused = [name for name in schemas if f'"#/components/schemas/{name}"' not in text]
        if not unused:
            return
        for name in unused:
            del schemas[name]


def install_openapi(app: FastAPI, api_key_set: bool, model_limits: Callable[[], tuple[int, int] | None]) -> None:
    """Make `app.openapi()` drop FastAPI's 422s (this server answers 400), keep the request bodies' exact
    bounds, add the loaded model's limits (`model_limits()` -> (max_model_len, vocab_size), or None while
    loading) and, with an API key, declare the bearer scheme on /v1/*."""
    built: dict[tuple[int, int] | None, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        limits = model_limits()
        if limits in built:
            return built[limits]
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _exact_request_schemas(schema)
        if limits is not None:
            _model_limits(schema, *limits)
        for path, item in schema["paths"].items():
            for op in item.values():
                op["responses"].pop("422", None)
                if api_key_set and path.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        _prune_unreferenced(schema)
        if api_key_set:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                        "description": "the server's --api-key"}}
        built[limits] = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
