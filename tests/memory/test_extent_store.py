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
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SwapSpaceError, match="is a file, not a directory"):  # it said "does not exist"
        ExtentStore(tmp_path / "afile", 1 << 20)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root writes anyway
        with pytest.raises(SwapSpaceError, match="not writable"):
            ExtentStore(ro, 1 << 20)
    with pytest.raises(SwapSpaceError, match="cannot preallocate"):
        ExtentStore(tmp_path, 1 << 60)  # more than any disk here
    assert not any(p.name.endswith(".extents") for p in tmp_path.iterdir())


def _is_direct(store: ExtentStore) -> bool:
    """From the kernel: the open file's status flags (not the store's own word for it)."""
    import fcntl

    return bool(fcntl.fcntl(store.fd, fcntl.F_GETFL) & os.O_DIRECT)


def _round_trip(store: ExtentStore, nbytes: int, by_address: bool = False) -> None:
    """Unaligned memory and sizes, several views each way, more than one STAGE piece when nbytes is large;
    `by_address`: every other run a ByteSpan (its address and length) instead of a view."""
    import ctypes

    from memfit.memory.byte_span import ByteSpan

    def cut(view: memoryview, cuts: list[int]) -> list:
        base = ctypes.addressof(ctypes.c_char.from_buffer(view)) if by_address else 0
        return [ByteSpan(base + a, b - a) if by_address and i % 2 else view[a:b]
                for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]

    data = bytearray(os.urandom(nbytes + 3))
    src = memoryview(data)[3:]  # an address no O_DIRECT write would take as is
    off = store.alloc(nbytes)
    store.write(off, cut(src, sorted([0, 1, 4097, nbytes // 2 + 7, nbytes])))
    back = bytearray(nbytes + 5)
    dst = memoryview(back)[5:]
    store.readinto(off, cut(dst, [0, 3, nbytes // 3, nbytes - 1, nbytes]))
    assert bytes(dst) == bytes(src)
    store.free(off, nbytes)


@pytest.mark.parametrize("direct", [True, False])
def test_runs_by_address_round_trip_through_the_python_loops_as_views_do(tmp_path, direct):
    """ByteSpans (memory/byte_span.py: what the SSD tier gives for KV named by address) beside views, through the
    store's own loops (O_DIRECT staging, or buffered), which make views of them."""
    from memfit.memory.extent_store import STAGE

    store = ExtentStore(tmp_path, 4 * STAGE, direct=direct)
    for nbytes in (5000, 2 * STAGE + 12345):
        _round_trip(store, nbytes, by_address=True)
    store.close()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_o_direct_where_the_file_system_takes_it_round_trips_unaligned_runs_through_staging(tmp_path):
    from memfit.memory.extent_store import STAGE

    store = ExtentStore(tmp_path, 4 * STAGE)
    if not store.direct:
        store.close()
        pytest.skip(f"{tmp_path} refuses O_DIRECT ({store.direct_fallback})")
    assert _is_direct(store) and store.direct_fallback is None
    for nbytes in (5000, 2 * STAGE + 12345):  # one padded piece; three pieces, the last padded
        _round_trip(store, nbytes)
    assert store.direct and _is_direct(store)  # no fallback happened on the way
    store.close()


def test_a_file_system_refusing_o_direct_at_open_gets_buffered_io(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument (injected: as tmpfs before Linux 6.6)")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    store = ExtentStore(tmp_path, 4 * ALIGN)
    assert not store.direct and not _is_direct(store) and "open with O_DIRECT" in store.direct_fallback
    _round_trip(store, 5000)
    store.close()


def test_o_direct_refused_at_the_first_write_falls_back_and_a_later_einval_is_an_error(tmp_path, monkeypatch):
    def refuse(self, offset, views, digest=None, staged=None):
        raise OSError(22, "Invalid argument (injected)")

    store = ExtentStore(tmp_path, 8 * ALIGN)
    if not store.direct:
        store.close()
        pytest.skip(f"{tmp_path} refuses O_DIRECT ({store.direct_fallback})")
    with monkeypatch.context() as m:
        m.setattr(ExtentStore, "_write_direct", refuse)
        _round_trip(store, 5000, by_address=True)  # the first write is refused: the file, reopened buffered, takes it
    assert not store.direct and not _is_direct(store) and "first O_DIRECT write" in store.direct_fallback
    store.close()

    store = ExtentStore(tmp_path, 8 * ALIGN)
    _round_trip(store, 5000)  # a direct write landed: O_DIRECT works here
    monkeypatch.setattr(ExtentStore, "_write_direct", refuse)
    with pytest.raises(OSError):  # so a later EINVAL is an I/O error (the swap falls back), not a mode change
        store.write(store.alloc(100), [memoryview(bytes(100))])
    assert store.direct and _is_direct(store)
    store.close()


def test_buffered_io_when_o_direct_is_not_asked_for(tmp_path):
    store = ExtentStore(tmp_path, 4 * ALIGN, direct=False)
    assert not store.direct and not _is_direct(store) and store.direct_fallback == "not asked for"
    _round_trip(store, 5000)
    store.close()


@pytest.mark.parametrize("direct", [False, True])
def test_more_runs_than_one_gather_call_takes_round_trip(tmp_path, direct):
    """Linux takes at most IOV_MAX (1024) buffers in one pwritev/preadv (more is EINVAL): 2500 runs of 7 bytes, the
    shape of a cut head-major chunk of a large model, go down and come back whole, buffered or through staging."""
    store = ExtentStore(tmp_path, 16 * ALIGN, direct=direct)
    data = os.urandom(2500 * 7)
    off = store.alloc(len(data))
    store.write(off, [memoryview(data)[i : i + 7] for i in range(0, len(data), 7)])
    parts = [bytearray(7) for _ in range(2500)]
    store.readinto(off, [memoryview(p) for p in parts])
    assert b"".join(parts) == data
    store.close()


def _unwritten_bytes(path) -> int | None:
    """Bytes of the file in extents the file system flags unwritten (FIEMAP, as filefrag reads it); None where
    FIEMAP is not answered."""
    import fcntl
    import struct

    count, head, ext = 256, struct.Struct("=QQIIII"), struct.Struct("=QQQQQIIII")  # struct fiemap, fiemap_extent
    buf = bytearray(head.pack(0, 2**64 - 1, 1, 0, count, 0) + bytes(count * ext.size))  # FIEMAP_FLAG_SYNC
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0xC020660B, buf)  # FS_IOC_FIEMAP
    except OSError:
        return None
    finally:
        os.close(fd)
    mapped = head.unpack_from(buf)[3]
    out = 0
    for i in range(mapped):
        _, _, length, _, _, flags, *_ = ext.unpack_from(buf, head.size + i * ext.size)
        out += length if flags & 0x800 else 0  # FIEMAP_EXTENT_UNWRITTEN
    return out


def test_prewrite_leaves_no_unwritten_extent_and_reports_progress(tmp_path, capsys):
    """fallocate leaves the file's extents unwritten (ext4: a first write converts them, 1.4 ms vs 0.2 ms);
    prewrite writes zeros over all of it at start, so the file system has no unwritten extent left."""
    from memfit.memory.extent_store import STAGE

    plain = ExtentStore(tmp_path, 3 * STAGE + ALIGN)
    before = _unwritten_bytes(plain.path)
    plain.close()
    if not before:
        pytest.skip(f"{tmp_path}: fallocate leaves no unwritten extents here (or FIEMAP unanswered)")
    store = ExtentStore(tmp_path, 3 * STAGE + ALIGN, prewrite=True)
    assert _unwritten_bytes(store.path) == 0
    assert "100% written" in capsys.readouterr().err
    data = bytes(range(256)) * 40
    off = store.alloc(len(data))
    store.write(off, [memoryview(data)])
    back = bytearray(len(data))
    store.readinto(off, [memoryview(back)])
    assert bytes(back) == data
    store.close()
