"""benchmarks/swap_cold.py runs both parts and reports what it timed: every call cold and warm, both copy modes'
swaps (each round's swap-in restores what its swap-out held: swap_in returns the tokens, asserted inside)."""
from __future__ import annotations

import torch

from benchmarks.swap_cold import calls, swaps
from tests.llm.kv.test_swap_layout import count_row_moves


def test_calls_and_swaps_report_both_modes(monkeypatch):
    flush = torch.zeros(4 << 20, dtype=torch.uint8)
    got = calls(flush, reps=1)
    assert set(got) == {"torch_slice", "as_strided", "np_count_nonzero", "strided_copy_48x24KiB", "memmove_48x24KiB",
                        "copy_rows_48x24KiB"}
    assert all(v["cold_us"] > 0 and v["warm_us"] > 0 for v in got.values())
    moves = count_row_moves(monkeypatch)
    s = swaps(flush, held=32, new=8, rounds=2)
    assert set(s["median_us"]) == {"views", "address-memmove", "address"}
    assert all(t > 0 for m in s["median_us"].values() for t in m.values())
    assert moves[0] > 0  # the address mode did copy rows by address
