"""benchmarks/finetune_context: the budget is the chosen reference design's peak at --budget-seq tokens, and each
design's ladder stops at the first point past it (training steps replaced by a table of peaks)."""
from __future__ import annotations

from pathlib import Path

import pytest

import benchmarks.finetune_context as fc

MiB = 2**20
# peak RSS (MiB) per design and sequence length: zero-infinity holds more than its tuned version at every length
PEAKS = {"zero-infinity": {2048: 5000, 4096: 6000},
         "zero-infinity-tuned": {2048: 3000, 4096: 3500},
         "memascend": {2048: 1000, 4096: 1500, 8192: 2900, 16384: 4500}}


@pytest.fixture
def calls(monkeypatch):
    seen: list[tuple[str, int, int]] = []

    def one_step(design, shape, seq_len, data, threads, ssd_dir, batch=1):
        seen.append((design, seq_len, batch))
        return {"seq_len": seq_len, "batch_size": batch, "peak_rss_bytes": PEAKS[design][seq_len] * MiB}

    monkeypatch.setattr(fc, "one_step", one_step)
    monkeypatch.setattr(fc, "long_conversations", lambda src, out, min_tokens, n=2: out)
    monkeypatch.setattr(fc, "emit", lambda result, out=None, draw=None: "")
    return seen


def test_the_tuned_reference_sets_the_budget_and_the_factor(calls):
    r = fc.main(["--shape", "0.1b", "--reference", "zero-infinity-tuned", "--max-factor", "16"])
    # the first run is the reference's own point, and its peak is the budget (not zero-infinity's 5000 MiB)
    assert calls[0] == ("zero-infinity-tuned", 2048, 1)
    assert r["reference"] == "zero-infinity-tuned" and r["budget_bytes"] == 3000 * MiB
    assert set(r["designs"]) == {"zero-infinity-tuned", "memascend"}
    assert "zero-infinity" not in {d for d, _, _ in calls}
    # 8192 x 1 (2900 MiB) fits in 3000 MiB, 16384 (4500) does not, and the ladder stops there
    assert r["designs"]["memascend"]["largest_within_budget"] == 8192
    assert [p["seq_len"] for p in r["designs"]["memascend"]["points"]] == [2048, 4096, 8192, 16384]
    assert r["designs"]["zero-infinity-tuned"]["largest_within_budget"] == 2048
    assert r["memascend_factor"] == 4.0


def test_the_default_reference_is_zero_infinity_at_defaults(calls):
    r = fc.main(["--shape", "0.1b", "--max-factor", "8"])
    assert calls[0] == ("zero-infinity", 2048, 1) and r["budget_bytes"] == 5000 * MiB
    # in zero-infinity's larger budget memascend reaches 16384 (4500 <= 5000): the ladder's end (8x), so capped
    assert r["designs"]["memascend"]["largest_within_budget"] == 16384 and r["designs"]["memascend"]["capped"]
    assert r["memascend_factor"] == 8.0


def test_an_unknown_design_is_refused(calls):
    with pytest.raises(SystemExit):
        fc.main(["--designs", "zero-infinity-tuned,memascend2"])
    assert calls == []  # refused before any run


def test_the_ladder_stops_at_a_failed_point():
    points = {2048: {"seq_len": 2048, "batch_size": 1, "peak_rss_bytes": 10},
              4096: {"seq_len": 4096, "batch_size": 1, "failed": "exit -9"}}
    run = fc.ladder("memascend", 100, 2048, "seq", 16, lambda seq, batch: points[seq])
    assert run["largest_within_budget"] == 2048 and run["factor"] == 1.0 and not run["capped"]
    assert len(run["points"]) == 2
