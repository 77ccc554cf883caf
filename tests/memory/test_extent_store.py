"""ExtentStore: one preallocated file, first-fit extents that coalesce on free, positioned I/O that reads back what
was written, and clear errors for a directory that cannot hold the tier."""
import os

import pytest

from memfit.memory.aio import SwapSpaceError
from memfit.memory.extent_store import ALIGN, ExtentStore


def test_extents_are_first_fit_aligned_and_coalesce_on_free(tmp_path):
    store = ExtentStore(tmp_path, 8 * ALIGN)
    assert os.stat(store.path).st_blocks * 512 >= 8 * ALIGN  # the blocks are allocated up front
    a, b, c = store.alloc(ALIGN), store.alloc(2 * ALIGN + 1), store.alloc(ALIGN)
    assert (a, b, c) == (0, ALIGN, 4 * ALIGN) and store.used_bytes == 5 * ALIGN
    assert store.alloc(4 * ALIGN) is None  # 3 units left
    store.free(b, 2 * ALIGN + 1)
    store.free(a, ALIGN)  # merges with b's extent
    assert store.free_extents == [(0, 4 * ALIGN), (5 * ALIGN, 3 * ALIGN)]
    store.free(c, ALIGN)
    assert store.free_extents == [(0, 8 * ALIGN)] and store.used_bytes == 0
    with pytest.raises(ValueError, match="free already"):
        store.free(0, ALIGN)
    store.close()
    assert not store.path.exists()


def test_write_then_scatter_read_returns_the_bytes(tmp_path):
    store = ExtentStore(tmp_path, 4 * ALIGN)
    data = bytes(range(256)) * 20  # 5120 bytes: two units
    off = store.alloc(len(data))
    store.write(off, [memoryview(data[:100]), memoryview(data[100:])])
    parts = [bytearray(1000), bytearray(len(data) - 1000)]
    store.readinto(off, [memoryview(p) for p in parts])
    assert bytes(parts[0] + parts[1]) == data
    with pytest.raises(OSError):
        store.readinto(store.capacity - 10, [memoryview(bytearray(100))])  # past the end: a short read
    store.close()


def test_a_directory_that_cannot_hold_the_tier_is_refused_clearly(tmp_path):
    with pytest.raises(SwapSpaceError, match="does not exist"):
        ExtentStore(tmp_path / "missing", 1 << 20)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root writes anyway
        with pytest.raises(SwapSpaceError, match="not writable"):
            ExtentStore(ro, 1 << 20)
    with pytest.raises(SwapSpaceError, match="cannot preallocate"):
        ExtentStore(tmp_path, 1 << 60)  # more than any disk here
    assert not any(p.name.endswith(".extents") for p in tmp_path.iterdir())
