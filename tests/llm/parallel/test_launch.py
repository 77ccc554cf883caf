"""Starting and losing ranks: spawned workers, torchrun (one node, and two "nodes" on loopback), a worker that
dies or hangs (rank 0 fails with RankFailed, bounded), and a rank 0 that dies (its workers exit)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memfit.llm import LLM, SamplingParams
from memfit.llm.parallel import group as tp_group
from memfit.llm.parallel.group import RankFailed, free_port

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = [[5, 17, 33, 80, 9], [100, 7, 8, 300, 41, 2, 9]]
SP = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
OPTS = dict(dtype="float32", threads=1, max_num_seqs=4)

# What every torchrun process runs: the same script on every rank (rank > 0 never returns from LLM(...)).
SCRIPT = textwrap.dedent("""
    import json, sys
    from memfit.llm import LLM, SamplingParams
    llm = LLM(model="memfit-tiny", dtype="float32", threads=1, max_num_seqs=4, tensor_parallel_size=2)
    out = llm.generate(prompt_token_ids=%r, sampling_params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    llm.engine.close()
    with open(sys.argv[1], "w") as f:
        json.dump([o.outputs[0].token_ids for o in out], f)
""" % (PROMPTS,))


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    one = LLM(model="memfit-tiny", **OPTS)
    try:
        return [o.outputs[0].token_ids for o in one.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
    finally:
        one.engine.close()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_killed_worker_fails_the_next_step(reference):
    llm = LLM(model="memfit-tiny", tensor_parallel_size=2, **OPTS)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)]
        assert got == reference
        worker = llm.engine.tp.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        with pytest.raises(RankFailed, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
        assert not llm.engine.has_unfinished_requests()  # the failed batch was aborted, nothing left queued
    finally:
        llm.engine.close()


def test_worker_dying_under_a_collective_fails_it(monkeypatch):
    """The sentinel check is skipped, so rank 0 meets the dead peer inside a collective: gloo's error becomes
    a RankFailed naming the rank."""
    llm = LLM(model="memfit-tiny", tensor_parallel_size=2, **OPTS)
    try:
        worker = llm.engine.tp.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        monkeypatch.setattr(llm.engine.tp, "check_alive", lambda: None)
        with pytest.raises(RankFailed, match="worker rank 1 .* exited with code -9"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
    finally:
        llm.engine.close()


def test_hung_worker_fails_within_the_timeout(monkeypatch):
    """A worker that stops answering (SIGSTOP) without dying: rank 0's step fails once the collective timeout
    passes, instead of waiting forever."""
    monkeypatch.setattr(tp_group, "DATA_TIMEOUT_S", 3.0)
    llm = LLM(model="memfit-tiny", tensor_parallel_size=2, **OPTS)
    worker = llm.engine.tp.procs[0]
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        with pytest.raises(RankFailed, match=r"stopped answering \(timeout 3 s\)"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        llm.engine.close()


def test_workers_exit_when_rank0_dies(tmp_path):
    script = tmp_path / "rank0.py"
    script.write_text(textwrap.dedent("""
        import time
        from memfit.llm import LLM
        if __name__ == "__main__":
            llm = LLM(model="memfit-tiny", dtype="float32", threads=1, tensor_parallel_size=2)
            print(llm.engine.tp.procs[0].pid, flush=True)
            time.sleep(600)
    """))
    rank0 = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        worker = int(rank0.stdout.readline())  # type: ignore[union-attr]
    finally:
        rank0.kill()
        rank0.wait()
    deadline = time.monotonic() + 120  # a bound on a hang, not a speed target: it exits in about a second
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived rank 0 by 120 s")


def test_unguarded_script_fails_at_once_with_the_fix(tmp_path):
    """A script that builds a spawning engine outside `if __name__ == "__main__":` kills its workers (spawn
    re-imports it); rank 0 says so as soon as the first one exits, not after the rendezvous timeout."""
    script = tmp_path / "unguarded.py"
    script.write_text('from memfit.llm import LLM\nLLM(model="memfit-tiny", threads=1, tensor_parallel_size=2)\n')
    run = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=110)
    assert run.returncode != 0
    assert 'RankFailed: tensor-parallel worker rank 1 exited with code 1 before it started' in run.stderr
    assert '__name__ == "__main__"' in run.stderr


def test_torchrun_one_node(tmp_path, reference):
    script, out = tmp_path / "run.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", str(script), str(out)),
                   env=_env(), timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(out.read_text()) == reference


def test_torchrun_two_nodes_on_loopback(tmp_path, reference):
    """Multi-node is configuration: two torchrun launches (--nnodes 2, --node-rank 0/1) meeting at one
    rendezvous endpoint, here both on 127.0.0.1."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = [subprocess.Popen(_torchrun("--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                                        "--master-addr", "127.0.0.1", "--master-port", str(port), str(script),
                                        str(tmp_path / f"out{r}.json")),
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert json.loads((tmp_path / "out0.json").read_text()) == reference
    assert not (tmp_path / "out1.json").exists()  # node 1's rank never returned from LLM(...): it served rank 0
