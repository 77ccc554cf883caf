"""benchmarks/speculative_memory_breakdown.py: its smaps classes against memory the test maps itself, and a short
run on the bundled pair (every step gets a kind and a peak no lower than what it held at its start; the workload's
peak is its highest step's)."""
from __future__ import annotations

import mmap
import os

from benchmarks.speculative_memory_breakdown import run, smaps_classes

MiB = 2**20


def test_smaps_classes_see_anonymous_and_shared_pages_the_test_touches() -> None:
    before = smaps_classes()
    anon = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd = os.memfd_create("breakdown-test")
    os.ftruncate(fd, 4 * MiB)
    shared = mmap.mmap(fd, 4 * MiB, flags=mmap.MAP_SHARED)
    try:
        for off in range(0, 8 * MiB, 4096):
            anon[off] = 1
        for off in range(0, 4 * MiB, 4096):
            shared[off] = 1
        after = smaps_classes()
        grown = {k: after[k] - before[k] for k in after}
        assert 8 * MiB <= grown["anon_mappings"] < 9 * MiB  # (other allocations may land there too)
        assert 4 * MiB <= grown["shared"] < 5 * MiB
    finally:
        anon.close()
        shared.close()
        os.close(fd)


def test_a_short_run_reports_every_step(tmp_path) -> None:
    a = dict(threads=1, model="memfit-tiny", draft="memfit-tiny-draft", conversations=1, gamma=3, max_tokens=8,
             dtype="float32", decoder="on_demand", budget_bytes=None, budget_gamma=0, context=256)
    out = run(a)
    kinds = out["steps_by_kind"]
    assert kinds["prefill"] == 2 and kinds["catch_up"] >= 1 and kinds["decode"] >= 1  # two turns, speculation
    assert sum(kinds.values()) == out["steps"]
    top = out["peak_step"]
    assert out["generation_memory_bytes"] == top["peak_bytes"] == out["highest_steps"][0]["peak_bytes"]
    for s in out["highest_steps"]:
        assert s["peak_bytes"] >= s["kv_committed_at_start_bytes"] + s["held_beside_kv_at_start_bytes"]
        assert s["rise_in_step_bytes"] >= 0
    prefill = out["highest_step_by_kind"]["prefill"]
    assert prefill["largest_target_pass_rows"] >= max(prefill["new_tokens"]) > 1
    assert prefill["target_pass_tensors_by_shape_bytes"] > 0
    target = [p for p in prefill["passes"] if p["model"] == "target"]
    assert [len(p["held_beside_kv_after_layer_bytes"]) for p in target] == [4] * len(target)  # memfit-tiny: 4 layers
