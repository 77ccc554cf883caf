"""OpenAI-compatible HTTP server on the memfit engine (`memfit serve`).

    app.py           FastAPI app factory: routes, API-key auth, body-size limit, lifespan
    async_engine.py  the one engine thread that batches every client; per-request asyncio queues; it calls
                     the engine only through memfit.llm.engine.protocol.EngineClient
    serving.py       request -> engine requests -> response JSON / SSE stream (OpenAI's order)
    responses.py     engine outputs -> response bodies, the SSE stream, engine errors -> HTTP errors
    protocol.py      request bodies (pydantic, strict), OpenAI's field names and ranges
    openapi.py       the OpenAPI contract: statuses, response models, the loaded model's limits
    errors.py        OpenAI's error JSON and status codes
    metrics.py       Prometheus text format: engine gauges, TTFT / inter-token latency histograms

The command, `memfit serve`, is memfit/llm/cli/serve.py.

Importing this package is cheap; FastAPI and torch load only when `create_app` / `AsyncEngine` are used.
"""
from __future__ import annotations

from typing import Any

__all__ = ["AsyncEngine", "ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "AsyncEngine":
        from memfit.llm.server.async_engine import AsyncEngine

        return AsyncEngine
    if name in ("ServerSettings", "create_app"):
        from memfit.llm.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'memfit.llm.server' has no attribute {name!r}")
