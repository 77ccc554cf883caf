"""The probes benchmarks/finetune_deepspeed.py --breakdown reads DeepSpeed's buffers with (no DeepSpeed needed):
resident pages by mincore, the autograd graph's saved bytes, and a method's RSS peak above its entry."""
from __future__ import annotations

import torch

from benchmarks.deepspeed_probe import PeakTracker, resident_bytes, saved_tensor_meter
from memfit.memory.measure import reset_peak_rss


def test_resident_bytes_counts_written_pages_only():
    n = 64 << 20
    t = torch.empty(n, dtype=torch.uint8)  # mmap-backed at this size: untouched pages are not resident
    assert resident_bytes(t) < n // 10
    t[: n // 2].fill_(1)
    assert n // 2 <= resident_bytes(t) < n // 2 + n // 10
    t.fill_(1)
    assert resident_bytes(t) >= n - 4096


def test_saved_tensor_meter_sums_unique_saved_storages():
    x = torch.randn(1000, 100, requires_grad=True)
    rec: dict = {}
    with saved_tensor_meter(rec):
        y = (x * x).sum()  # saves x twice: one storage
    assert rec["saved_storages"] == 1 and rec["saved_bytes"] == 1000 * 100 * 4
    y.backward()


def test_peak_tracker_sees_a_transient_inside_a_method():
    if not reset_peak_rss():
        import pytest

        pytest.skip("this kernel cannot reset the peak RSS")

    class Work:
        def spike(self):
            t = torch.ones(128 << 20, dtype=torch.uint8)  # 128 MiB, freed on return
            return int(t[0])

        def outer(self):
            return self.spike()

    w, tracker = Work(), PeakTracker()
    tracker.wrap(w, ["spike", "outer"])
    w.outer()
    assert tracker.transients["spike"] >= 120 << 20
    assert tracker.transients["outer"] >= 120 << 20  # the nested reset did not hide it from the caller
    assert tracker.peak() >= tracker.transients["spike"]
