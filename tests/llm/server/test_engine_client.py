"""The server needs nothing from an engine but `EngineClient`: a fake engine that offers only those calls
(no scheduler, no KV manager, no model) is served through the real FastAPI app and uvicorn."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from memfit.llm.engine.outputs import CompletionOutput, RequestOutput
from memfit.llm.engine.params import SamplingParams
from memfit.llm.engine.protocol import EngineClient, ModelInfo
from memfit.llm.models.tokenizer import Tokenizer
from memfit.llm.server.app import ServerSettings
from memfit.memory.budget import MemoryBudgetExceeded
from tests.llm.server.live import LiveServer, parse_sse

POISON = 7  # a prompt starting with this token "cannot fit the KV budget" once it is scheduled
MAX_MODEL_LEN = 96


class FakeEngine:
    """Generates token `(last + 1) % vocab` per step; implements exactly the EngineClient calls."""

    def __init__(self, tokenizer: Tokenizer, step_delay: float = 0.005) -> None:
        self._info = ModelInfo(model_path="fake", max_model_len=MAX_MODEL_LEN, vocab_size=tokenizer.vocab_size,
                               dtype="float32", device="cpu", kv_cache="none", kv_budget_bytes=1 << 20,
                               tokenizer=tokenizer)
        self._delay = step_delay
        self._running: dict[str, tuple[list[int], SamplingParams, list[int]]] = {}
        self.prompts: dict[str, list[int]] = {}  # every request added, by id (what the server sent)
        self.aborted: list[str] = []
        self.steps = 0
        self.thread_names: set[str] = set()

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids or len(prompt_token_ids) >= MAX_MODEL_LEN:
            raise ValueError("the prompt must have 1 to max_model_len - 1 tokens")

    def max_new_tokens(self, prompt_len: int) -> int:
        return MAX_MODEL_LEN - prompt_len

    def maintain(self) -> None:
        self.thread_names.add(threading.current_thread().name)

    def add_request(self, prompt=None, params=None, prompt_token_ids=None, request_id=None, session_id=None,
                    priority=0, user=None) -> str:
        self.thread_names.add(threading.current_thread().name)
        self.validate(prompt_token_ids, params)
        self._running[request_id] = (list(prompt_token_ids), params, [])
        self.prompts[request_id] = list(prompt_token_ids)
        return request_id

    def step(self) -> list[RequestOutput]:
        self.thread_names.add(threading.current_thread().name)
        time.sleep(self._delay)
        for rid, (prompt, _, _) in self._running.items():
            if prompt[0] == POISON:
                raise MemoryBudgetExceeded(f"request {rid} cannot be scheduled: the KV budget has no room",
                                           request_id=rid)
        self.steps += 1
        tok, vocab, outputs = self._info.tokenizer, self._info.vocab_size, []
        for rid, (prompt, params, out) in list(self._running.items()):
            out.append(((out or prompt)[-1] + 1) % vocab)
            done = len(out) >= params.max_tokens
            text = tok.decode(out)
            outputs.append(RequestOutput(rid, prompt, [CompletionOutput(
                0, text, list(out), None, "length" if done else None, delta_text=text[len(tok.decode(out[:-1])):])],
                finished=done))
            if done:
                del self._running[rid]
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._running)

    def set_priority(self, request_id: str, priority: int) -> None:
        if request_id not in self._running:
            raise KeyError(request_id)

    def abort(self, request_id: str) -> None:
        if self._running.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def stats(self) -> dict:
        return {"num_running": len(self._running), "num_waiting": 0, "num_steps": self.steps}

    def close(self) -> None:
        self._running.clear()


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture()
def fake_server(model_dir, tok):
    fake = FakeEngine(tok)
    assert isinstance(fake, EngineClient) and not hasattr(fake, "scheduler") and not hasattr(fake, "kv")
    with LiveServer(model_dir, ServerSettings(model_name="fake"), factory=lambda: fake) as live:
        yield live, fake


def test_completion_and_chat_through_the_facade(fake_server, tok):
    live, fake = fake_server
    r = httpx.post(live.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == tok.decode([8, 9, 10, 11]) and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0}}

    messages = [{"role": "user", "content": "Hello world"}]
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200, r.text
    # The server rendered the chat with the engine's own tokenizer (model_info.tokenizer).
    expected = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    (rid,) = [k for k, v in fake.prompts.items() if v != [5, 6, 7]]
    assert fake.prompts[rid] == expected
    assert r.json()["usage"]["prompt_tokens"] == len(expected) and r.json()["usage"]["completion_tokens"] == 3
    # Without max_tokens, chat asks the engine what the context and budget leave.
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": messages}, timeout=30)
    assert r.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - len(expected)
    assert fake.thread_names == {"memfit-engine"}  # every engine call came from the one engine thread
    models = httpx.get(live.url + "/v1/models").json()["data"]
    assert models[0]["max_model_len"] == MAX_MODEL_LEN


def test_a_disconnected_stream_is_aborted_in_the_engine(model_dir, tok):
    fake = FakeEngine(tok, step_delay=0.02)  # 80 tokens take >= 1.6 s: the disconnect lands mid-request
    with LiveServer(model_dir, ServerSettings(model_name="fake"), factory=lambda: fake) as live:
        body = {"prompt": [5], "max_tokens": 80, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", live.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert first
        deadline = time.monotonic() + 10
        while not fake.aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fake.aborted) == 1 and fake.steps < 80


def test_memory_budget_exceeded_fails_only_the_request_it_names(fake_server, tok):
    live, fake = fake_server
    fake._delay = 0.02
    results: dict[str, httpx.Response] = {}

    def send(name: str, body: dict) -> None:
        results[name] = httpx.post(live.url + "/v1/completions", json=body, timeout=30)

    ok = threading.Thread(target=send, args=("ok", {"prompt": [5], "max_tokens": 40, "stream": True,
                                                    "stream_options": {"include_usage": True}}))
    ok.start()
    deadline = time.monotonic() + 10
    while fake.steps == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the first request is running in the engine
    send("poison", {"prompt": [POISON, 8], "max_tokens": 4})
    ok.join(30)
    bad = results["poison"]
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "kv_budget_exceeded"
    events = parse_sse(results["ok"].text)
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
    assert events[-2]["usage"]["completion_tokens"] == 40  # the other request ran to its end
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == tok.decode([(5 + i) % tok.vocab_size for i in range(1, 41)])  # all 40 tokens, in order
    poison_id = next(k for k, v in fake.prompts.items() if v[0] == POISON)
    assert fake.aborted == [poison_id]  # the engine was told to drop the failed request, and only that one
