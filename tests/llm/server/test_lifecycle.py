"""Loading (503 until ready), load failure, graceful shutdown on SIGTERM, and the `memfit serve` CLI."""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import threading

import httpx
import pytest

from memfit.llm.server.app import ServerSettings
from tests.llm.server.live import LiveServer, ServerProcess, parse_sse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_503_while_loading_then_ready(model_dir):
    gate = threading.Event()

    def slow_load():
        from memfit.llm.engine import EngineConfig, LLMEngine

        gate.wait(30)
        return LLMEngine(EngineConfig(model=str(model_dir), kv_budget="64MiB"))

    with LiveServer(model_dir, ServerSettings(model_name="tiny"), factory=slow_load).start(wait_loaded=False) as live:
        r = httpx.get(live.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.headers.get("retry-after") == "1"
        assert live.metrics()["memfit_up"] == 0
        gate.set()
        assert live.engine.wait_loaded(30)
        assert httpx.get(live.url + "/health").status_code == 200
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        assert live.metrics()["memfit_up"] == 1


def test_a_failed_load_answers_503_with_the_reason(tmp_path, model_dir):
    def broken():
        raise ValueError("config.json is not valid JSON")

    with LiveServer(model_dir, ServerSettings(model_name="tiny"), factory=broken).start(wait_loaded=False) as live:
        assert not live.engine.wait_loaded(30)
        r = httpx.get(live.url + "/health")
        assert r.status_code == 503 and "not valid JSON" in r.json()["message"]
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "not valid JSON" in r.json()["error"]["message"]


def test_sigterm_lets_in_flight_streams_finish_then_exits(model_dir):
    with ServerProcess(["--model", str(model_dir), "--kv-budget", "64MiB", "--threads", "1", "--shutdown-timeout", "20",
                        "--log-level", "warning"], cwd=ROOT) as server:
        proc, url = server.proc, server.url
        body = {"prompt": [5, 6, 7], "max_tokens": 120, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            chunks = r.iter_raw()
            raw = next(chunks)
            proc.send_signal(signal.SIGTERM)  # mid-stream
            raw += b"".join(chunks)
        events = parse_sse(raw.decode())
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 120  # finished, not cut
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)


def _serve_args(argv: list[str]) -> argparse.Namespace:
    from memfit.llm.cli import serve as cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    return parser.parse_args(["serve", *argv])


def test_cli_defaults_and_clear_errors(tmp_path, capsys):
    args = _serve_args([])
    assert (args.host, args.port, args.model, args.api_key is None or isinstance(args.api_key, str)) == (
        "127.0.0.1", 8000, "memfit-tiny", True)
    assert args.func(_serve_args(["--model", str(tmp_path / "missing")])) == 2
    assert "not found" in capsys.readouterr().err
    assert args.func(_serve_args(["--port", "70000"])) == 2
    assert "--port" in capsys.readouterr().err
    assert args.func(_serve_args(["--max-body-size", "lots"])) == 2
    capsys.readouterr()


def test_cli_reports_a_busy_port(model_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        args = _serve_args(["--model", str(model_dir), "--port", str(port)])
        assert args.func(args) == 2
    assert re.search(r"cannot listen on 127\.0\.0\.1:\d+", capsys.readouterr().err)


def test_engine_stop_aborts_what_outlives_the_drain_deadline(model_dir):
    with LiveServer(model_dir, ServerSettings(model_name="tiny")) as live:
        body = {"prompt": [5, 6, 7], "max_tokens": 240, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
            chunks = r.iter_raw()
            raw = next(chunks)
            live.engine.stop(drain_timeout=0.0)
            raw += b"".join(chunks)
        events = parse_sse(raw.decode())
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "not_ready" and "shutting down" in events[-2]["error"]["message"]
        assert live.engine.state == "stopped" and live.engine.stats["tokens_held"] == 0
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503
