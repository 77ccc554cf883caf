"""`memfit serve`: the OpenAI-compatible HTTP server (also `python -m memfit.llm.server`).

Registration stays cheap: FastAPI, uvicorn and torch are imported inside `cmd_serve`.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

from memfit.errors import guard
from memfit.llm.engine.config import add_engine_args


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on; 0 picks a free one (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("MEMFIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MEMFIT_API_KEY, else no auth)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the bundled name, or the model directory's name)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to wait for admission; beyond it the server answers 429 (default: 256)")
    g.add_argument("--max-body-size", default="4MiB", help="largest request body; larger gets 413 (default: 4MiB)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are aborted")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's and uvicorn's log level; debug also logs every request (default info)")


def engine_config(args):
    from memfit.llm.cli.common import engine_config

    return engine_config(args)  # --max-waiting is an engine field too: the queue limit behind 429


def served_name(model: str) -> str:
    from memfit.llm.models.loader import BUNDLED_MODELS

    return model if model in BUNDLED_MODELS else os.path.basename(os.path.normpath(model))


def _check_args(args) -> None:
    import math

    from memfit.llm.cli.common import check_timeline
    from memfit.memory.budget import parse_bytes

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_waiting < 1:  # 0 would answer every request 429, which no retry can get past
        raise ValueError(f"--max-waiting must be >= 1 (requests allowed to wait for admission), got {args.max_waiting}")
    if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:  # nan passed `< 0`; inf overflowed int()
        raise ValueError(f"--shutdown-timeout must be a finite number of seconds >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty; give a key or leave the option out")
    check_timeline(args)  # before the model loads, as the other engine commands check it
    args.max_body_bytes = parse_bytes(args.max_body_size)
    if args.max_body_bytes < 1024:
        raise ValueError(f"--max-body-size must be at least 1KiB, got {args.max_body_size}")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server listens beyond this machine with no API key: anyone who can reach the port can
    use the model. None on a loopback address or with a key."""
    import ipaddress

    if api_key:
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a name: only localhost is known to stay on this machine
        if host == "localhost":
            return None
    return (f"memfit serve: warning: listening on {host} without an API key: anyone who can reach this port can "
            f"use the model; set --api-key (or $MEMFIT_API_KEY), or bind 127.0.0.1")


def _bind(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound to `host` (an address, `[v6 address]` as in a URL, or a name) and
    `port`; the address family is the resolver's first answer, so `::1`, `[::1]` and a name that has only an IPv6
    address are bound as IPv6 (IPV6_V6ONLY left at the OS's default). Every failure (a name that does not resolve,
    a family this host lacks, a port in use) is the ValueError `cannot listen on HOST:PORT: why; pick another
    --port or --host`."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    sock = None
    try:
        # AI_PASSIVE: no host ("") is the wildcard address, as bind(("", port)) took it
        family, _, _, _, address = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM,
                                                      proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
        # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on connections whose socket says it is TCP
        # (base_events._set_nodelay checks sock.proto), and uvicorn writes a response's head and body apart. With
        # proto 0 Nagle held each body back for the client's delayed ACK: every keep-alive request after a
        # connection's first waited ~40 ms (/health 44 ms against 1 ms; benchmarks/serve_keepalive.py).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except (OSError, ValueError) as exc:  # gaierror is an OSError; a name idna cannot encode ("a..b") a ValueError
        if sock is not None:
            sock.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        where = host if host.startswith("[") or ":" not in host else f"[{host}]"  # [::1]:8000, as in a URL
        raise ValueError(f"cannot listen on {where}:{port}: {why}; pick another --port or --host") from exc
    sock.set_inheritable(True)
    return sock


def cmd_serve(args) -> int:
    _check_args(args)
    from memfit.llm.models.loader import resolve_model_path

    model_path = resolve_model_path(args.model)  # a wrong --model fails now, with the loader's message
    import uvicorn

    from memfit.llm.engine.llm_engine import LLMEngine
    from memfit.llm.server.app import ServerSettings, create_app
    from memfit.llm.server.async_engine import AsyncEngine

    config = engine_config(args)

    def load() -> LLMEngine:
        return LLMEngine(config)

    engine = AsyncEngine(load)
    name = args.served_model_name or served_name(args.model)
    settings = ServerSettings(model_name=name, aliases=(args.model, str(model_path)), api_key=args.api_key,
                              max_body_bytes=args.max_body_bytes, drain_timeout=0.0)
    app = create_app(engine, settings)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=args.log_level, timeout_graceful_shutdown=max(1, int(round(args.shutdown_timeout))),
        access_log=args.log_level == "debug",
    ))

    def watch_load() -> None:
        if not engine.wait_loaded():
            server.should_exit = True  # /health said 503 meanwhile; now stop with the loader's message
        else:
            print(f"memfit serve: {name} ready on http://{args.host}:{port}/v1 "
                  f"(kv-cache {config.kv_cache}, budget {engine.stats.get('kv_budget_bytes', 0)} B)", file=sys.stderr)

    threading.Thread(target=watch_load, name="memfit-load-watch", daemon=True).start()
    logging.getLogger("memfit.server").setLevel(args.log_level.upper())
    print(f"memfit serve: loading {args.model} on http://{args.host}:{port} (503 until ready)", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal into the handler it found;
    # a no-op handler there makes a graceful shutdown exit 0 instead of dying by the signal.
    stopped_by: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stopped_by.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by:
        print(f"memfit serve: stopped by {signal.Signals(stopped_by[0]).name}", file=sys.stderr)
    if engine.load_error is not None:
        err = engine.load_error
        raise err if isinstance(err, Exception) else RuntimeError(str(err))
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions, "
                                   "/health, /metrics. One engine loop batches all clients.")
    add_engine_args(p)
    add_server_args(p)
    p.set_defaults(func=guard(cmd_serve), command="serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memfit")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
