"""benchmarks/finetune_offload.py's step-time summary over alternating rounds (no training here)."""
from __future__ import annotations

import pytest

from benchmarks.finetune_offload import alternated


def _design(step: float, cpu: float, opt: float, settle: float) -> dict:
    # 4 steps: the steady ones are 1 and 2 (not the warm-up, nor the last, which runs under the profiler)
    return {"step_seconds": [9.0, step, step, 9.0], "steady_median_step_seconds": step,
            "step_cpu_seconds": [9.0, cpu, cpu, 9.0], "steady_median_step_cpu_seconds": cpu,
            "optimizer_seconds": [9.0, opt, opt, 9.0], "steady_median_optimizer_seconds": opt,
            "optimizer_settle_seconds": [9.0, settle, settle, 9.0]}


def test_memascend_is_compared_with_every_rival_round_by_round():
    rounds = [{"load_1min": {"a": 1.0}, "step_time_ratio": 0.25, "designs": {"memascend": _design(2.0, 1.0, 0.5, 0.1),
                                                    "zero-infinity-pipelined": _design(4.0, 2.0, 1.0, 0.2),
                                                    "zero-infinity": _design(8.0, 1.0, 2.0, 0.0)}},
              {"load_1min": {"a": 3.0}, "step_time_ratio": 0.5, "designs": {"memascend": _design(3.0, 1.0, 0.6, 0.1),
                                                    "zero-infinity-pipelined": _design(3.0, 4.0, 0.6, 0.2),
                                                    "zero-infinity": _design(6.0, 2.0, 1.2, 0.0)}}]
    out = alternated(rounds, ["memascend", "zero-infinity-pipelined", "zero-infinity"], 4)
    assert out["vs"]["zero-infinity-pipelined"]["step"]["ratios"] == [0.5, 1.0]
    assert out["vs"]["zero-infinity-pipelined"]["step_cpu"]["ratios"] == [0.5, 0.25]
    assert out["vs"]["zero-infinity"]["step"]["ratios"] == [0.25, 0.5]
    assert out["vs"]["zero-infinity"]["step"]["median"] == pytest.approx(0.375)
    assert out["vs"]["zero-infinity"]["optimizer"]["ratios"] == pytest.approx([0.25, 0.5])
    assert out["ratio_rival"] == "zero-infinity" and out["ratios"] == [0.25, 0.5]  # main()'s rival, as before
    assert out["designs"]["memascend"]["median_optimizer_seconds"] == pytest.approx(0.55)
    assert out["designs"]["zero-infinity-pipelined"]["median_optimizer_settle_seconds"] == pytest.approx(0.2)
    assert (out["load_1min_min"], out["load_1min_max"]) == (1.0, 3.0)


def test_plan_only_plans_without_running_and_refuses_an_unknown_design_before_any_run(capsys):
    import json

    from benchmarks.finetune_offload import main

    main(["--shape", "0.1b", "--designs", "", "--plan-only", "memascend,zero-infinity-tuned"])
    out = json.loads(capsys.readouterr().out)
    assert out["designs"] == {} and set(out["plans"]) == {"memascend", "zero-infinity-tuned"}
    plans = out["plans"]
    assert all(p["total_bytes"] == sum(p["pools"].values()) > 0 for p in plans.values())
    assert plans["memascend"]["total_bytes"] < plans["zero-infinity-tuned"]["total_bytes"]
    with pytest.raises(SystemExit):
        main(["--shape", "0.1b", "--designs", "memascend", "--plan-only", "zero-infinty"])
    assert "unknown design(s) zero-infinty" in capsys.readouterr().err
