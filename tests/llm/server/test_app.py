"""Routing details of the app itself: HEAD on the GET routes that monitors and load balancers probe."""
from __future__ import annotations

import httpx

from memfit.llm.server.app import ServerSettings
from tests.llm.server.live import LiveServer


def _same_answer(url: str, headers: dict[str, str]) -> httpx.Response:
    """GET and HEAD on `url`: HEAD gets GET's status and headers (Content-Length included) and no body."""
    get, head = httpx.get(url, headers=headers), httpx.head(url, headers=headers)
    assert head.status_code == get.status_code, url
    assert {k: v for k, v in head.headers.items() if k != "date"} == \
        {k: v for k, v in get.headers.items() if k != "date"}, url
    # httpx reads no body after HEAD, so head.content is b"" whatever was sent: what can be checked is the length
    # HEAD announces, GET's body's (the headers' equality above holds only while both say the same)
    assert get.content and int(head.headers["content-length"]) == len(get.content), url
    return head


def test_head_answers_as_get_does_without_a_body(server):
    assert _same_answer(server.url + "/health", {}).status_code == 200
    assert _same_answer(server.url + "/v1/models", server.headers).status_code == 200
    assert _same_answer(server.url + "/v1/models/tiny", server.headers).status_code == 200
    assert _same_answer(server.url + "/v1/models/gpt-4o", server.headers).status_code == 404
    no_key = _same_answer(server.url + "/v1/models", {})  # the key is checked on HEAD too
    assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"


def test_head_on_health_is_503_until_the_model_loads(model_dir):
    def broken():
        raise ValueError("config.json is not valid JSON")

    with LiveServer(model_dir, ServerSettings(model_name="tiny"), factory=broken).start(wait_loaded=False) as live:
        assert not live.engine.wait_loaded(30)
        assert _same_answer(live.url + "/health", {}).status_code == 503


def test_head_stays_out_of_the_schema_but_is_in_allow(server):
    """The OpenAPI schema lists GET only (its operations are what the contract test counts), while a 405 lists in
    `Allow` every method the path answers: it said `Allow: GET` on /health, where HEAD is answered too."""
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/health", "/v1/models", "/v1/models/{model_id}"):
        assert list(paths[path]) == ["get"], path
    r = httpx.request("TRACE", server.url + "/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["message"] == "method TRACE is not allowed on /health; use GET, HEAD"
    for path in ("/v1/models", "/v1/models/tiny"):
        r = httpx.delete(server.url + path, headers=server.headers)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", path
    r = httpx.get(server.url + "/v1/completions", headers=server.headers)  # a POST-only path: no HEAD added
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = httpx.request("TRACE", server.url + "/metrics")  # GET only: HEAD is not answered there
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert httpx.head(server.url + "/metrics").status_code == 405
