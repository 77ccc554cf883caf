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
                              "--ssd-dir", str(ssd_dir), "--modes", "stacked", "runs", "region"])
    assert json.loads(capsys.readouterr().out) == result == json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    rows = {(r["op"], r["mode"]): r for r in result["rows"]}
    assert {op for op, _ in rows} == set(swap_tiers.OPS) and {m for _, m in rows} == set(swap_tiers.MODES)
    layers, heads, dim, _ = swap_tiers.SHAPES["tiny"]
    row_bytes = heads * dim * 2  # bf16: one token's K (or V) of one layer
    segments = 2 * layers
    for op in swap_tiers.OPS:
        a, b, c = rows[(op, "runs")], rows[(op, "stacked")], rows[(op, "region")]
        assert a["bytes"] == b["bytes"] == c["bytes"] and a["copies"] == b["copies"] == c["copies"]
        assert a["call_fraction_of_memcpy"] > 0 and b["call_fraction_of_memcpy"] > 0 and c["call_fraction_of_memcpy"] > 0
    assert set(result["stacked_over_region_call_time"]) == {f"tiny T=24 {op}" for op in swap_tiers.OPS}
    # counted independently from the shape: whole swaps move 24 tokens of every segment, the reuse swap-out 4
    assert rows[("out T", "stacked")]["bytes"] == rows[("in T", "stacked")]["bytes"] == segments * 24 * row_bytes
    assert rows[("out +n", "stacked")]["bytes"] == segments * 4 * row_bytes
    assert rows[("out +n", "stacked")]["copies"] == segments
    assert rows[("in after +n", "stacked")]["bytes"] == segments * 28 * row_bytes
    # the SSD tier: the whole sequence out and back (extents round the bytes up to its alignment), against O_DIRECT
    ssd = {r["op"]: r for r in result["ssd_rows"]}
    assert set(ssd) == {"ssd out T", "ssd in T"}
    assert all(r["bytes"] >= segments * 24 * row_bytes and r["call_fraction_of_o_direct"] > 0 for r in ssd.values())
    assert len(result["ssd_references"]) == 2 and not list(ssd_dir.iterdir())  # the tier's file is gone
