"""Property-based fuzzing of request bodies: whatever a client sends, the answer is never a 5xx, errors keep
OpenAI's shape, and the server keeps serving."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
ANY_JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=12)

# Valid values for every field the server reads (small, so valid requests finish quickly) ...
TEXT = st.text(max_size=24)
VALID = {
    "model": st.just("tiny"),
    "max_tokens": st.integers(min_value=1, max_value=4),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "top_k": st.integers(min_value=-1, max_value=50),
    "min_p": st.floats(min_value=0, max_value=1),
    "n": st.integers(min_value=1, max_value=3),
    "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=319), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "presence_penalty": st.just(0),
    "user": st.text(max_size=5),
}
COMPLETION_VALID = {**VALID, "prompt": st.one_of(
    TEXT.filter(bool), st.lists(TEXT.filter(bool), min_size=1, max_size=3),
    st.lists(st.integers(min_value=0, max_value=319), min_size=1, max_size=12),
    st.lists(st.lists(st.integers(min_value=0, max_value=319), min_size=1, max_size=5), min_size=1, max_size=2),
), "logprobs": st.integers(min_value=0, max_value=5), "echo": st.booleans()}
CONTENT = st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=3))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": CONTENT})
CHAT_VALID = {**VALID, "messages": st.lists(MESSAGE, min_size=1, max_size=3), "logprobs": st.booleans(),
              "top_logprobs": st.integers(min_value=0, max_value=5), "max_completion_tokens": st.integers(1, 4),
              "session_id": st.text(min_size=1, max_size=4)}

# ... and plausible-but-wrong ones: wrong types, out of range, huge, absurd, unsupported features.
INVALID = {
    "model": st.one_of(st.text(max_size=8), ANY_JSON),
    "max_tokens": st.one_of(st.integers(min_value=-(2**64), max_value=2**64), ANY_JSON),
    "temperature": st.one_of(st.floats(min_value=-1, max_value=3), st.text(max_size=3), ANY_JSON),
    "top_p": st.one_of(st.floats(min_value=-0.5, max_value=1.5), ANY_JSON),
    "top_k": ANY_JSON, "min_p": ANY_JSON, "n": st.one_of(st.integers(min_value=-3, max_value=300), ANY_JSON),
    "seed": st.one_of(st.integers(min_value=-(2**66), max_value=2**66), ANY_JSON),
    "stop": st.one_of(st.lists(st.text(max_size=3), max_size=20), ANY_JSON),
    "stop_token_ids": st.one_of(st.lists(st.integers(min_value=-2, max_value=10**6), max_size=3), ANY_JSON),
    "logprobs": st.one_of(st.integers(min_value=-2, max_value=30), ANY_JSON),
    "top_logprobs": st.one_of(st.integers(min_value=-2, max_value=30), ANY_JSON),
    "stream": ANY_JSON, "stream_options": ANY_JSON, "echo": ANY_JSON, "ignore_eos": ANY_JSON,
    "logit_bias": st.dictionaries(st.text(max_size=3), st.floats(), min_size=1, max_size=2),
    "presence_penalty": st.one_of(st.floats(min_value=-3, max_value=3), ANY_JSON),
    "best_of": st.one_of(st.integers(min_value=-1, max_value=5), ANY_JSON),
    "suffix": st.text(min_size=1, max_size=3),
    "response_format": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}), ANY_JSON),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function")}), max_size=1),
    "prompt": st.one_of(st.just(""), st.lists(st.integers(min_value=-5, max_value=400), max_size=12),
                        st.lists(st.integers(min_value=0, max_value=300), min_size=250, max_size=300), ANY_JSON),
    "messages": st.one_of(st.just([]), ANY_JSON, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "tool", "robot"]),
         "content": st.one_of(st.none(), ANY_JSON, st.just([{"type": "image_url", "image_url": {"url": "x"}}]),
                              st.just("x " * 300))}), min_size=1, max_size=2)),
}


def _bodies(valid: dict, main: str) -> st.SearchStrategy:
    """A valid body (the main field and max_tokens always set), then 0-2 fields replaced by wrong values."""
    base = st.fixed_dictionaries({main: valid[main], "max_tokens": valid["max_tokens"]},
                                 optional={k: v for k, v in valid.items() if k not in (main, "max_tokens")})
    keys = sorted(k for k in INVALID if k in valid or k in ("logit_bias", "best_of", "suffix", "response_format", "tools"))

    @st.composite
    def mutated(draw) -> dict:
        body = draw(base)
        for key in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)):
            body[key] = draw(INVALID[key])
        if draw(st.booleans()) and draw(st.booleans()):
            body.pop(draw(st.sampled_from(sorted(body))))  # sometimes drop a field (max_tokens or the prompt)
        return body

    return mutated()


REQUESTS = st.one_of(
    st.tuples(st.just("/v1/completions"), _bodies(COMPLETION_VALID, "prompt").map(json.dumps)),
    st.tuples(st.just("/v1/chat/completions"), _bodies(CHAT_VALID, "messages").map(json.dumps)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), ANY_JSON.map(json.dumps)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.binary(max_size=64)),
)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={**server.headers, "content-type": "application/json"},
                      timeout=60) as client:
        yield client


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(req=REQUESTS)
def test_no_request_body_gets_a_5xx(http, req):
    path, body = req
    r = http.post(path, content=body)
    assert r.status_code < 500, (r.status_code, body, r.text)
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n")
        assert '"error"' not in r.text.split("\n\n")[-3], r.text
    else:
        assert r.json()["choices"]


def test_server_still_serves_after_fuzzing(http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
