"""The OpenAPI contract tells the truth: schemathesis (`--checks all`) against the live server finds nothing.

schemathesis generates requests from /openapi.json (valid ones, and ones the schema says are invalid) and
checks every answer against the schema: a declared status and content type, a body that matches the
declared model, `Allow` on a 405, schema-valid requests accepted, schema-invalid ones refused, 401 without
the key. The run is bounded (a few examples per operation, a fixed seed, a wall-clock limit) and the one
rule JSON schema cannot state (prompt + max_tokens within the context) is checked by an independent token
count instead (schemathesis_hooks.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("schemathesis", reason="the conformance run needs schemathesis (the dev extra)")

from memfit.llm.server.app import ServerSettings  # noqa: E402
from tests.llm.server.live import API_KEY, LiveServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
WALL_CLOCK_S = 300  # a hang guard (the run takes ~10 s, 70-135 s while responses waited for delayed ACKs); not a speed check
MAX_MODEL_LEN = 64  # a short context keeps every generated request short (n up to 128 choices)
MAX_WAITING = 256  # the contract server's waiting queue (schemathesis_hooks.exceeds_queue reads it too)
# Every warning but missing_test_data: PATCH /v1/requests/{id} names a request that exists only while it runs, so
# generated ids always get 404 (test_priority.py exercises the route with live ids).
WARNINGS = ",".join(["missing_auth", "base_url_mismatch", "validation_mismatch", "missing_deserializer",
                     "unused_openapi_auth", "unsupported_regex", "method_not_allowed", "constants_extraction",
                     "unmatched_filter", "unresolvable_reference", "low_valid_rate", "rate_limited",
                     "dictionary_mismatch", "timeout_units"])


@pytest.fixture(scope="module")
def contract_server(model_dir):
    """An API key (so 401 and the bearer scheme are part of the contract) and a short context."""
    settings = ServerSettings(model_name="tiny", aliases=(str(model_dir),), api_key=API_KEY, max_body_bytes=64 * 1024)
    with LiveServer(model_dir, settings, max_waiting=MAX_WAITING, max_model_len=MAX_MODEL_LEN) as live:
        yield live


def run_schemathesis(url: str, model_dir, max_model_len: int, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance",  # replaced by the context-aware version in the hooks
           "-H", f"Authorization: Bearer {API_KEY}", "--seed", "20261202", "--max-examples", "8",
           "--phases", "examples,coverage,fuzzing", "--request-timeout", "30", "--generation-database", "none",
           "--no-color", "--workers", "1", "--warnings", WARNINGS, *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "SCHEMATHESIS_HOOKS": "tests.llm.server.schemathesis_hooks",
           "MEMFIT_SCHEMA_MODEL": str(model_dir), "MEMFIT_SCHEMA_MAX_MODEL_LEN": str(max_model_len),
           "MEMFIT_SCHEMA_MAX_WAITING": str(MAX_WAITING)}
    # cwd: where schemathesis may keep its state (.schemathesis/), never the repository.
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=WALL_CLOCK_S)


@pytest.mark.slow  # ~830 generated requests, mostly the coverage phase's boundary values
def test_schemathesis_finds_no_failure(contract_server, model_dir, tmp_path):
    result = run_schemathesis(contract_server.url, model_dir, MAX_MODEL_LEN, cwd=tmp_path)
    report = result.stdout[-12000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "7 selected" in result.stdout, report  # every operation was tested, none filtered away
    assert "No issues found" in result.stdout, report  # no failure, error or warning
    assert httpx.get(contract_server.url + "/health").status_code == 200  # and the server is still serving


def test_the_schema_states_the_model_limits_and_the_statuses(contract_server, model_dir):
    """Spot checks of what schemathesis relies on, against facts known independently of the server."""
    config = json.loads((model_dir / "config.json").read_text())
    schema = httpx.get(contract_server.url + "/openapi.json").json()
    completions = schema["paths"]["/v1/completions"]["post"]
    assert set(completions["responses"]) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "422" not in json.dumps(schema["paths"])  # FastAPI's default; this server answers 400
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert set(schema["paths"]["/health"]["get"]["responses"]) == {"200", "503", "500"}
    request = schema["components"]["schemas"]["CompletionRequest"]
    token_ids = request["properties"]["prompt"]["anyOf"][1]
    assert token_ids["items"]["maximum"] == config["vocab_size"] - 1
    assert token_ids["maxItems"] == MAX_MODEL_LEN - 1
    assert request["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 1  # exact, not a float
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_405_names_the_allowed_methods(contract_server):
    server = contract_server
    r = httpx.request("TRACE", server.url + "/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"  # HEAD is answered there, out of the schema
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.delete(server.url + "/v1/completions", headers=server.headers)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
