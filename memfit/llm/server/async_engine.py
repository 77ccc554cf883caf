"""One engine thread serving every client: the bridge between asyncio handlers and `LLMEngine`.

`LLMEngine` is not thread-safe, so exactly one thread (`memfit-engine`) loads it and is the only caller of
`add_request`, `step` and `abort_request`. Handlers on the event loop hand it work through a command
queue and get their outputs back on a per-HTTP-request `asyncio.Queue`:

    handler --(add / abort commands)--> engine thread: drain commands, step(), publish outputs
    handler <--(RequestOutput | error, via loop.call_soon_threadsafe, once per step)-- engine thread

The thread steps while any request is unfinished and sleeps on an event when idle, so continuous
batching happens naturally: whatever arrived during a step joins the next one. Commands are drained before
every step, so an abort frees the request's KV before the next step runs. After every step the thread
publishes a stats snapshot (a fresh dict, swapped atomically) for `/metrics`, and records TTFT and
inter-token latency as it hands outputs over.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from memfit.llm.engine.params import SamplingParams
from memfit.llm.engine.protocol import EngineClient, ModelInfo
from memfit.llm.server.metrics import ServerMetrics

log = logging.getLogger("memfit.server")
# The calls the server makes (memfit.llm.engine.protocol.EngineClient); named in the error for a wrong engine.
_ENGINE_CLIENT_CALLS = ("model_info", "validate", "max_new_tokens", "add_request", "step", "has_unfinished_requests",
                        "abort", "set_priority", "maintain", "stats", "close")


class EngineNotReady(RuntimeError):
    """The model is still loading, failed to load, or the server is shutting down (HTTP 503)."""


class EngineFailure(RuntimeError):
    """The engine failed while running this request (HTTP 500); other requests keep being served."""


@dataclass
class RequestSpec:
    """One engine request: a prompt (token ids) and its sampling parameters."""

    prompt_token_ids: list[int]
    params: SamplingParams
    session_id: str | None = None
    auto_max_tokens: bool = False  # max_tokens was not given: use what the context and KV budget leave
    priority: int = 0  # lower = more urgent (the priority scheduling policy)
    user: str | None = None  # the vtc policy's unit of fairness


@dataclass
class _Tracked:
    """Engine-thread bookkeeping for one engine request."""

    request_id: str
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    num_tokens: int = 0
    last_token_time: float | None = None


@dataclass
class _Add:
    specs: list[RequestSpec]
    request_ids: list[str]
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class AsyncEngine:
    """Owns the engine thread. `engine_factory()` runs *on* that thread and returns an engine that implements
    `memfit.llm.engine.protocol.EngineClient` (an `LLMEngine`); only those calls are made on it."""

    def __init__(self, engine_factory: Callable[[], EngineClient], metrics: ServerMetrics | None = None) -> None:
        self._factory = engine_factory
        self.metrics = metrics or ServerMetrics()
        self.state = "created"  # created -> loading -> ready | failed; -> stopping -> stopped
        self.load_error: BaseException | None = None
        self.fatal_error: BaseException | None = None  # a step error after which the engine cannot serve
        self.stats: dict[str, Any] = {}
        self.engine: EngineClient | None = None  # call it only from the engine thread (model_info excepted)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._loaded = threading.Event()
        self._stop_deadline: float | None = None  # set by stop(): drain until then, then abort
        self._tracked: dict[str, _Tracked] = {}
        self._thread: threading.Thread | None = None

    # ---- lifecycle (any thread) --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self.state = "loading"
        self._thread = threading.Thread(target=self._run, name="memfit-engine", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading ended (successfully or not); True when the engine is ready."""
        self._loaded.wait(timeout)
        return self.state == "ready"

    def stop(self, drain_timeout: float = 0.0, join_timeout: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish for up to `drain_timeout` seconds, abort the
        rest (their handlers get EngineNotReady), close the engine and join its thread."""
        if self._thread is None:
            return
        if self.state in ("ready", "loading"):
            self.state = "stopping"
        self._stop_deadline = time.monotonic() + max(0.0, drain_timeout)
        self._wake.set()
        self._thread.join(max(0.0, drain_timeout) + join_timeout)
        if self._thread.is_alive():
            log.error("the engine thread did not stop in time")

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def model_info(self) -> ModelInfo | None:
        """The loaded model's `ModelInfo` (immutable: safe from any thread); None until the model is loaded."""
        return self.engine.model_info if self.engine is not None and self.state != "loading" else None

    # ---- requests (event loop) ---------------------------------------------------------------------
    async def add(self, specs: list[RequestSpec], request_ids: list[str], out: asyncio.Queue,
                  arrival: float | None = None) -> None:
        """Add engine requests as one all-or-nothing group; their outputs arrive on `out` as
        `(request_id, RequestOutput)` or `(request_id, exception)`. Raises what `add_request` raises
        (RequestError, InvalidSamplingParams, QueueFull, MemoryBudgetExceeded), or EngineNotReady."""
        if self.state != "ready":
            raise EngineNotReady(self.not_ready_message())
        cmd = _Add(specs, request_ids, out, asyncio.get_running_loop(), arrival or time.monotonic())
        self._commands.put(cmd)
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            # The engine thread ended between the state check and the put: nobody would answer.
            self._fail_pending_adds(EngineNotReady(self.not_ready_message()))
        await asyncio.wrap_future(cmd.future)

    def abort(self, request_ids: list[str]) -> None:
        """Thread-safe and non-blocking; unknown or finished ids are ignored."""
        if request_ids and self._thread is not None:
            self._commands.put(("abort", list(request_ids)))
            self._wake.set()

    async def set_priority(self, prefix: str, priority: int) -> int:
        """Set the priority of every unfinished engine request whose id starts with `prefix` (one HTTP request's
        choices); returns how many there were (0: unknown or finished). Effective at the next step."""
        if self.state != "ready":
            raise EngineNotReady(self.not_ready_message())
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("priority", prefix, priority, future))
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            raise EngineNotReady(self.not_ready_message())
        return await asyncio.wrap_future(future)

    def not_ready_message(self) -> str:
        if self.state == "loading":
            return "the model is still loading; retry in a few seconds"
        if self.state == "failed" and self.fatal_error is not None:
            return f"the engine cannot serve any more: {self.fatal_error}"
        if self.state == "failed":
            return f"the model failed to load: {self.load_error}"
        return "the server is shutting down"

    # ---- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._factory()
            if not isinstance(engine, EngineClient):  # checks the names only; the calls are typed
                missing = sorted(n for n in _ENGINE_CLIENT_CALLS if not hasattr(engine, n))
                raise TypeError(f"the engine factory returned a {type(engine).__name__}, which is not an "
                                f"EngineClient (missing: {', '.join(missing)}); see memfit/llm/engine/protocol.py")
            self.engine = engine
        except BaseException as exc:  # noqa: BLE001 - reported through /health and the CLI
            log.error("loading the model failed: %s", exc)
            self.load_error = exc
            self.state = "failed"
            self._loaded.set()
            self._fail_pending_adds(EngineNotReady(self.not_ready_message()))
            return
        if self._stop_deadline is None:
            self.state = "ready"
        self._publish_stats()
        self._loaded.set()
        try:
            while True:
                self._wake.clear()
                self._drain_commands()
                if self._stop_deadline is not None and (not self._tracked or time.monotonic() >= self._stop_deadline):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._wake.wait(timeout=1.0)
                    self._maintain()  # idle: give back KV pages idle past the watermark
                self._publish_stats()
        finally:
            self._shutdown_engine()

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._handle_add(cmd)
            elif cmd[0] == "priority":
                _, prefix, priority, future = cmd
                try:
                    ids = [rid for rid in self._tracked if rid.startswith(prefix)]
                    for rid in ids:
                        self.engine.set_priority(rid, priority)
                    future.set_result(len(ids))
                except BaseException as exc:  # noqa: BLE001 - answered to the caller
                    future.set_exception(exc)
            elif cmd[0] == "abort":
                for rid in cmd[1]:
                    if self._tracked.pop(rid, None) is not None:
                        self.engine.abort(rid)
                        self.metrics.requests.inc(finish_reason="abort")

    def _handle_add(self, cmd: _Add) -> None:
        added: list[str] = []
        try:
            for spec, rid in zip(cmd.specs, cmd.request_ids):
                params = spec.params
                if spec.auto_max_tokens:
                    params = dataclasses.replace(params, max_tokens=self.engine.max_new_tokens(len(spec.prompt_token_ids)))
                self.engine.add_request(prompt_token_ids=spec.prompt_token_ids, params=params, request_id=rid,
                                        session_id=spec.session_id, priority=spec.priority, user=spec.user)
                added.append(rid)
                self._tracked[rid] = _Tracked(rid, cmd.queue, cmd.loop, cmd.arrival)
        except BaseException as exc:  # noqa: BLE001 - the caller decides the status from the type
            for rid in added:
                self._tracked.pop(rid, None)
                self.engine.abort(rid)
            cmd.future.set_exception(exc)
            return
        for spec in cmd.specs:
            self.metrics.prompt_tokens.inc(len(spec.prompt_token_ids))
        cmd.future.set_result(None)

    def _step(self) -> None:
        from memfit.memory.budget import MemoryBudgetExceeded

        try:
            outputs = self.engine.step()
        except MemoryBudgetExceeded as exc:
            # A request cannot fit even alone (add_request checks this, so it is rare): the engine names it;
            # fail that request only, and keep serving the others.
            log.warning("request %s cannot be scheduled: %s", exc.request_id, exc)
            self._fail([exc.request_id] if exc.request_id else list(self._tracked), exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug: fail what is in flight, keep the server up
            log.exception("engine step failed; aborting the %d requests in flight", len(self._tracked))
            self._fail(list(self._tracked), EngineFailure(f"the engine failed: {type(exc).__name__}: {exc}"))
            if getattr(exc, "fatal", False):  # the engine cannot go on (a lost tensor-parallel rank): stop taking
                self.fatal_error = exc  # requests; /health says why (503)
                self.state = "failed"
            return
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for out in outputs:
            tr = self._tracked.get(out.request_id)
            if tr is None:
                continue  # aborted while the step ran
            n = len(out.outputs[0].token_ids)
            if n > tr.num_tokens:
                if tr.last_token_time is None:
                    self.metrics.ttft.observe(now - tr.arrival)
                else:
                    # One step samples one token per sequence; spread the gap if a step ever adds more.
                    gap = (now - tr.last_token_time) / (n - tr.num_tokens)
                    for _ in range(n - tr.num_tokens):
                        self.metrics.itl.observe(gap)
                tr.num_tokens, tr.last_token_time = n, now
            if out.finished:
                del self._tracked[out.request_id]
                self.metrics.e2e.observe(now - tr.arrival)
                self.metrics.requests.inc(finish_reason=out.outputs[0].finish_reason or "unknown")
            by_loop.setdefault(tr.loop, []).append((tr.queue, (out.request_id, out)))
        for loop, items in by_loop.items():
            _post(loop, items)

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for rid in request_ids:
            tr = self._tracked.pop(rid, None)
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - the engine may be in a bad state; the request is gone anyway
                log.exception("aborting %s failed", rid)
            if tr is not None:
                by_loop.setdefault(tr.loop, []).append((tr.queue, (rid, exc)))
        for loop, items in by_loop.items():
            _post(loop, items)

    def _fail_pending_adds(self, exc: BaseException) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add) and not cmd.future.done():
                cmd.future.set_exception(exc)

    def _maintain(self) -> None:
        try:
            self.engine.maintain()
        except Exception:  # noqa: BLE001 - housekeeping must never take the loop down
            log.exception("engine housekeeping failed")

    def _publish_stats(self) -> None:
        try:
            self.stats = dict(self.engine.stats())
        except Exception:  # noqa: BLE001 - metrics must never take the loop down
            log.exception("reading engine stats failed")

    def _shutdown_engine(self) -> None:
        self.state = "stopping"
        self._fail(list(self._tracked), EngineNotReady("the server is shutting down"))
        self._fail_pending_adds(EngineNotReady("the server is shutting down"))
        self._publish_stats()
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the engine failed")
        self.state = "stopped"


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]) -> None:
    """Hand a step's outputs to the event loop in one callback (not one per request)."""

    def deliver() -> None:
        for q, item in items:
            q.put_nowait(item)

    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:
        pass  # the loop is closed: the server is gone, nobody is listening
