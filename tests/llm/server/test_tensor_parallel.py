"""`memfit serve --tensor-parallel-size 2`: one HTTP front end over both ranks, the greedy text of one rank,
and no worker left behind when the server stops."""
from __future__ import annotations

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
    for pid in workers:  # daemonic children of rank 0: gone with it (the engine told them to stop first)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
