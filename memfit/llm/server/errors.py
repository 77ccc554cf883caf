"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}` with the matching status.

Every failure the server can answer goes through `APIError`, and the exception handlers installed by
`install_error_handlers` turn FastAPI's own failures (body validation, unknown route, wrong method, and any
bug) into the same shape, so a client only ever has to parse one kind of error.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from memfit.llm.engine.errors import EMPTY_MESSAGES
from memfit.llm.server.protocol import MAX_PROMPTS

log = logging.getLogger("memfit.server")

# OpenAI's error types by status (the `type` field); `code` is more specific and optional.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


class _AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped. An error message may echo what the client sent, and a lone
    surrogate ("\\ud800" in the request's JSON) cannot be encoded as UTF-8: Starlette's JSONResponse would fail
    on it while answering, and the client would get a 500 instead of the 4xx."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error the server answers with `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})  # e.g. `Allow` on a 405 (RFC 9110 requires it)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer", **self.headers} if self.status == 401 else self.headers
        return _AsciiJSONResponse(self.body(), status_code=self.status, headers=headers or None)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_BODY_PARSE_FAILED = "There was an error parsing the body"  # fastapi.routing's detail for a body it could not read

_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "is-instance", "function-after", "function-plain"}
# Fields that accept several shapes: say which, instead of pydantic's message about the first shape tried.
_UNION_HINTS = {
    "prompt": f"a non-empty string, list of token ids, or list (at most {MAX_PROMPTS}) of strings or of token-id lists",
    "stop": "a string or a list of at most 16 strings",
    "content": "a string or a list of content parts ({'type': 'text', 'text': ...})",
}


def _is_union_tag(part: object) -> bool:
    """pydantic names the union member it tried ('str', 'list[int]', 'TextPart'); our fields are snake_case."""
    s = str(part)
    return s in _TYPE_NAMES or any(ch in s for ch in "[]-,") or s[:1].isupper()


def _loc_to_param(loc: tuple | list) -> tuple[str | None, bool]:
    """('body', 'messages', 0, 'content') -> 'messages[0].content' (OpenAI's way of naming a field), and
    whether a union member's tag was on the way."""
    out, tagged = "", False
    for p in loc:
        if p == "body" and not out:
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_union_tag(p):
            tagged = True
            break  # past the tag pydantic describes the member it tried, not what the user must send
        else:
            out += f".{p}" if out else str(p)
    return out or None, tagged


def _is_json(content_type: str | None) -> bool:
    """FastAPI parses a body as JSON only under a JSON media type (application/json, application/*+json)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def validation_error(exc: RequestValidationError, content_type: str | None = "application/json") -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("the request body is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                           code="invalid_json")
    bad_text = next((e for e in errors if e.get("type") == "string_unicode"), None)
    if bad_text is not None:  # a lone surrogate ("\\ud800" in the JSON): say so, not which union member failed
        param, _ = _loc_to_param(bad_text.get("loc", ()))
        return bad_request(f"invalid value for '{param}': the text is not valid Unicode (it holds a lone surrogate "
                           "such as \\ud800, which no UTF-8 text can)", param=param, code="invalid_value")
    param, tagged = _loc_to_param(first.get("loc", ()))
    if param == "messages" and first.get("type") == "too_short":  # the words LLM.chat([]) uses too
        return bad_request(EMPTY_MESSAGES, param="messages", code="invalid_value")
    if param is None and not _is_json(content_type):
        # the body was not read as JSON at all (plain `curl -d` sends application/x-www-form-urlencoded)
        return bad_request(f"send the request body as JSON with the header 'Content-Type: application/json' (got "
                           f"{content_type!r})" if content_type else "send the request body as JSON with the header "
                           "'Content-Type: application/json' (the request had no Content-Type)",
                           code="invalid_request_body")
    if param is None:
        return bad_request("the request body must be a JSON object", code="invalid_request_body")
    leaf = param.rsplit(".", 1)[-1].split("[", 1)[0]
    if tagged and leaf in _UNION_HINTS:
        msg = f"must be {_UNION_HINTS[leaf]}"
    else:
        msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 and not tagged else ""
    return bad_request(f"invalid value for '{param}': {msg}{more}", param=param, code="invalid_value")


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")  # RFC 9110's methods, CONNECT aside


def allowed_methods(request: Request) -> list[str]:
    """Every method that some route of the app answers on the request's path, for `Allow` on a 405: GET and HEAD
    on /health, whose HEAD is a route of its own, where Starlette's 405 names only the route it tried first. Each
    method is put to the routes as the router would (a route matches FULL when it takes the path and the method;
    FastAPI's included routers answer for their own routes), so nothing depends on how routes are stored."""
    allowed = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] is Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI, on_error: Callable[[int], None] | None = None) -> None:
    """Install the handlers; `on_error(status)` is called for every error answered (for metrics)."""

    def answer(err: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(err.status)
        return err.response()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI answers 400 for every malformed request.
        return answer(validation_error(exc, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = ("unknown URL; this server offers GET /v1/models, POST /v1/completions, POST /v1/chat/completions, "
                       "PATCH /v1/requests/{id}, GET /health, /metrics, /docs and /openapi.json")
        elif status == 405:
            headers = dict(exc.headers or {})
            methods = allowed_methods(request)
            if methods:  # Starlette's Allow names only the first route on the path, and HEAD has routes of its own
                headers = {k: v for k, v in headers.items() if k.lower() != "allow"} | {"Allow": ", ".join(methods)}
            allowed = next((v for k, v in headers.items() if k.lower() == "allow"), "")
            message = f"method {request.method} is not allowed on {request.url.path}; use {allowed or 'another method'}"
            return answer(APIError(status, message, headers=headers))
        elif status == 400 and exc.detail == _BODY_PARSE_FAILED:
            # FastAPI's words when reading the body as JSON raised something other than a JSON syntax error
            return answer(bad_request(
                "the request body could not be read as JSON: it must be UTF-8 (the charset of its Content-Type "
                "too), nested less than about a thousand levels deep, and hold no number thousands of digits long",
                code="invalid_json"))
        else:
            message = str(exc.detail)
        # Starlette's own headers stay: the 405 it raises carries `Allow`, listing the route's methods.
        return answer(APIError(status, message, code="request_too_large" if status == 413 else None,
                               headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: log it with its traceback and keep serving everyone else.
        log.exception("unhandled error while serving a request")
        return answer(APIError(500, f"internal server error: {type(exc).__name__}: {exc}"))
