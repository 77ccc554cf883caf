"""A real memfit server on a free loopback port, run by uvicorn in a background thread (tests only)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import uvicorn

from memfit.llm.cli.serve import _bind
from memfit.llm.server.app import ServerSettings, create_app
from memfit.llm.server.async_engine import AsyncEngine

API_KEY = "sk-memfit-test"


class LiveServer:
    def __init__(self, model_dir: Path | str, settings: ServerSettings | None = None,
                 factory: Callable[[], Any] | None = None, **engine_options: Any) -> None:
        def load():
            import torch

            from memfit.llm.engine import EngineConfig, LLMEngine

            torch.set_num_threads(1)
            opts = {"kv_budget": "64MiB", "dtype": "float32", **engine_options}
            return LLMEngine(EngineConfig(model=str(model_dir), **opts))

        self.engine = AsyncEngine(factory or load)
        self.settings = settings or ServerSettings(model_name="tiny")
        self.app = create_app(self.engine, self.settings)
        self._sock = _bind("127.0.0.1", 0)  # memfit serve's own socket (IPPROTO_TCP, so TCP_NODELAY as served)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, wait_loaded: bool = True) -> "LiveServer":
        if self._thread.ident is not None:
            return self  # already started (e.g. `with LiveServer(...).start(wait_loaded=False) as live`)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        if wait_loaded and not self.engine.wait_loaded(60):
            raise RuntimeError(f"the test model did not load: {self.engine.load_error}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def metrics(self) -> dict[str, float]:
        from memfit.llm.server.metrics import parse_metrics

        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def wait_metric(self, name: str, predicate: Callable[[float], bool], timeout: float = 10.0) -> float:
        """Poll /metrics until `predicate(value)` holds (a deadline for an event, not a speed check)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics()[name]
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.02)


def parse_sse(raw: str) -> list[Any]:
    """SSE body -> list of decoded `data:` payloads ('[DONE]' kept as the string)."""
    import json

    events = []
    assert raw.endswith("\n\n"), "an SSE stream ends with a blank line"
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), f"unexpected SSE block {block!r}"
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def slow_engine_factory(model_dir: Path | str, delay: float = 0.01, peaks: dict[str, float] | None = None,
                        **engine_options: Any) -> Callable[[], Any]:
    """An engine whose every step takes at least `delay` seconds longer, so a test can act while a request
    is certainly still running (disconnects, 429) however fast the machine is. With `peaks`, the engine
    thread records there the largest value of each `stats()` entry seen around every step (through the
    EngineClient call), and for the virtual cache the KV bytes the kernel holds (its page map)."""

    def load():
        import torch

        from memfit.llm.engine import EngineConfig, LLMEngine

        class SlowEngine(LLMEngine):
            def step(self):
                time.sleep(delay)
                self._record()
                try:
                    return super().step()
                finally:
                    self._record()

            def _record(self) -> None:
                if peaks is not None:
                    for key, value in self.stats().items():
                        if isinstance(value, (int, float)):  # the figures, not the breakdowns (dicts)
                            peaks[key] = max(peaks.get(key, value), value)
                    if self.config.kv_cache == "virtual":  # what the kernel holds, outside memfit's ledger
                        from tests.llm.kv.kernel_pages import arena_resident_bytes

                        held = arena_resident_bytes(self.kv)
                        peaks["kv_kernel_resident_bytes"] = max(peaks.get("kv_kernel_resident_bytes", 0), held)

        torch.set_num_threads(1)
        opts = {"kv_budget": "64MiB", "dtype": "float32", **engine_options}
        return SlowEngine(EngineConfig(model=str(model_dir), **opts))

    return load


class ServerProcess:
    """`python -m memfit.llm.server ARGS` in its own process on a free loopback port, ready (GET /health is 200)
    when the `with` block starts; terminated (then killed) when it ends."""

    def __init__(self, args: list[str], cwd: str | Path | None = None, ready_timeout: float = 120) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if cwd is not None:
            env["PYTHONPATH"] = str(cwd)
        self.proc = subprocess.Popen([sys.executable, "-m", "memfit.llm.server", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        self._ready_timeout = ready_timeout

    def __enter__(self) -> "ServerProcess":
        deadline = time.monotonic() + self._ready_timeout
        try:
            while True:
                assert self.proc.poll() is None, self.proc.stdout.read()  # type: ignore[union-attr]
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not become ready"
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
