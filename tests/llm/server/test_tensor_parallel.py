"""`memfit serve --tensor-parallel-size 2`: one HTTP front end over both ranks, the greedy text of one rank,
and no worker left behind when the server stops."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from memfit.llm import LLM, SamplingParams
from tests.llm.server.live import ServerProcess

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids.update(int(k) for k in (task / "children").read_text().split())
    return kids


def test_serve_two_ranks_behind_one_front_end():
    prompt = "def fibonacci(n):"
    one = LLM(model="memfit-tiny", dtype="float32", threads=1)
    try:
        want = one.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0].text
    finally:
        one.engine.close()
    args = ["--model", "memfit-tiny", "--dtype", "float32", "--tensor-parallel-size", "2", "--max-num-seqs", "4"]
    with ServerProcess(args) as server:
        workers = _children(server.proc.pid)
        assert workers, "rank 0 spawned no worker"
        body = {"model": "memfit-tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        for _ in range(2):
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
        bad = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": -1}, timeout=60)
        assert bad.status_code == 400  # bad input: a clear error, and the ranks keep serving
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == want
        server.stop()
        assert server.proc.returncode == 0
    # the worker (told to stop by the engine) and multiprocessing's resource tracker (which exits when rank 0's end
    # of its pipe closes): gone with rank 0; polled, a bound on a hang, not a speed target
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_a_lost_rank_fails_the_server_clearly():
    """A worker killed under a serving engine: the request in the failing step answers 500 naming the rank, and
    from then on /health and new requests answer 503 with the reason (the engine cannot serve without the shard)."""
    args = ["--model", "memfit-tiny", "--tensor-parallel-size", "2", "--max-num-seqs", "4"]
    with ServerProcess(args) as server:
        worker = next(pid for pid in _children(server.proc.pid)
                      if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(worker, signal.SIGKILL)
        body = {"model": "memfit-tiny", "prompt": "hello", "max_tokens": 8}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 500 and "tensor-parallel worker rank 1" in r.text, r.text
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and "cannot serve any more" in health.json()["message"]
        again = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert again.status_code == 503 and "tensor-parallel worker rank 1" in again.text
