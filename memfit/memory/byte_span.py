"""Bytes named by address: a run the SSD tier's C loop reads or writes through a pointer, no view made.

    span = ByteSpan(tensor.data_ptr(), tensor.numel())    # or SwapRuns.addresses (kv/swap_layout.py)
    store.write(offset, [span, ...], staged=...)          # memory/extent_store.py takes them beside memoryviews

Why: a swap of a sequence's KV names 2 x layers runs (48 at the 0.5B shape), and making each a torch view, a
memoryview of it and a numpy array for its pointer cost about 7 us a run, a third of a 1.5 MiB swap to the SSD tier
(benchmarks/swap_tiers.py --ssd-views: 1.03 against 0.68 ms out, 1.29 against 0.95 ms in). The C loop only wants the
pointer and the length, which the cache's layout gives by arithmetic. The memory must stay mapped until the call
returns: the caller keeps the cache (or the buffer the address came from) open meanwhile, as for `RowBlock`.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple, Union

__all__ = ["ByteRun", "ByteSpan", "as_view"]


class ByteSpan(NamedTuple):
    address: int
    nbytes: int

    def view(self) -> memoryview:
        """The bytes as a writable memoryview (the store's Python loops, where the C loop does not run)."""
        return memoryview((ctypes.c_ubyte * self.nbytes).from_address(self.address)).cast("B")


ByteRun = Union[memoryview, ByteSpan]  # what the store's I/O takes: a view, or bytes by address (`.nbytes`: both)


def as_view(run: ByteRun) -> memoryview:
    """`run` as a byte memoryview."""
    return run.view() if isinstance(run, ByteSpan) else run.cast("B")
