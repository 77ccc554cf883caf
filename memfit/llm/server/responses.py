"""Engine outputs -> OpenAI response bodies: the group of engine requests behind one HTTP request, the SSE
stream in OpenAI's order, logprobs in both endpoints' shapes, and engine errors -> HTTP errors.

Streaming order (exactly OpenAI's):

    chat:        role delta per choice -> content deltas -> per choice {} + finish_reason
                 -> [usage chunk with empty choices] -> [DONE]
    completions: text deltas -> per choice "" + finish_reason -> [usage chunk] -> [DONE]
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from memfit.llm.server.async_engine import EngineFailure, EngineNotReady
from memfit.llm.server.errors import APIError, bad_request

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way
RETRY_AFTER = {"Retry-After": "1"}  # seconds, on the 429 and 503 a client may retry (RFC 9110)


def engine_error(exc: BaseException) -> APIError:
    """Map what the engine raises to an HTTP error."""
    from memfit.llm.engine.errors import QueueFull
    from memfit.memory.budget import MemoryBudgetExceeded

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, f"the server is busy: {exc}; retry later", code="queue_full", headers=RETRY_AFTER)
    if isinstance(exc, EngineNotReady):
        return APIError(503, str(exc), code="not_ready", headers=RETRY_AFTER)
    if isinstance(exc, MemoryBudgetExceeded):
        # The engine's words are the operator's (the ledger's holders, "raise --memory-budget"); a client can
        # only shorten the request. The prompt or max_tokens may be the cause, so no one field is named.
        what = str(exc).split("\n")[0].split(" (memory budget", 1)[0]
        return bad_request(f"{what}: this server cannot hold the sequence; send a shorter prompt or a smaller "
                           "max_tokens", code="kv_budget_exceeded")
    if isinstance(exc, ValueError):  # RequestError, InvalidSamplingParams, ChatTemplateError
        return bad_request(str(exc))
    if isinstance(exc, EngineFailure):
        return APIError(500, str(exc))
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}")


@dataclass
class Choice:
    index: int  # OpenAI's choice index: prompt_index * n + i
    prompt_index: int
    request_id: str  # the engine request
    text_offset: int = 0  # completions logprobs: where the next token's text starts
    logprobs_sent: int = 0
    output: Any = None  # the latest RequestOutput
    done: bool = False


@dataclass
class Group:
    """The engine requests behind one HTTP request; their outputs all arrive on `queue`."""

    choices: list[Choice]
    prompts: list[list[int]]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def response_id(self) -> str:
        """The response's `id` (cmpl-<hex> or chatcmpl-<hex>): its engine requests' ids less the choice index."""
        return self.choices[0].request_id.rsplit("-", 1)[0]

    def unfinished(self) -> list[str]:
        return [c.request_id for c in self.choices if not c.done]

    async def next(self) -> list[tuple[Choice, Any]]:
        """Wait for the next output(s) (everything already queued comes at once); raises APIError if the
        engine failed one of the requests."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        by_id, got = {c.request_id: c for c in self.choices}, []
        for rid, item in items:
            c = by_id.get(rid)
            if c is None or c.done:
                continue
            if isinstance(item, BaseException):
                raise engine_error(item)
            got.append((c, item))
        return got

    def usage(self) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.prompts)  # each prompt once, however many choices it has
        completion = sum(len(c.output.outputs[0].token_ids) for c in self.choices if c.output is not None)
        # Cached tokens are prompt tokens: counted once per prompt like prompt_tokens (from its first choice that has
        # an output), or with n > 1 they could exceed prompt_tokens.
        first: dict[int, int] = {}
        for c in self.choices:
            if c.output is not None:
                first.setdefault(c.prompt_index, c.output.num_cached_tokens)
        cached = sum(first.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Logprobs:
    """Formats TokenLogprobs lists; `token_str(id)` is the token's text (cached by the caller)."""

    def __init__(self, token_str: Callable[[int], str]) -> None:
        self.token_str = token_str

    def chat(self, c: Choice, out: Any, start: int, top_n: int | None) -> dict[str, Any] | None:
        if top_n is None or out.logprobs is None:
            return None
        entries = []
        for lp in out.logprobs[start:]:
            s = self.token_str(lp.token_id)
            top = [{"token": self.token_str(t), "logprob": _clamp(v), "bytes": list(self.token_str(t).encode())}
                   for t, v in list(lp.top.items())[:top_n]]
            entries.append({"token": s, "logprob": _clamp(lp.logprob), "bytes": list(s.encode()), "top_logprobs": top})
        c.logprobs_sent = len(out.logprobs)
        return {"content": entries, "refusal": None}

    def completion(self, c: Choice, out: Any, start: int, top_n: int | None, offset: int) -> dict[str, Any] | None:
        if top_n is None or out.logprobs is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for lp in out.logprobs[start:]:
            s = self.token_str(lp.token_id)
            tokens.append(s)
            values.append(_clamp(lp.logprob))
            tops.append({self.token_str(t): _clamp(v) for t, v in list(lp.top.items())[:top_n]})
            offsets.append(offset)
            offset += len(s)
        c.logprobs_sent, c.text_offset = len(out.logprobs), offset
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _clamp(value: float) -> float:
    return value if value == value and value > _MIN_LOGPROB else _MIN_LOGPROB


def stream_response(group: Group, meta: dict[str, Any], chat: bool, include_usage: bool, echo: list[str] | None,
                    top_n: int | None, logprobs: Logprobs, abort: Callable[[list[str]], None]) -> StreamingResponse:
    """The SSE response of a group. `abort(ids)` is called with the unfinished requests however the
    stream ends (client gone, error, shutdown), so their KV is freed."""
    base = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "system_fingerprint": None}

    def chunk(choice: dict[str, Any]) -> str:
        body = {**base, "choices": [choice]}
        if include_usage:
            body["usage"] = None  # OpenAI sends the key on every chunk once usage is asked for
        return sse(body)

    def content(c: Choice, text: str, lp: Any) -> dict[str, Any]:
        if chat:
            return {"index": c.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}
        return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": None}

    async def events() -> AsyncIterator[str]:
        try:
            first = []
            for c in group.choices:
                if chat:
                    first.append(chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}))
                elif echo:
                    first.append(chunk(content(c, echo[c.prompt_index], None)))
                    c.text_offset = len(echo[c.prompt_index])
            if first:
                yield "".join(first)
            while group.unfinished():
                try:
                    got = await group.next()
                except APIError as exc:
                    yield sse(exc.body()) + "data: [DONE]\n\n"
                    return
                parts = []
                for c, out in got:
                    comp = out.outputs[0]
                    lp = None
                    if top_n is not None and comp.logprobs and len(comp.logprobs) > c.logprobs_sent:
                        lp = (logprobs.chat(c, comp, c.logprobs_sent, top_n) if chat
                              else logprobs.completion(c, comp, c.logprobs_sent, top_n, c.text_offset))
                    if comp.delta_text or lp is not None:
                        parts.append(chunk(content(c, comp.delta_text, lp)))
                    c.output, c.done = out, out.finished
                    if out.finished:
                        end = {"index": c.index, "delta": {}} if chat else {"index": c.index, "text": ""}
                        parts.append(chunk({**end, "logprobs": None, "finish_reason": comp.finish_reason}))
                if parts:
                    yield "".join(parts)
            yield (sse({**base, "choices": [], "usage": group.usage()}) if include_usage else "") + "data: [DONE]\n\n"
        finally:
            abort(group.unfinished())  # client gone (generator cancelled or closed), or an error

    return _AbortingStream(events(), on_close=lambda: abort(group.unfinished()), media_type="text/event-stream",
                           # the id goes out with the headers, before the first token: a queued request can be
                           # re-prioritised (PATCH /v1/requests/{id}) before it has produced anything
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": meta["id"]})


class _AbortingStream(StreamingResponse):
    """A StreamingResponse that aborts its engine requests however it ends. The generator's own `finally`
    covers most exits, but a client that disconnects before the first chunk can cancel the response
    before the generator ever starts, and a generator that never started runs no `finally`."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
