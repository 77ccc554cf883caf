"""The FastAPI application: routes, API-key auth, the request-body limit, and the engine's lifespan.

    app = create_app(AsyncEngine(lambda: LLMEngine(config)), ServerSettings(model_name="memfit-tiny"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The engine thread starts when the app starts (uvicorn's lifespan startup) and loads the model there, so the
server answers at once: `/health`, `/v1/completions` and `/v1/chat/completions` say 503 until the model
is ready. On shutdown uvicorn first lets in-flight responses finish (its graceful timeout), then the
lifespan stops the engine, aborting whatever is left.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from memfit.llm.server.async_engine import AsyncEngine
from memfit.llm.server.errors import APIError, install_error_handlers
from memfit.llm.server.metrics import CONTENT_TYPE
from memfit.llm.server.openapi import (METRICS_RESPONSES, ChatCompletion, Completion, Health, ModelCard, ModelList,
                                       PriorityUpdated, install_openapi, responses)
from memfit.llm.server.protocol import ChatCompletionRequest, CompletionRequest, PriorityUpdate
from memfit.llm.server.serving import OpenAIServing


@dataclass
class ServerSettings:
    model_name: str = "memfit-tiny"
    aliases: tuple[str, ...] = ()  # other names accepted in the `model` field (e.g. the model path)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 0.0  # at lifespan shutdown: let engine requests still running finish this long


class BodySizeLimit:
    """ASGI middleware: a body over `limit` bytes gets 413, from Content-Length before reading anything,
    or as soon as a chunked body passes the limit."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False  # h11/httptools already refuse malformed lengths
                if too_big:
                    await _send_error(send, APIError(413, self._message(), code="request_too_large"))
                    return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPException from body reading; the error handler shapes it.
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.limit} bytes"


async def _send_error(send, err: APIError) -> None:
    resp = err.response()
    await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


def create_app(engine: AsyncEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    serving = OpenAIServing(engine, settings.model_name, settings.aliases)
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop, settings.drain_timeout)

    # redirect_slashes off: /v1/completions/ is not a route, answered 404 in OpenAI's error shape rather than
    # with a bodiless 307 redirect
    app = FastAPI(title="memfit OpenAI-compatible server", version="1", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None, redirect_slashes=False)
    app.state.engine, app.state.serving, app.state.settings = engine, serving, settings
    install_error_handlers(app, on_error=lambda status: metrics.http_errors.inc(status=str(status)))
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def answer_head_too(router: APIRouter | FastAPI, path: str, endpoint) -> None:
        """HEAD on `path` runs the GET endpoint (the same checks, status and headers; uvicorn sends no body), for
        uptime monitors and load balancers that probe with HEAD. A route of its own, out of the OpenAPI schema (which
        lists only GET); a 405 from another method says `Allow: GET, HEAD`, the methods the path answers
        (errors.allowed_methods)."""
        router.add_api_route(path, endpoint, methods=["HEAD"], response_model=None, include_in_schema=False)

    auth = (401,) if settings.api_key is not None else ()
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models", response_model=None, responses=responses(ModelList, *auth, 500))
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [serving.model_card()]})

    @v1.get("/models/{model_id:path}", response_model=None, responses=responses(ModelCard, *auth, 404, 500))
    async def get_model(model_id: str) -> JSONResponse:
        serving.check_model(model_id)
        return JSONResponse(serving.model_card())

    answer_head_too(v1, "/models", list_models)
    answer_head_too(v1, "/models/{model_id:path}", get_model)

    generation = (400, *auth, 404, 413, 429, 500, 503)

    @v1.post("/completions", response_model=None, responses=responses(Completion, *generation, stream=True))
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request, time.monotonic())

    @v1.post("/chat/completions", response_model=None, responses=responses(ChatCompletion, *generation, stream=True))
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request, time.monotonic())

    @v1.patch("/requests/{request_id}", response_model=None,
              responses=responses(PriorityUpdated, 400, *auth, 404, 500, 503))
    async def update_request(request_id: str, body: PriorityUpdate) -> JSONResponse:
        """Change a running or queued request's priority (`id` = the response's id); effective at the next step."""
        return JSONResponse(await serving.set_priority(request_id, body.priority))

    app.include_router(v1)

    health_responses = {200: {"model": Health, "description": "The model is loaded: `{\"status\": \"ok\"}`"},
                        503: {"model": Health, "description": "Loading, failed to load (the message says why), "
                                                              "or shutting down."},
                        **responses(None, 500)}

    @app.get("/health", response_model=None, responses=health_responses)
    async def health() -> JSONResponse:
        if engine.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": engine.state, "message": engine.not_ready_message()}, status_code=503)

    answer_head_too(app, "/health", health)

    @app.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def prometheus() -> Response:
        return Response(metrics.render(engine.stats, engine.state), media_type=CONTENT_TYPE)

    def model_limits() -> tuple[int, int] | None:
        info = engine.model_info
        return (info.max_model_len, info.vocab_size) if info is not None and engine.ready else None

    install_openapi(app, api_key_set=settings.api_key is not None, model_limits=model_limits)
    return app
