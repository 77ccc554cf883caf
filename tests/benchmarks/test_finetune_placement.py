"""benchmarks/finetune_placement: modelled rows scale the one local-only baseline, and targets are judged on real
nodes only."""
from __future__ import annotations

from benchmarks.finetune_placement import placements, summarise, targets


def _run(policy, budget, step, opt, slowdown=1.0, streamed=0.0):
    return {"policy": policy, "local_budget": budget, "median_step_seconds": step, "median_optimizer_seconds": opt,
            "model": {"optimizer_slowdown": slowdown, "slow_tier_stream_bytes_per_step": streamed,
                      "optimizer_traffic_bytes": 30e6, "slow_devices": 1}}


def test_modelled_rows_come_from_the_local_only_baseline_and_are_not_judged():
    runs = {"local-only": _run("local-only", None, 2.0, 0.5),
            # measured times of the other runs differ (load), but modelled rows ignore them
            "interleave": _run("interleave", None, 9.0, 9.0, slowdown=2.0),
            "latency-first 75%": _run("latency-first", "75%", 0.1, 0.1, slowdown=1.2)}
    rows = summarise(runs, "modelled")
    by = {r["placement"]: r for r in rows}
    assert by["interleave"]["optimizer_step_seconds"] == 1.0 and by["interleave"]["step_seconds"] == 2.5
    assert abs(by["latency-first 75%"]["step_seconds"] - 2.1) < 1e-12
    t = targets(rows, "modelled")
    assert t["judged"] is False and t["latency-first 75%"]["at_least_97pct_of_local_only"] is None
    assert abs(t["latency-first 75%"]["speedup_vs_interleave"] - 2.5 / 2.1) < 1e-12


def test_measured_rows_are_judged_against_both_targets():
    runs = {"local-only": _run("local-only", None, 1.0, 0.3), "interleave": _run("interleave", None, 1.3, 0.6),
            "latency-first 50%": _run("latency-first", "50%", 1.02, 0.32),
            "latency-first 25%": _run("latency-first", "25%", 1.2, 0.5)}
    t = targets(summarise(runs, "measured"), "measured")
    assert t["judged"] is True
    assert t["latency-first 50%"]["at_least_97pct_of_local_only"] and t["latency-first 50%"][
        "at_least_15pct_faster_than_interleave"]
    assert not t["latency-first 25%"]["at_least_97pct_of_local_only"]
    assert not t["latency-first 25%"]["at_least_15pct_faster_than_interleave"]
    assert placements(("25%",)) == [("local-only", None), ("interleave", None), ("latency-first", "25%")]
