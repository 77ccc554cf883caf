"""benchmarks/swap_tiers.py: both copy modes move the same bytes and count the same runs, through the engine's own
SwapSpace, the SSD tier's ops move the sequence, and the result is one JSON object with a fraction of the reference
per op."""
from __future__ import annotations

import json

from benchmarks import swap_tiers


def test_both_modes_move_the_same_runs_and_report_a_fraction_of_memcpy(tmp_path, capsys):
    out = tmp_path / "st.json"
    ssd_dir = tmp_path / "ssd"
    ssd_dir.mkdir()
    result = swap_tiers.main(["--shapes", "tiny", "--tokens", "24", "--new", "4", "--reps", "1", "--out", str(out),
                              "--ssd-dir", str(ssd_dir), "--ssd-views", "--modes", *swap_tiers.MODES])
    assert json.loads(capsys.readouterr().out) == result == json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    rows = {(r["op"], r["mode"]): r for r in result["rows"]}
    assert {op for op, _ in rows} == set(swap_tiers.OPS) and {m for _, m in rows} == set(swap_tiers.MODES)
    layers, heads, dim, _ = swap_tiers.SHAPES["tiny"]
    row_bytes = heads * dim * 2  # bf16: one token's K (or V) of one layer
    segments = 2 * layers
    for op in swap_tiers.OPS:
        modes = [m for m in swap_tiers.MODES if m not in swap_tiers.FULL or op in ("out T", "in T")]
        assert {(op, m) for m in modes} <= set(rows)
        assert len({rows[(op, m)]["bytes"] for m in modes}) == 1 == len({rows[(op, m)]["copies"] for m in modes})
        assert all(rows[(op, m)]["call_fraction_of_memcpy"] > 0 for m in modes)
    assert ("out +n", "full") not in rows  # the high-water modes run whole swaps only
    assert set(result["stacked_over_region_call_time"]) == {f"tiny T=24 {op}" for op in swap_tiers.OPS}
    assert set(result["full_trim_over_full_call_time"]) == {"tiny T=24 out T", "tiny T=24 in T"}
    assert set(result["memmove_over_one_call_call_time"]) == {f"tiny T=24 {op}" for op in swap_tiers.OPS}
    # counted independently from the shape: whole swaps move 24 tokens of every segment, the reuse swap-out 4
    assert rows[("out T", "stacked")]["bytes"] == rows[("in T", "stacked")]["bytes"] == segments * 24 * row_bytes
    assert rows[("out +n", "stacked")]["bytes"] == segments * 4 * row_bytes
    assert rows[("out +n", "stacked")]["copies"] == segments
    assert rows[("in after +n", "stacked")]["bytes"] == segments * 28 * row_bytes
    # the SSD tier: the whole sequence out and back (extents round the bytes up to its alignment), against O_DIRECT
    ssd = {(r["op"], r["depth"]): r for r in result["ssd_rows"] if r["runs"] == "address"}
    views = {(r["op"], r["depth"]): r for r in result["ssd_rows"] if r["runs"] == "views"}
    from memfit.llm.kernels.staged_io import staged_io

    depths = {4, 2, 1} if staged_io() is not None else {0}  # the C loop at every depth, or the Python loop
    assert set(ssd) == {(op, d) for op in ("ssd out T", "ssd in T") for d in depths}
    assert all(r["bytes"] >= segments * 24 * row_bytes and r["call_fraction_of_o_direct"] > 0 for r in ssd.values())
    assert all(r["call_fraction_of_o_direct_in_flight"] > 0 for r in ssd.values())
    assert all(ref["in_flight"]["depth"] == 4 and ref["in_flight"]["read_bytes_per_s"] > 0
               for ref in result["ssd_references"])
    assert len({r["bytes"] for r in [*ssd.values(), *views.values()]}) == 1  # the same extents at every depth
    first = 4 if staged_io() is not None else 0  # the views run at the first depth only, beside by address
    assert set(views) == {(op, first) for op in ("ssd out T", "ssd in T")}
    assert set(result["ssd_views_call_time_over_address"]) == {f"tiny T=24 {op}" for op in ("ssd out T", "ssd in T")}
    ops = ("ssd out T", "ssd in T")
    assert set(result["ssd_call_time_over_first_depth"]) == {f"tiny T=24 {op} depth {d}" for op in ops
                                                             for d in depths - {4, 0}}
    assert len(result["ssd_references"]) == 2 and not list(ssd_dir.iterdir())  # the tier's file is gone


def test_the_high_water_modes_swap_into_a_tier_full_of_warm_pages_one_reusing_them_one_faulting_them_again():
    """`full`: the tier's budget is its region's tables and the sequence's chunk, full after every swap-in (warm
    pages); the engine's reservation swaps out again without a page fault, the pre-fix rival (`full-trim`) faults the
    chunk's pages in again (the process's minor faults around the swap-out)."""
    from tests.memory.test_host_region import minor_faults, resident_bytes

    faults = {}
    for mode in swap_tiers.FULL:
        rig = swap_tiers.Rig("0.5b", 128, 4, mode)  # 3 MiB: 768 pages
        _, cache, swap = rig.whole
        rig.cycle()
        pages = resident_bytes(swap.region)
        assert swap.budget.used_bytes == swap.budget.limit_bytes == swap.region.meta_bytes + pages  # full, all warm
        f0 = minor_faults()
        assert swap.try_swap_out(1, 128)
        faults[mode] = minor_faults() - f0
        assert swap.budget.peak_bytes <= swap.budget.limit_bytes and resident_bytes(swap.region) == pages
        cache.free(1)
        assert cache.try_allocate(1, 132) and swap.swap_in(1) == 128
        rig.close()
    assert faults["full"] < 768 // 8 <= 768 // 2 < faults["full-trim"], faults
