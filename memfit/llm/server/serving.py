"""The OpenAI endpoints' logic: request -> checks -> engine requests -> response JSON or an SSE stream.

A request with `n` choices (and, for /v1/completions, several prompts) becomes `prompts x n` engine
requests added as one group, all reporting to one asyncio queue. Choice `i` of prompt `p` has index
`p * n + i`, as in OpenAI. Response bodies and the stream are built in `responses.py`.

If the client goes away (stream closed, or a non-streaming client disconnects while waiting) the group's
unfinished engine requests are aborted, which frees their KV before the engine's next step.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from functools import lru_cache
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from memfit.llm.models.tokenizer import GIL_FREE_CHARS
from memfit.llm.server.async_engine import AsyncEngine, RequestSpec
from memfit.llm.server.errors import APIError, bad_request
from memfit.llm.server.protocol import (MAX_SESSION_ID, UNSUPPORTED_NEUTRAL, ChatCompletionRequest, CompletionRequest,
                                        TextPart, _Sampling)
from memfit.llm.server.responses import (RETRY_AFTER, Choice, Group, Logprobs, engine_error, stream_response,
                                         wait_disconnect)

# Text longer than this is tokenized on a worker thread, not the event loop: a 4 MB prompt takes seconds to
# tokenize, and on the loop it would stall every other client's stream and /health for that long (the tokenizer
# releases the GIL for such text: Tokenizer.encode). Shorter text stays on the loop, where the hop to a thread would
# cost more than the encode. The same bound as the tokenizer's: text sent to a thread must also release the GIL.
OFF_LOOP_CHARS = GIL_FREE_CHARS


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, aliases: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.model_name = model_name
        self.aliases = {model_name, *aliases}
        self.created = int(time.time())
        self._tok = None
        self._logprobs: Logprobs | None = None

    # ---- model facts (read once the engine is loaded; immutable after that) --------------------------
    @property
    def tokenizer(self):
        if self._tok is None:
            tok = self.engine.model_info.tokenizer  # the engine's own (read-only calls: safe across threads)
            self._logprobs = Logprobs(lru_cache(maxsize=65536)(lambda i: tok.decode([i], skip_special_tokens=False)))
            self._tok = tok
        return self._tok

    @property
    def logprobs(self) -> Logprobs:
        self.tokenizer  # noqa: B018 - loads the tokenizer and the logprobs formatter with it
        return self._logprobs  # type: ignore[return-value]

    @property
    def max_model_len(self) -> int:
        return self.engine.model_info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_info.vocab_size

    def model_card(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "memfit"}
        if self.engine.ready:
            card["max_model_len"] = self.max_model_len
        return card

    def check_ready(self) -> None:
        if not self.engine.ready:
            raise APIError(503, self.engine.not_ready_message(), code="not_ready", headers=RETRY_AFTER)

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.aliases:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    async def _tokenize(self, fn, chars: int, param: str):
        """`fn()` (tokenizer calls), off the event loop when the text is long; a text the tokenizer refuses
        (not valid UTF-8: a lone surrogate such as "\\ud800" in the JSON) is a 400 naming `param`."""
        try:
            return await asyncio.to_thread(fn) if chars > OFF_LOOP_CHARS else fn()
        except ValueError as exc:
            raise bad_request(str(exc), param=param, code="invalid_value") from exc

    # ---- request -> engine specs ---------------------------------------------------------------------
    def _params(self, req: _Sampling, max_tokens: int | None, logprobs: int | None, choice: int) -> Any:
        from memfit.llm.engine.params import SamplingParams

        if req.logit_bias:
            raise bad_request("logit_bias is not supported by this server", param="logit_bias")
        for name, neutral in UNSUPPORTED_NEUTRAL.items():
            value = getattr(req, name)
            if value is not None and value != neutral:
                keep = "leave it out" if neutral is None else f"send {neutral!r} or leave it out"
                raise bad_request(f"{name} is not supported by this server ({keep})", param=name)
        d = self.tokenizer.generation  # the model author's defaults stand in for omitted fields (as in vLLM)
        seed = None if req.seed is None else req.seed + choice  # n seeded choices must not be identical
        try:
            return SamplingParams(
                max_tokens=max_tokens or 1,
                temperature=req.temperature if req.temperature is not None else (d.temperature if d.temperature is not None else 1.0),
                top_p=req.top_p if req.top_p is not None else (d.top_p if d.top_p is not None else 1.0),
                top_k=req.top_k if req.top_k is not None else (d.top_k if d.top_k is not None else -1),
                min_p=req.min_p or 0.0, seed=seed, stop=req.stop, stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
            )
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    def _check_prompt(self, ids: list[int], max_tokens: int | None, param: str,
                      max_tokens_param: str | None = "max_tokens") -> None:
        """`max_tokens_param`: the field the client sent the completion's length in (None: it sent none, and
        the default applies)."""
        if not ids:
            raise bad_request("the prompt is empty: it must contain at least one token", param=param)
        if max(ids) >= self.vocab_size:  # one C pass (it read the property once a token: ~1 s for 2M tokens)
            raise bad_request(f"token ids must be in [0, {self.vocab_size})", param=param, code="invalid_value")
        limit = self.max_model_len
        if len(ids) >= limit or (max_tokens is not None and len(ids) + max_tokens > limit):
            asked = len(ids) + (max_tokens or 1)
            # the prompt alone fits: the completion's length is what to change (`max_tokens_param`, the field sent)
            blame = param if len(ids) >= limit or max_tokens_param is None else max_tokens_param
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested {asked} tokens "
                f"({len(ids)} in the {'messages' if param == 'messages' else 'prompt'}, {max_tokens or 1} in the "
                "completion). Please reduce the length of the prompt or the completion.",
                param=blame, code="context_length_exceeded",
            )

    def _group(self, kind: str, prompts: list[list[int]], specs_for_prompt, n: int) -> tuple[Group, list[RequestSpec]]:
        # No limit on prompts x n here (JSON schema could not state one): at most MAX_PROMPTS x MAX_N specs, and
        # the engine's waiting limit refuses a group it cannot queue whole (429, see _submit).
        # The engine requests are <response id>-<choice>, the response id `kind`-<hex> (cmpl or chatcmpl): a PATCH
        # finds them by that prefix, so the kind in the id it names must match too.
        base = f"{kind}-{uuid.uuid4().hex}"
        choices, specs = [], []
        for p, ids in enumerate(prompts):
            for i in range(n):
                choices.append(Choice(index=p * n + i, prompt_index=p, request_id=f"{base}-{p * n + i}"))
                specs.append(specs_for_prompt(ids, i))
        return Group(choices, prompts), specs

    async def _submit(self, group: Group, specs: list[RequestSpec], arrival: float) -> None:
        ids = [c.request_id for c in group.choices]
        limit = self.engine.model_info.max_waiting
        if limit is not None and len(ids) > limit:
            # queued all or none, so it could never be queued: a 429 would send clients (OpenAI's SDKs retry 429s
            # on their own) into retries that cannot succeed
            n = len(ids) // len(group.prompts)
            raise bad_request(
                f"this request asks for {len(ids)} completions ({len(group.prompts)} prompt(s) x n={n}), more than "
                f"the server queues at once ({limit}, its --max-waiting): send fewer prompts or a smaller n",
                param="n" if n > 1 else "prompt", code="too_many_completions")
        try:
            await self.engine.add(specs, ids, group.queue, arrival)
        except asyncio.CancelledError:
            self.engine.abort(ids)  # the add may still land after we gave up waiting for it
            raise
        except BaseException as exc:  # noqa: BLE001 - mapped to a status
            err = engine_error(exc)
            if err.code == "queue_full" and len(ids) > 1:
                n = len(ids) // len(group.prompts)
                err.message += (f" (this request asks for {len(ids)} completions, {len(group.prompts)} prompt(s) x "
                                f"n={n}, queued all or none: send fewer if that is more than the queue holds)")
            raise err from exc

    # ---- /v1/completions -------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request, arrival: float):
        self.check_ready()
        self.check_model(req.model)
        if req.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix")
        n = req.n or 1
        if req.best_of is not None and (req.best_of != 1 or n != 1):
            # best_of = n > 1 used to be accepted as a no-op; refused since the schema must state what is
            # accepted, and JSON schema cannot say "equals n".
            raise bad_request("best-of-n sampling is not supported by this server: leave best_of out (or send 1 "
                              "with n = 1)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported (prompt logprobs are not computed)", param="echo")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        tok = self.tokenizer
        raw = req.prompt
        if isinstance(raw, str):
            prompts = await self._tokenize(lambda: [tok.encode(raw)], len(raw), "prompt")
        elif raw and isinstance(raw[0], str):
            prompts = await self._tokenize(lambda: [tok.encode(p) for p in raw], sum(map(len, raw)), "prompt")  # type: ignore[arg-type]
        elif raw and isinstance(raw[0], int):
            prompts = [list(raw)]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in raw]  # type: ignore[union-attr]
        sent = "max_tokens" if "max_tokens" in req.model_fields_set else None  # else OpenAI's default, 16
        for ids in prompts:
            self._check_prompt(ids, req.max_tokens, "prompt", sent)
        max_tokens = req.max_tokens
        group, specs = self._group("cmpl", prompts, lambda ids, i: RequestSpec(
            ids, self._params(req, max_tokens, req.logprobs, i), auto_max_tokens=max_tokens is None,
            priority=req.priority or 0, user=req.user), n)
        await self._submit(group, specs, arrival)
        echo = [tok.decode(p) for p in prompts] if req.echo else None
        meta = {"id": group.response_id, "created": int(time.time()), "model": self.model_name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return stream_response(group, meta, chat=False, include_usage=include_usage, echo=echo, top_n=req.logprobs,
                                   logprobs=self.logprobs, abort=self.engine.abort)
        await self._collect(group, request)
        choices = []
        for c in group.choices:
            out = c.output.outputs[0]
            text = (echo[c.prompt_index] if echo else "") + out.text
            lp = self.logprobs.completion(c, out, 0, req.logprobs, len(echo[c.prompt_index]) if echo else 0)
            choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason})
        return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": group.usage(),
                             "system_fingerprint": None}, headers={"X-Request-Id": meta["id"]})

    # ---- /v1/chat/completions ----------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request, arrival: float):
        self.check_ready()
        self.check_model(req.model)
        if req.tools:
            raise bad_request("tool calling is not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.tool_choice is not None and req.tool_choice != "none":
            raise bad_request("tool_choice is only allowed when tools are specified, and this server supports no "
                              "tools: leave tool_choice out (or send 'none')", param="tool_choice")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        messages = []
        for i, m in enumerate(req.messages):
            if m.tool_calls:  # tool calling is not supported
                raise bad_request("tool calls are not supported by this server: a message cannot carry tool_calls",
                                  param=f"messages[{i}].tool_calls")
            if m.content is None or (isinstance(m.content, list) and not m.content):
                if m.role != "assistant":  # OpenAI requires the content of every other role's message
                    raise bad_request(f"a {m.role} message needs its content (a string or a list of text parts)",
                                      param=f"messages[{i}].content")
            if isinstance(m.content, list):
                parts = []
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        raise bad_request(f"content part type {part.type!r} is not supported: this model reads text only",
                                          param=f"messages[{i}].content[{j}].type")
                    if not isinstance(part, TextPart):  # {"type": "text"} without a text string
                        raise bad_request("a text content part needs a 'text' string", param=f"messages[{i}].content[{j}].text")
                    parts.append(part.text)
                content = "".join(parts)
            else:
                content = m.content or ""
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        from memfit.llm.models.tokenizer import ChatTemplateError

        tok = self.tokenizer

        def encode() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True)
            except ChatTemplateError as exc:
                raise bad_request(str(exc), param="messages") from exc
            return tok.encode(text, add_special_tokens=False)

        ids = await self._tokenize(encode, sum(len(m["content"]) for m in messages), "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        self._check_prompt(ids, max_tokens, "messages",
                           "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        n = req.n or 1
        session = request.headers.get("x-session-id") or req.session_id
        if session is not None and len(session) > MAX_SESSION_ID:  # the header, as the body field is capped in protocol.py
            raise bad_request(f"X-Session-Id is {len(session)} characters long; at most {MAX_SESSION_ID} are allowed",
                              param="X-Session-Id", code="invalid_value")
        # n parallel choices cannot all continue one cached conversation: with n > 1 the session is not used (the
        # request is served in full, its KV not kept; the session's kept KV waits for its next n = 1 turn). Not
        # refused: a session id is a cache hint, and a client that sends the header on every call still gets the
        # n choices it asked for, as from any OpenAI-compatible server (docs/serving.md).
        session = session if n == 1 else None
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        group, specs = self._group("chatcmpl", [ids], lambda p, i: RequestSpec(
            p, self._params(req, max_tokens, top_n, i), session_id=session, auto_max_tokens=max_tokens is None,
            priority=req.priority or 0, user=req.user), n)
        await self._submit(group, specs, arrival)
        meta = {"id": group.response_id, "created": int(time.time()), "model": self.model_name}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return stream_response(group, meta, chat=True, include_usage=include_usage, echo=None, top_n=top_n,
                                   logprobs=self.logprobs, abort=self.engine.abort)
        await self._collect(group, request)
        choices = []
        for c in group.choices:
            out = c.output.outputs[0]
            choices.append({
                "index": c.index, "message": {"role": "assistant", "content": out.text, "refusal": None},
                "logprobs": self.logprobs.chat(c, out, 0, top_n), "finish_reason": out.finish_reason,
            })
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": group.usage(),
                             "system_fingerprint": None}, headers={"X-Request-Id": meta["id"]})

    # ---- PATCH /v1/requests/{id} ---------------------------------------------------------------------------
    async def set_priority(self, response_id: str, priority: int) -> dict[str, Any]:
        """`response_id` is a response's `id` (cmpl-<hex> or chatcmpl-<hex>); its engine requests are
        <response_id>-<i>, so a chatcmpl- id names no completion's requests, nor the reverse."""
        self.check_ready()
        kind, _, base = response_id.partition("-")
        shown = response_id if len(response_id) <= 80 else response_id[:77] + "..."  # not echoed whole
        if kind not in ("cmpl", "chatcmpl") or not base or "-" in base:
            raise APIError(404, f"no request {shown!r}: use the `id` of a completion or chat completion",
                           code="request_not_found")
        try:
            n = await self.engine.set_priority(f"{response_id}-", priority)
        except BaseException as exc:  # noqa: BLE001 - mapped to a status
            raise engine_error(exc) from exc
        if n == 0:
            raise APIError(404, f"no running or queued request {shown!r} (finished, aborted, or never sent)",
                           code="request_not_found")
        return {"id": response_id, "object": "request.priority", "priority": priority, "num_requests": n}

    # ---- waiting for results ----------------------------------------------------------------------------
    async def _collect(self, group: Group, request: Request) -> None:
        async def gather() -> None:
            while group.unfinished():
                for c, out in await group.next():
                    c.output, c.done = out, out.finished

        task = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                self.engine.abort(group.unfinished())
        if not task.done() or task.cancelled():
            raise APIError(499, "the client closed the connection")  # nobody will read this
        try:
            task.result()
        except BaseException:
            self.engine.abort(group.unfinished())
            raise

