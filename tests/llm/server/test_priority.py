"""Priorities over HTTP: a `priority` field in completions and chat bodies, PATCH /v1/requests/{id} while a request
runs (effective at the next step), and clear 400/404 answers for bad priorities and unknown ids."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from memfit.llm.server.app import ServerSettings
from tests.llm.server.live import LiveServer


@pytest.fixture(scope="module")
def server(model_dir):
    def load():
        import torch

        from memfit.llm.engine import EngineConfig, LLMEngine

        torch.set_num_threads(1)
        # One sequence at a time: whichever request the policy ranks first holds the batch.
        engine = LLMEngine(EngineConfig(model=str(model_dir), kv_budget="64MiB", dtype="float32",
                                        scheduling_policy="priority", max_num_seqs=1))
        step = engine.step

        def slow_step():  # a long request then outlasts the few HTTP calls this test makes while it runs
            time.sleep(0.02)
            return step()

        engine.step = slow_step
        return engine

    with LiveServer(model_dir, ServerSettings(model_name="tiny"), factory=load) as live:
        yield live


def body(max_tokens: int, priority: int | None = None, **extra) -> dict:
    b = {"model": "tiny", "prompt": [5, 17, 33, 80, 9], "max_tokens": max_tokens, "temperature": 0,
         "ignore_eos": True, **extra}
    if priority is not None:
        b["priority"] = priority
    return b


def test_patch_lowers_a_running_request_below_a_queued_one(server):
    finished: list[str] = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body(240, priority=0, stream=True)) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            long_id = json.loads(first[len("data: "):])["id"]

            def short() -> None:
                r = httpx.post(server.url + "/v1/completions", json=body(3, priority=1), timeout=120)
                assert r.status_code == 200
                finished.append("short")

            t = threading.Thread(target=short)
            t.start()
            server.wait_metric("memfit_requests_waiting", lambda v: v >= 1)  # queued behind the long one
            r = http.patch(f"/v1/requests/{long_id}", json={"priority": 5})
            assert r.status_code == 200, r.text
            assert r.json() == {"id": long_id, "object": "request.priority", "priority": 5, "num_requests": 1}
            for _ in lines:  # read the long stream to its end
                pass
            finished.append("long")
            t.join(120)
    assert finished == ["short", "long"]  # the short one preempted the long one once it was ranked below it


def test_a_queued_stream_names_its_id_in_the_headers_before_any_token(server):
    """X-Request-Id arrives with the headers, so a request still waiting behind another can be re-prioritised
    before it has produced a token (the id is otherwise in the first chunk only)."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body(240, priority=0, stream=True)) as long_stream:
            long_lines = long_stream.iter_lines()
            next(line for line in long_lines if line.startswith("data: "))  # running: it holds the one slot
            with http.stream("POST", "/v1/completions", json=body(3, priority=9, stream=True)) as queued:
                rid = queued.headers["x-request-id"]
                assert rid.startswith("cmpl-")
                server.wait_metric("memfit_requests_waiting", lambda v: v >= 1)  # no token of it yet
                r = http.patch(f"/v1/requests/{rid}", json={"priority": -1})
                assert r.status_code == 200 and r.json()["num_requests"] == 1, r.text
                first = next(line for line in queued.iter_lines() if line.startswith("data: "))
                assert json.loads(first[len("data: "):])["id"] == rid  # the same id as the body's
            for _ in long_lines:
                pass
        r = http.post("/v1/completions", json=body(2))
        assert r.headers["x-request-id"] == r.json()["id"]


def test_patch_needs_the_kind_of_the_response_id_to_match(server):
    # chatcmpl-<hex of a completion> used to re-prioritise the completion: the engine ids carried the hex alone.
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body(240, priority=0, stream=True)) as stream:
            lines = stream.iter_lines()
            rid = stream.headers["x-request-id"]
            next(line for line in lines if line.startswith("data: "))  # running
            other = "chatcmpl-" + rid.removeprefix("cmpl-")
            r = http.patch(f"/v1/requests/{other}", json={"priority": 5})
            assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found", r.text
            assert http.patch(f"/v1/requests/{rid}", json={"priority": 5}).json()["num_requests"] == 1
            for _ in lines:
                pass


def test_priority_field_is_validated(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/completions", json=body(2, priority=-7)).status_code == 200  # negative: more urgent
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": 3}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        for bad in ("high", 1.5, True, None):
            r = http.post("/v1/completions", json={**body(2), "priority": bad} if bad is not None else
                          {**body(2), "priority": [1]})
            assert r.status_code == 400, (bad, r.text)
            assert "priority" in r.text


def test_patch_refuses_unknown_ids_and_bad_bodies(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.patch("/v1/requests/cmpl-0123abcd", json={"priority": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
        assert http.patch("/v1/requests/nonsense", json={"priority": 1}).status_code == 404
        done = http.post("/v1/completions", json=body(2)).json()["id"]
        assert http.patch(f"/v1/requests/{done}", json={"priority": 1}).status_code == 404  # finished
        for bad in ({"priority": "1"}, {"priority": 2.5}, {}, {"priority": 1, "other": 2}):
            assert http.patch("/v1/requests/cmpl-0123abcd", json=bad).status_code == 400, bad
        assert http.get("/health").status_code == 200  # still serving


def test_metrics_count_swaps_and_preemptions_by_mode(model_dir):
    """A server that swaps under a tight KV budget: /metrics' preemption count (the scheduler's) and its swap
    histogram (the swap tier's own timings, one per swap-out and per swap-in) agree, and every byte came back."""
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # K+V x layers x kv heads x head_dim x fp32 (make_tiny_model_dir's llama)
    with LiveServer(model_dir, ServerSettings(model_name="tiny"), kv_budget=bytes_per_token * 150, kv_eager_pages=0,
                    kv_prefault=False, preemption_mode="swap", swap_space="8MiB", kv_cache="paged") as live:
        def one(i: int) -> None:
            r = httpx.post(live.url + "/v1/completions", json={**body(60), "prompt": list(range(3 + i, 30 + i))},
                           timeout=120)
            assert r.status_code == 200, r.text

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        m = live.metrics()
    swaps = m['memfit_preemptions_total{mode="swap"}']
    assert swaps > 0 and m['memfit_preemptions_total{mode="recompute"}'] == 0
    # Out and back in, each timed once; a swap-out that finds all its tokens in the kept host copy (cross-turn
    # reuse) copies nothing and is not timed, so every byte came back and some may not have gone out again.
    assert swaps < m["memfit_swap_seconds_count"] <= 2 * swaps
    assert 0 < m['memfit_swap_out_bytes_total{tier="host"}'] <= m['memfit_swap_in_bytes_total{tier="host"}']
    assert m['memfit_swap_out_ops_total{tier="host"}'] >= swaps
    assert m['memfit_tier_resident_bytes{tier="host"}'] == 0
