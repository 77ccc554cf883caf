"""benchmarks.common: the timers, thread pinning, the result header and the stdout-JSON / --out contract."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import common

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """A clock that only moves when a timed function says how long it took: durations known exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_time_calls_skips_the_warm_up_and_averages_the_inner_calls():
    clock = FakeClock()
    durations = iter([9.0, 9.0, 1.0, 3.0, 2.0, 4.0, 6.0, 8.0])  # two warm-up calls, then 3 reps x 2 calls
    times = common.time_calls(lambda: clock.spend(next(durations)), 3, warmup=2, inner=2, clock=clock)
    assert times == [2.0, 3.0, 7.0]  # (1+3)/2, (2+4)/2, (6+8)/2: the 9 s warm-ups are not in them
    clock2 = FakeClock()
    durations2 = iter([100.0, 5.0, 1.0, 3.0])
    assert common.median_time(lambda: clock2.spend(next(durations2)), 3, clock=clock2) == 3.0  # one warm-up


def test_time_calls_syncs_around_every_repetition():
    log: list[str] = []
    common.time_calls(lambda: log.append("fn"), 2, warmup=1, sync=lambda: log.append("sync"))
    # the warm-up's queued work is waited for, and every repetition is bracketed by syncs
    assert log == ["fn", "sync", "sync", "fn", "sync", "sync", "fn", "sync"]


@pytest.mark.parametrize("kw", [{"reps": 0}, {"reps": 1, "inner": 0}, {"reps": 1, "warmup": -1}])
def test_time_calls_refuses_empty_timings(kw):
    with pytest.raises(ValueError, match="reps and inner"):
        common.time_calls(lambda: None, **kw)


def test_median_time_measures_wall_time_and_cpu_us_measures_cpu_time():
    nap = 0.02
    wall = common.median_time(lambda: time.sleep(nap), 3)
    assert wall >= nap * 0.95  # time.sleep never returns early: a lower bound from outside the timer
    # a sleeping process uses (almost) no CPU: process time must not count the nap
    assert common.cpu_us(lambda: time.sleep(nap), 3, 1) < nap * 1e6 / 4

    def spin(seconds: float = 0.01) -> None:  # busy for `seconds` of CPU time
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    us = common.cpu_us(spin, 3, 2)
    assert 0.01e6 <= us < 0.1e6 and us == round(us, 1)


def test_interleave_runs_variants_round_by_round_and_drops_warm_up_rounds():
    clock, log, rounds = FakeClock(), [], []
    cost = {"a": 1.0, "b": 10.0}

    def variant(name: str):
        def run() -> None:
            log.append(name)
            clock.spend(cost[name] * (1 + len(log)))  # grows with every call: later rounds are slower
        return run

    times = common.interleave({"a": variant("a"), "b": variant("b")}, 3, warmup=2, clock=clock,
                              on_round=lambda: rounds.append(len(log)))
    assert log == ["a", "b"] * 5  # side by side: a, b, a, b, ... (2 warm-up rounds + 3 timed)
    assert rounds == [6, 8, 10]  # on_round after each timed round only
    assert times == {"a": [6.0, 8.0, 10.0], "b": [70.0, 90.0, 110.0]}  # calls 5-10; 1-4 were warm-up


@pytest.mark.parametrize("argv,expected", [
    (["x.py"], 1), (["x.py", "--threads", "2"], 2), (["x.py", "--threads=3", "--reps", "4"], 3),
    (["x.py", "--threads"], 1), (["x.py", "--threads", "two"], 1),
])
def test_threads_in_argv(argv, expected):
    assert common.threads_in_argv(argv) == expected


def test_preset_threads_sets_omp_before_torch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert common.preset_threads(["x.py", "--threads", "2"]) == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"


def test_pin_threads_sets_torch_and_refuses_zero(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    old = torch.get_num_threads()
    try:
        common.pin_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        common.pin_threads(0)


def test_header_states_machine_versions_threads_and_seed():
    import platform

    import torch

    h = common.header(2, seed=5, device="cpu")
    assert {"python", "torch", "platform", "cpu", "cpu_count", "ram_bytes", "cuda", "threads", "seed"} <= set(h)
    assert (h["threads"], h["seed"], h["device"]) == (2, 5, "cpu")
    assert h["python"] == platform.python_version() and h["torch"] == torch.__version__
    assert h["cpu_count"] == os.cpu_count()
    assert h["ram_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the kernel's own figure
    json.dumps(h)  # a header must be JSON


def test_emit_prints_one_object_and_writes_json_and_png_beside_out(tmp_path, capsys):
    from benchmarks.engine_soak import plot  # a real benchmark's drawing

    result = {"benchmark": "engine_soak", "model": "m", "kv_cache": "paged", "requests_per_round": 2,
              "rows": [{"round": i, "rss_bytes": (800 + i) << 20, "kv_committed_bytes": 1 << 20} for i in range(3)]}
    out = tmp_path / "sub" / "engine_soak_x.json"
    common.emit(result, out, plot)
    stdout = capsys.readouterr().out
    assert json.loads(stdout) == result  # exactly one JSON object: json.loads refuses trailing text
    assert json.loads(out.read_text()) == result
    png = tmp_path / "sub" / "engine_soak_x.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert common.png_beside(out, "memory") == tmp_path / "sub" / "engine_soak_x.memory.png"


def test_emit_prints_before_writing_so_a_failing_plot_loses_nothing(tmp_path, capsys):
    def broken(result: dict, png: Path) -> None:
        raise RuntimeError("no display")

    with pytest.raises(RuntimeError):
        common.emit({"benchmark": "b", "x": 1}, tmp_path / "b.json", broken)
    assert json.loads(capsys.readouterr().out) == {"benchmark": "b", "x": 1}
    assert json.loads((tmp_path / "b.json").read_text()) == {"benchmark": "b", "x": 1}


def test_a_benchmark_run_as_a_module_prints_one_json_object_and_writes_out(tmp_path):
    out = tmp_path / "vmem_commit.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.vmem_commit", "--device", "cpu", "--reps", "2",
                           "--pages", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON object; the progress rows went to stderr
    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == "vmem_commit" and result["threads"] == 1 and result["reps"] == 2
    assert [r["pages"] for r in result["rows"]] == [2] and '"pages": 2' in proc.stderr
    row = result["rows"][0]
    assert row["commit_s"] > 0 and row["commit_us_per_page"] == pytest.approx(1e6 * row["commit_s"] / 2)


def test_paired_bootstrap_keeps_seeds_paired_and_brackets_the_mean():
    """benchmarks.common.paired_bootstrap (quant_vit's images, costmodel_paired's kernels): constant differences give a
    point interval; items x seeds are resampled as rows, so a difference that cancels between seeds on every item
    gives 0 however the items are drawn; a known sample's interval brackets its mean."""
    import numpy as np

    from benchmarks.common import paired_bootstrap

    assert paired_bootstrap(np.full(40, 2.5), n_boot=300) == (2.5, 2.5)
    d = np.stack([np.arange(50.0), -np.arange(50.0)], axis=1)  # seed 1 undoes seed 0 item by item
    assert paired_bootstrap(d, n_boot=300) == (0.0, 0.0)
    x = np.random.default_rng(4).normal(1.0, 2.0, 400)
    lo, hi = paired_bootstrap(x, n_boot=4000, seed=2)
    assert lo < x.mean() < hi and 0.3 < hi - lo < 0.5  # about 2 x 1.96 x 2 / sqrt(400) = 0.39
