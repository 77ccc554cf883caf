"""The runtime's share of the ledger: the largest of repeated measurements in fresh processes, cached, and
interpolated between the calibration batches."""
from __future__ import annotations

import json
import subprocess

from memfit.llm.engine import calibrate


def test_runtime_bytes_measures_each_batch_in_fresh_processes_then_reads_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    monkeypatch.delenv(calibrate.CALIBRATING_ENV, raising=False)
    draws = {"1": iter([100, 140, 120, 90, 130]), "8": iter([900, 700, 800, 1100, 650])}
    calls = []

    def fake_run(cmd, **kw):
        batch = cmd[cmd.index("--batch") + 1]
        calls.append(batch)
        assert kw["env"][calibrate.CALIBRATING_ENV] == "1"  # the measuring process reserves no runtime itself
        out = json.dumps({"runtime_bytes": next(draws[batch]), "runtime_baseline_bytes": 5})
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(calibrate.subprocess, "run", fake_run)
    one = calibrate.runtime_bytes("cpu", "bfloat16", "blocked", True, batch=1)
    assert calls == ["1"] * calibrate.CALIBRATION_REPEATS + ["8"] * calibrate.CALIBRATION_REPEATS
    assert one == {"runtime_bytes": 140, "runtime_low_bytes": 90, "runtime_baseline_bytes": 5}  # the largest draw
    # the minutes of measuring are announced and counted on stderr, nothing on stdout (a --json stays one object)
    runs = 2 * calibrate.CALIBRATION_REPEATS
    out = capsys.readouterr()
    assert out.out == ""
    assert "measuring the runtime's memory" in out.err and str(tmp_path / "runtime.json") in out.err
    assert f"run {runs}/{runs} done" in out.err
    # cached: no more processes; batch 8 and past it take batch 8's figure, between them a straight line
    eight = calibrate.runtime_bytes("cpu", "bfloat16", "blocked", True, batch=8)
    assert (eight["runtime_bytes"], eight["runtime_low_bytes"]) == (1100, 650)
    assert calibrate.runtime_bytes("cpu", "bfloat16", "blocked", True, batch=32)["runtime_bytes"] == 1100
    mid = calibrate.runtime_bytes("cpu", "bfloat16", "blocked", True, batch=4)
    assert mid["runtime_bytes"] == round(140 + 3 / 7 * (1100 - 140))
    assert mid["runtime_low_bytes"] == round(90 + 3 / 7 * (650 - 90))
    assert len(calls) == 2 * calibrate.CALIBRATION_REPEATS
    assert capsys.readouterr().err == ""  # read from the cache: nothing to announce
