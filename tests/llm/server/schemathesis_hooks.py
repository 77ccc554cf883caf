"""schemathesis hooks for the conformance run (`SCHEMATHESIS_HOOKS=tests.llm.server.schemathesis_hooks`).

One rule of the API cannot be written in JSON schema: prompt tokens + max_tokens must fit the model's
context (a token count, not a string length). schemathesis' `positive_data_acceptance` would report every
schema-valid request that breaks it. `positive_data_acceptance_in_context` is that check, except that a 400
`context_length_exceeded` passes when an independent count (the model's tokenizer, run here, not the
server's numbers) confirms that the request does not fit. Run with
`--exclude-checks positive_data_acceptance` so that only this stricter-but-fair version runs.

A second rule is a product of two fields: prompts x n must not exceed the server's waiting queue (all or none
are queued), else a 400 `too_many_completions`; it passes when the request's own prompt count times n is over
MEMFIT_SCHEMA_MAX_WAITING.

Environment: MEMFIT_SCHEMA_MODEL (the served model directory or bundled name), MEMFIT_SCHEMA_MAX_MODEL_LEN,
MEMFIT_SCHEMA_MAX_WAITING.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from memfit.llm.models.loader import resolve_model_path
    from memfit.llm.models.tokenizer import Tokenizer

    return Tokenizer.from_dir(resolve_model_path(os.environ["MEMFIT_SCHEMA_MODEL"]))


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _prompts_and_max_tokens(path: str, body: dict[str, Any]) -> tuple[list[list[int]], int | None]:
    tok = _tokenizer()
    if path.endswith("/chat/completions"):
        messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": _text(m.get("content"))}
                    for m in body["messages"]]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        return [tok.encode(text, add_special_tokens=False)], body.get("max_completion_tokens") or body.get("max_tokens")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [tok.encode(prompt)]
    elif prompt and isinstance(prompt[0], str):
        prompts = [tok.encode(p) for p in prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    return prompts, body.get("max_tokens", 16)  # 16: OpenAI's default for completions


def exceeds_queue(path: str, body: dict[str, Any], max_waiting: int) -> bool:
    """True when the request asks for more completions (prompts x n) than the waiting queue holds."""
    prompt = body.get("prompt")
    many = (not path.endswith("/chat/completions") and isinstance(prompt, list) and prompt
            and not isinstance(prompt[0], int))
    return (len(prompt) if many else 1) * int(body.get("n") or 1) > max_waiting


def exceeds_context(path: str, body: dict[str, Any], max_model_len: int) -> bool:
    """True when some prompt of `body` leaves no room, or no room for max_tokens, in the context."""
    prompts, max_tokens = _prompts_and_max_tokens(path, body)
    return any(len(ids) >= max_model_len or (max_tokens is not None and len(ids) + max_tokens > max_model_len)
               for ids in prompts)


@schemathesis.check
def positive_data_acceptance_in_context(ctx, response, case) -> bool | None:
    try:
        return positive_data_acceptance(ctx, response, case)
    except AssertionError:  # schemathesis' check failures are AssertionErrors
        if response.status_code == 400 and isinstance(case.body, dict):
            try:
                code = json.loads(response.content)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = None
            limit = int(os.environ["MEMFIT_SCHEMA_MAX_MODEL_LEN"])
            if code == "context_length_exceeded" and exceeds_context(case.path, case.body, limit):
                return None
            waiting = int(os.environ["MEMFIT_SCHEMA_MAX_WAITING"])
            if code == "too_many_completions" and exceeds_queue(case.path, case.body, waiting):
                return None
        raise
