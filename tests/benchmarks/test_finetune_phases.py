"""benchmarks/finetune_phases: the kernel's peak-RSS mark goes to the phase that reached it, nested calls
included, and what runs after a call is named after it."""
from __future__ import annotations

import types

import pytest

from benchmarks.finetune_phases import PhaseMeter
from memfit.memory.measure import reset_peak_rss

MiB = 2**20


def test_the_peak_goes_to_the_phase_that_reached_it():
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak-RSS mark")
    held = []

    def big():  # 64 MiB written (resident), then freed before returning
        b = bytearray(64 * MiB)
        b[:: 4096] = b"\1" * (len(b) // 4096)
        return len(b)

    def outer():  # calls the wrapped functions through the namespace, as the trainer calls wrapped methods
        ns.inner()
        held.append(bytearray(8 * MiB))  # a little after the inner call, in the outer phase
        return ns.big()

    def inner():
        return 1

    ns = types.SimpleNamespace(big=big, outer=outer, inner=inner)
    meter = PhaseMeter()
    meter.wrap(ns, "big", lambda: "big")
    meter.wrap(ns, "inner", lambda: "inner")
    meter.wrap(ns, "outer", lambda: "outer")
    ns.outer()
    meter.close()
    peaks = meter.peaks
    assert meter.order[:2] == ["setup (data, skeleton, pools)", "outer"]
    assert "inner" in peaks and "outer (after inner)" in peaks and "big" in peaks
    assert peaks["big"] - peaks["inner"] >= 60 * MiB
    assert max(peaks, key=peaks.get) == "big"
