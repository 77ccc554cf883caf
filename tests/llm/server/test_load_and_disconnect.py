"""Many clients at once under a tight KV budget, clients that go away mid-request, and the waiting limit."""
from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from memfit.llm.server.app import ServerSettings
from tests.llm.server.live import LiveServer, parse_sse, slow_engine_factory

PROMPTS = ["Hello world", "The quick brown fox", "memfit runs models", "A paged cache", "Grüße aus München",
           "def add(a, b):", "Hello memory", "naïve façade"]


@pytest.fixture(scope="module")
def tight(model_dir):
    # 96 KiB of KV: room for about two of these sequences at a time (4 KiB pages, 4 segments per sequence),
    # so most of the 32 clients must wait for memory. `live.peaks`: the largest engine stats seen.
    peaks: dict[str, float] = {}
    factory = slow_engine_factory(model_dir, delay=0.0, peaks=peaks, kv_budget="96KiB", max_waiting=64)
    with LiveServer(model_dir, ServerSettings(model_name="tiny"), factory=factory) as live:
        live.peaks = peaks
        yield live


@pytest.fixture(scope="module")
def slow(model_dir):
    """Steps take >= 10 ms, so 240 tokens take >= 2.4 s: a disconnect always lands mid-request."""
    with LiveServer(model_dir, ServerSettings(model_name="tiny"), factory=slow_engine_factory(model_dir)) as live:
        yield live


async def _stream_chat(client: httpx.AsyncClient, url: str, i: int) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" #{i}"}],
            "max_tokens": 8 + i % 5, "temperature": 0, "stream": True, "ignore_eos": True, "logprobs": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        raw = (await r.aread()).decode()
    return {"i": i, "events": parse_sse(raw), "max_tokens": body["max_tokens"]}


def _check_stream(res: dict) -> str:
    """A complete, well-formed OpenAI chat stream; returns its text."""
    events = res["events"]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == res["max_tokens"]
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + res["max_tokens"]
    ids = {c["id"] for c in chunks} | {usage["id"]}
    assert len(ids) == 1, "every chunk of one stream carries the same id"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    body = chunks[1:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["choices"][0]["finish_reason"] is None for c in body)
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in body)
    n_tokens = sum(len(c["choices"][0]["logprobs"]["content"]) for c in body if c["choices"][0]["logprobs"])
    assert n_tokens == res["max_tokens"]
    return "".join(c["choices"][0]["delta"]["content"] for c in body)


def test_32_concurrent_streams_are_complete_and_match_sequential_results(tight):
    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_stream_chat(client, tight.url, i) for i in range(32)))

    results = asyncio.run(run())
    texts = [_check_stream(r) for r in results]
    # Batching must not mix streams: each text is what the same request gives alone (greedy).
    for i in (0, 13, 31):
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" #{i}"}],
                "max_tokens": 8 + i % 5, "temperature": 0, "ignore_eos": True}
        alone = httpx.post(tight.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert alone["choices"][0]["message"]["content"] == texts[i]
    limit = tight.engine.model_info.kv_budget_bytes
    assert limit == 96 * 1024
    # The budget was the constraint (the cache filled up), yet it was never exceeded: requests waited.
    peaks = dict(tight.peaks)  # recorded on the engine thread through EngineClient.stats()
    assert limit // 2 < peaks["kv_committed_bytes"] <= limit
    assert 0 < peaks["kv_kernel_resident_bytes"] <= limit  # the kernel's page map, not the budget's own count
    assert peaks["num_waiting"] > 0 and peaks["num_running"] < 32
    m = tight.metrics()
    assert m["memfit_requests_running"] == 0 and m["memfit_requests_waiting"] == 0
    assert m["memfit_kv_used_bytes"] == 0
    assert m["memfit_time_to_first_token_seconds_count"] >= 32
    assert m['memfit_inter_token_latency_seconds_bucket{le="+Inf"}'] == m["memfit_inter_token_latency_seconds_count"] > 0


def test_midstream_disconnect_aborts_and_returns_the_kv(slow):
    before = slow.metrics()
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 240, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", slow.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert got
            during = slow.metrics()
            assert during["memfit_kv_used_bytes"] > 0 and during["memfit_requests_running"] == 1
        # leaving the block closes the connection mid-stream
    assert slow.wait_metric("memfit_kv_used_bytes", lambda v: v == 0) == 0
    after = slow.metrics()
    assert after["memfit_requests_running"] == 0 and after["memfit_kv_tokens"] == 0
    generated = after["memfit_generated_tokens_total"] - before["memfit_generated_tokens_total"]
    assert generated < 240, "the request was aborted, not run to its end"
    key = 'memfit_requests_total{finish_reason="%s"}'
    assert after.get(key % "length", 0) == before.get(key % "length", 0)
    assert after[key % "abort"] == before.get(key % "abort", 0) + 1


def test_non_streaming_client_that_goes_away_is_aborted(slow):
    before = slow.metrics()
    body = json.dumps({"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 240, "temperature": 0, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", slow.port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        assert slow.wait_metric("memfit_requests_running", lambda v: v == 1) == 1
    # the socket is closed while the request runs
    assert slow.wait_metric("memfit_requests_running", lambda v: v == 0) == 0
    after = slow.metrics()
    assert after["memfit_kv_used_bytes"] == 0
    assert after["memfit_generated_tokens_total"] - before["memfit_generated_tokens_total"] < 240


def test_full_waiting_queue_answers_429_and_keeps_serving(model_dir):
    settings = ServerSettings(model_name="tiny")
    factory = slow_engine_factory(model_dir, max_num_seqs=1, max_waiting=1)  # the first request runs >= 1.2 s
    with LiveServer(model_dir, settings, factory=factory) as live:
        async def one(client: openai.AsyncOpenAI, max_tokens: int):
            try:
                return await client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=max_tokens,
                                                       temperature=0, extra_body={"ignore_eos": True})
            except openai.RateLimitError as exc:
                return exc

        async def run():
            async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0) as client:
                first = asyncio.create_task(one(client, 120))
                await asyncio.sleep(0.3)  # the first request is running; the rest compete for one queue slot
                rest = await asyncio.gather(*(one(client, 4) for _ in range(4)))
                return [await first, *rest]

        results = asyncio.run(run())
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        served = [r for r in results if not isinstance(r, Exception)]
        assert limited and served
        assert all(e.status_code == 429 and e.body["type"] == "rate_limit_exceeded" for e in limited)
        assert all(e.response.headers.get("retry-after") == "1" for e in limited)  # when to try again
        assert all(r.usage.completion_tokens == r.usage.total_tokens - 3 for r in served)
        # Once the queue drains the server accepts again.
        r = httpx.post(live.url + "/v1/completions", json={"prompt": [5], "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
        assert json.loads(r.text)["usage"]["prompt_tokens"] == 1
