"""OpenAI-compatible HTTP server on the memfit engine (`memfit serve`).

    app.py           FastAPI app factory: routes, API-key auth, body-size limit, lifespan
    async_engine.py  the one engine thread that batches every client; per-request asyncio queues
    serving.py       request -> engine requests -> response JSON / SSE stream (OpenAI's order)
    protocol.py      request bodies (pydantic, strict), OpenAI's field names and ranges
    errors.py        OpenAI's error JSON and status codes
    metrics.py       Prometheus text format: engine gauges, TTFT / inter-token latency histograms
    cli.py           `memfit serve`

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
