"""The CXL cost model reproduces the published optimizer-step measurements it was fitted to, and predicts the
held-out interleaved ones."""
from __future__ import annotations

from memfit.memory.cxl_model import MEASURED, fit


def test_fit_reproduces_the_dram_bound_measurements():
    model = fit()
    for tier in ("local", "cxl"):
        for n, ms in MEASURED[tier]:
            if n >= 20_000_000:  # past the cache: where the tiers differ
                assert abs(model.update_seconds(n, {tier: 1.0}) * 1e3 / ms - 1) < 0.05, (tier, n)
    # "~4x slower once data exceeds ~20M elements"
    big = 544997376
    assert 3.5 < model.update_seconds(big, {"cxl": 1}) / model.update_seconds(big, {"local": 1}) < 4.5


def test_held_out_interleave_is_predicted_from_the_slower_half():
    model = fit()
    for row in model.validation():
        if row["elements"] >= 60_000_000:
            assert abs(row["error"]) < 0.05, row
    # the sum of the halves (serial streaming) would be far off: the model takes the slower one
    n = 671088640
    serial = (model.update_seconds(n / 2, {"local": 1}) + model.update_seconds(n / 2, {"cxl": 1})) * 1e3
    measured = dict(MEASURED["interleave"])[n]
    assert serial > 1.15 * measured


def test_two_cxl_devices_stream_in_parallel_and_cached_data_pays_only_the_latency():
    model = fit()
    n = 500_000_000
    one = model.update_seconds(n, {"cxl": 1.0})
    two = model.update_seconds(n, {"cxl:0": 0.5, "cxl:1": 0.5})
    assert two < 0.55 * one
    small = 1_000_000  # fits the fitted cache: the tiers differ only in their fixed (latency-like) cost
    gap = model.update_seconds(small, {"cxl": 1}) - model.update_seconds(small, {"local": 1})
    assert abs(gap - (model.cxl.fixed_seconds - model.local.fixed_seconds)) < 1e-12
    assert model.cxl.fixed_seconds > model.local.fixed_seconds > 0
    # a large working set between updates (a training step) takes small updates out of the cache
    assert model.update_seconds(small, {"cxl": 1}, working_set=10**9) > 2 * model.update_seconds(
        small, {"local": 1}, working_set=10**9)
