"""The SSD tier's free-space map, checked against an independent model: a byte-per-block occupancy array."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.memory.extent_map import ALIGN, ExtentMap, extent_bytes, segment_offsets

BLOCKS = 64


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9 * ALIGN), st.integers(0, 1 << 30)), max_size=60))
def test_allocations_never_overlap_and_free_space_is_exactly_what_is_not_held(ops):
    space = ExtentMap(BLOCKS * ALIGN)
    held: dict[int, int] = {}  # offset -> nbytes asked for
    occupied = np.zeros(BLOCKS, dtype=np.int8)  # the model: which ALIGN blocks are held
    for is_alloc, nbytes, pick in ops:
        if is_alloc or not held:
            off = space.alloc(nbytes)
            need = extent_bytes(nbytes) // ALIGN
            runs = np.convolve(occupied == 0, np.ones(need, dtype=int), "valid") == need if need <= BLOCKS else []
            first_fit = int(np.argmax(runs)) if len(runs) and runs.any() else None
            if off is None:
                assert first_fit is None  # refused only when no free run of that many blocks exists
                continue
            assert off % ALIGN == 0 and off // ALIGN == first_fit
            assert not occupied[off // ALIGN : off // ALIGN + need].any()
            occupied[off // ALIGN : off // ALIGN + need] = 1
            held[off] = nbytes
        else:
            off = sorted(held)[pick % len(held)]
            nbytes = held.pop(off)
            space.free(off, nbytes)
            occupied[off // ALIGN : off // ALIGN + extent_bytes(nbytes) // ALIGN] = 0
        assert space.used_bytes == int(occupied.sum()) * ALIGN
        # free extents are exactly the maximal runs of free blocks: coalesced, sorted, none empty
        free_runs, start = [], None
        for i, b in enumerate(list(occupied) + [1]):
            if not b and start is None:
                start = i
            elif b and start is not None:
                free_runs.append((start * ALIGN, (i - start) * ALIGN))
                start = None
        assert space.free_extents == free_runs


def test_freeing_what_is_free_is_refused_and_changes_nothing():
    space = ExtentMap(8 * ALIGN)
    a = space.alloc(ALIGN)
    space.free(a, ALIGN)
    with pytest.raises(ValueError, match="free already"):
        space.free(a, ALIGN)
    b = space.alloc(3 * ALIGN)
    with pytest.raises(ValueError, match="free already"):
        space.free(b + 2 * ALIGN, 2 * ALIGN)  # runs past the held extent into free space
    assert space.used_bytes == 3 * ALIGN and space.free_extents == [(3 * ALIGN, 5 * ALIGN)]


def test_segments_laid_out_from_one_allocation_start_on_block_boundaries():
    sizes = [1, ALIGN, ALIGN + 1, 5000]
    offs = segment_offsets(10 * ALIGN, sizes)
    assert offs == [10 * ALIGN, 11 * ALIGN, 12 * ALIGN, 14 * ALIGN]
    assert offs[-1] + extent_bytes(sizes[-1]) - offs[0] == sum(extent_bytes(n) for n in sizes)
