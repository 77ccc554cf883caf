"""benchmarks/copy_reference.py (the cold-copy ceiling of a swap of a given size) and what benchmarks/preemption.py
does with it: per-op sizes recorded from the host tier only, medians over reps that lack a figure."""
from __future__ import annotations

import math

from benchmarks.copy_reference import cold_copy_rates, cold_copy_seconds, llc_bytes
from benchmarks.preemption import median_row, record_host_ops


def test_cold_copy_seconds_interpolates_in_log_size_and_holds_the_end_rates():
    rates = {1 << 16: 1e9, 1 << 20: 3e9, 1 << 24: 6e9}
    for n, r in rates.items():
        assert math.isclose(cold_copy_seconds(n, rates), n / r)
    mid = 1 << 18  # halfway in log size between 64 KiB and 1 MiB: halfway in rate
    assert math.isclose(cold_copy_seconds(mid, rates), mid / 2e9)
    assert math.isclose(cold_copy_seconds(100, rates), 100 / 1e9)  # below the smallest: its rate
    assert math.isclose(cold_copy_seconds(1 << 30, rates), (1 << 30) / 6e9)  # above the largest: its rate
    times = [cold_copy_seconds(n, rates) for n in range(1 << 16, 1 << 24, 1 << 18)]
    assert times == sorted(times)  # a larger copy never takes less time


def test_cold_copy_rates_are_measured_per_size():
    rates = cold_copy_rates((1 << 16, 1 << 20), reps=1, flush_bytes=8 << 20)
    assert set(rates) == {1 << 16, 1 << 20}
    assert all(0 < r < 1e12 and math.isfinite(r) for r in rates.values())
    assert llc_bytes() > 0


def test_host_ops_are_recorded_from_the_host_tier_only():
    class Stats:
        pass

    class Swap:
        def __init__(self):
            self.stats, self.seen = Stats(), []

        def _account(self, st, nbytes, n, seconds, out):
            self.seen.append(nbytes)

    swap = Swap()
    ops = record_host_ops(swap)
    swap._account(swap.stats, 100, 48, 0.5, True)
    # another stats object: accounted, not recorded (a guard: the SSD tier counts its own through its stats today)
    swap._account(Stats(), 7, 1, 0.1, False)
    swap._account(swap.stats, 200, 48, 0.25, False)
    assert ops == [(100, 0.5), (200, 0.25)] and swap.seen == [100, 7, 200]


def test_median_row_takes_each_figure_over_the_reps_that_have_it():
    reps = [{"variant": "v", "swap": {"seconds": 1.0, "fraction_of_cold_copy": 0.5}},
            {"variant": "v", "swap": {"seconds": 3.0}},
            {"variant": "v", "swap": {"seconds": 2.0, "fraction_of_cold_copy": 0.7}}]
    row = median_row(reps)
    assert row == {"variant": "v", "swap": {"seconds": 2.0, "fraction_of_cold_copy": 0.6}}


def test_the_disk_reference_before_and_after_merges_rate_by_rate():
    """benchmarks/preemption.py measures the SSD references before the runs and after: each rate (nested ones too)
    the median of its measures, the settings (piece size, depth, O_DIRECT) as measured."""
    from benchmarks.preemption import _median_reference

    before = {"write_bytes_per_s": 3e9, "read_bytes_per_s": 2e9, "direct": True,
              "in_flight": {"piece_bytes": 1 << 18, "depth": 4, "read_bytes_per_s": 1e9}}
    after = {"write_bytes_per_s": 2e9, "read_bytes_per_s": 3e9, "direct": True,
             "in_flight": {"piece_bytes": 1 << 18, "depth": 4, "read_bytes_per_s": 2e9}}
    merged = _median_reference([before, after])
    assert merged == {"write_bytes_per_s": 2.5e9, "read_bytes_per_s": 2.5e9, "direct": True,
                      "in_flight": {"piece_bytes": 1 << 18, "depth": 4, "read_bytes_per_s": 1.5e9}}
    assert _median_reference([before]) == before
