"""The C O_DIRECT loops (kernels/staged_io.py): the same bytes on disk as the store's Python loop, runs of odd
sizes across several staging pieces read back exactly, CRC-32C of the data, and errors as OSError, at every
depth (quarter- or half-stage I/Os in flight, or one whole-stage I/O at a time)."""
from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest

from memfit.llm.kernels.crc32c import crc32c
from memfit.llm.kernels.staged_io import staged_io
from memfit.memory.extent_store import ALIGN, ExtentStore

pytestmark = pytest.mark.skipif(staged_io() is None, reason="memfit's C++ kernels cannot run here")
SIZES = [1, 4095, 9000, 0, 12288, 333]  # 25717 bytes: with an 8 KiB stage, pieces cross runs


def runs() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in SIZES]


@pytest.fixture(params=[2, 1, 4], ids=["depth2", "depth1", "depth4"])
def depth(request):
    """The C loop at each depth (4, 2: the stage's quarters or halves take turns, one gathered or scattered while
    the others' I/Os are in flight; 1: one whole-stage I/O at a time), the process-wide setting restored after."""
    io = staged_io()
    before = io.set_depth(request.param)
    yield request.param
    io.set_depth(before)


def on_disk(store: ExtentStore, offset: int, n: int) -> bytes:
    fd = os.open(store.path, os.O_RDONLY)  # buffered: a second view of what the store wrote
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("stage_bytes", [2 * ALIGN, 4 * ALIGN, 64 * ALIGN])
def test_the_c_loop_writes_what_the_python_loop_writes_and_reads_it_back(tmp_path, stage_bytes, depth):
    io = staged_io()
    store = ExtentStore(tmp_path, 64 * ALIGN)
    data = runs()
    n = sum(r.size for r in data)
    py_off, c_off = store.alloc(n), store.alloc(n)
    store.write(py_off, [memoryview(r) for r in data])  # the Python loop (O_DIRECT or buffered, as the fs allows)
    stage = np.frombuffer(mmap.mmap(-1, stage_bytes), dtype=np.uint8)
    crc, seconds = io.write(store.fd, c_off, stage, [memoryview(r) for r in data], ALIGN)
    padded = -(-n // ALIGN) * ALIGN
    assert on_disk(store, c_off, padded) == on_disk(store, py_off, padded)  # data, then zero padding
    assert on_disk(store, c_off, n) == b"".join(r.tobytes() for r in data)
    assert crc == crc32c(b"".join(r.tobytes() for r in data)) and seconds >= 0
    back = [np.zeros_like(r) for r in data]
    crc_in, _ = io.read(store.fd, c_off, stage, [memoryview(b) for b in back], ALIGN)
    assert all(np.array_equal(a, b) for a, b in zip(back, data)) and crc_in == crc
    store.close()


def test_errors_come_back_as_oserror(tmp_path, depth):
    io = staged_io()
    stage = np.frombuffer(mmap.mmap(-1, 8 * ALIGN), dtype=np.uint8)  # 7 blocks of runs: several pieces at depths 2, 4
    data = runs()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        io.write(w, 0, stage, [memoryview(x) for x in data], ALIGN)  # a closed descriptor
    assert info.value.errno == errno.EBADF
    store = ExtentStore(tmp_path, 4 * ALIGN)
    with pytest.raises(OSError) as info:  # past the end of the file: a read that cannot be filled
        io.read(store.fd, 4 * ALIGN, stage, [memoryview(np.zeros(100, dtype=np.uint8))], ALIGN)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError) as info:  # 6 blocks, the last 2 past the end: a later piece fails, others in flight
        io.read(store.fd, 0, stage, [memoryview(np.zeros(6 * ALIGN, dtype=np.uint8))], ALIGN)
    assert info.value.errno == errno.EIO
    store.close()


def test_a_write_that_fails_midway_comes_back_as_oserror_after_the_pieces_before_it(tmp_path, depth):
    """The file may not grow past 3 blocks (RLIMIT_FSIZE, in a forked child): a 7-block write through a 4-block
    stage fails at its fourth block (at depth 4 submitted while the third may still be in flight; at depths 2 and 1
    a short write first) and comes back as EFBIG, with the three blocks before the limit whole on disk, read in the
    child as soon as the call returns.
    The child writes from a thread of its own, whose AIO context is the child's. (Whether the call waited for the
    third block's write before returning is not observable here: on this disk it is done by then either way.)"""
    import resource
    import signal
    import threading

    io = staged_io()
    path = tmp_path / "limited"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except (AttributeError, OSError):
        pytest.skip("this file system refuses O_DIRECT")
    data = runs()
    raw = b"".join(r.tobytes() for r in data)
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        code = [1]

        def write() -> None:
            stage = np.frombuffer(mmap.mmap(-1, 4 * ALIGN), dtype=np.uint8)
            try:
                io.write(fd, 0, stage, [memoryview(r) for r in data], ALIGN)
            except OSError as exc:
                code[0] = 2 if exc.errno != errno.EFBIG else 0 if path.read_bytes() == raw[: 3 * ALIGN] else 3

        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's default (core dump)
            resource.setrlimit(resource.RLIMIT_FSIZE, (3 * ALIGN, 3 * ALIGN))
            t = threading.Thread(target=write)
            t.start()
            t.join()
        finally:
            os._exit(code[0])
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # 2: another error, 3: blocks missing


@pytest.mark.parametrize("stage_bytes", [2 * ALIGN, 8 * ALIGN, 64 * ALIGN])
def test_several_extents_in_one_call_lie_one_after_another_each_with_its_own_crc(tmp_path, stage_bytes, depth):
    """Segments (one extent's runs each) written in one call land at segment_offsets: each from an ALIGN boundary,
    the one before padded with zeros (an empty one takes a block), each with the CRC-32C of its own data; read back
    in one call, every run gets its bytes and the CRCs match. With a 2-block stage the I/Os cross extents."""
    from memfit.memory.extent_store import extent_bytes, segment_offsets

    io = staged_io()
    store = ExtentStore(tmp_path, 64 * ALIGN)
    data = runs()
    segments = [data[:2], [], data[2:5], data[5:]]  # 4096 | empty | 21288 | 333 bytes
    sizes = [sum(r.size for r in seg) for seg in segments]
    off = store.alloc(sum(extent_bytes(n) for n in sizes))
    stage = np.frombuffer(mmap.mmap(-1, stage_bytes), dtype=np.uint8)
    crcs, seconds, io_seconds = io.write_segments(store.fd, off, stage, [[memoryview(r) for r in s] for s in segments],
                                                  ALIGN)
    assert 0 <= io_seconds <= seconds
    for at, n, seg, crc in zip(segment_offsets(off, sizes), sizes, segments, crcs):
        raw = b"".join(r.tobytes() for r in seg)
        assert on_disk(store, at, extent_bytes(n)) == raw + bytes(extent_bytes(n) - n)  # data, then zeros
        assert crc == crc32c(raw)
    back = [[np.zeros_like(r) for r in seg] for seg in segments]
    crcs_in, _, _ = io.read_segments(store.fd, off, stage, [[memoryview(b) for b in s] for s in back], ALIGN)
    assert crcs_in == crcs
    assert all(np.array_equal(a, b) for sa, sb in zip(back, segments) for a, b in zip(sa, sb))
    # one extent read on its own (where it lies) gives the same bytes as the whole group did
    third = [np.zeros_like(r) for r in segments[2]]
    crc3, _ = io.read(store.fd, segment_offsets(off, sizes)[2], stage, [memoryview(b) for b in third], ALIGN)
    assert crc3 == crcs[2] and all(np.array_equal(a, b) for a, b in zip(third, segments[2]))
    store.close()


def test_runs_by_address_are_the_same_bytes_on_disk_and_back_as_views(tmp_path, depth):
    """ByteSpans (an address and a length: the SSD tier's KV runs, kv/swap_layout.py `addresses`) mixed with
    views in one call: the file holds what views alone write, with the same CRCs, and a read by address fills
    the very memory named."""
    from memfit.memory.byte_span import ByteSpan
    from memfit.memory.extent_store import extent_bytes

    io = staged_io()
    store = ExtentStore(tmp_path, 64 * ALIGN)
    data = runs()
    segments = [data[:3], data[3:]]
    sizes = [sum(r.size for r in seg) for seg in segments]
    off_v, off_a = (store.alloc(sum(extent_bytes(n) for n in sizes)) for _ in range(2))
    stage = np.frombuffer(mmap.mmap(-1, 8 * ALIGN), dtype=np.uint8)

    def named(seg: list[np.ndarray]) -> list:  # every other run by address
        return [ByteSpan(r.ctypes.data, r.size) if i % 2 else memoryview(r) for i, r in enumerate(seg)]
    crcs_v, _, _ = io.write_segments(store.fd, off_v, stage, [[memoryview(r) for r in s] for s in segments], ALIGN)
    crcs_a, _, _ = io.write_segments(store.fd, off_a, stage, [named(s) for s in segments], ALIGN)
    total = sum(extent_bytes(n) for n in sizes)
    assert crcs_a == crcs_v and on_disk(store, off_a, total) == on_disk(store, off_v, total)
    back = [[np.zeros_like(r) for r in seg] for seg in segments]
    crcs_in, _, _ = io.read_segments(store.fd, off_a, stage,
                                     [[ByteSpan(b.ctypes.data, b.size) for b in s] for s in back], ALIGN)
    assert crcs_in == crcs_v
    assert all(np.array_equal(a, b) for sa, sb in zip(back, segments) for a, b in zip(sa, sb))
    store.close()


@pytest.mark.parametrize("stage_bytes", [2 * ALIGN, 8 * ALIGN, 64 * ALIGN])
def test_extents_from_anywhere_in_the_file_read_back_in_one_call(tmp_path, stage_bytes, depth):
    """read_at: segments from extents scattered over the file, out of file order, some adjacent (one I/O) and
    some not (submitted together): every run gets its bytes and each segment its own CRC; an extent past the end
    of the file is an error, not a short read served."""
    io = staged_io()
    store = ExtentStore(tmp_path, 64 * ALIGN)
    data = runs()
    segments = [data[:2], data[2:4], [], data[4:]]  # 4096 | 9000 | empty | 12621 bytes
    stage = np.frombuffer(mmap.mmap(-1, stage_bytes), dtype=np.uint8)
    offsets, crcs = [40 * ALIGN, 8 * ALIGN, 11 * ALIGN, 1 * ALIGN], []  # 8 and 11: one after the other in the file
    for off, seg in zip(offsets, segments):
        crc, _ = io.write(store.fd, off, stage, [memoryview(r) for r in seg], ALIGN)
        crcs.append(crc)
    back = [[np.zeros_like(r) for r in seg] for seg in segments]
    got, seconds, io_seconds = io.read_at(store.fd, offsets, stage, [[memoryview(b) for b in s] for s in back], ALIGN)
    assert got == crcs == [crc32c(b"".join(r.tobytes() for r in seg)) for seg in segments]
    assert all(np.array_equal(a, b) for sa, sb in zip(back, segments) for a, b in zip(sa, sb))
    assert 0 <= io_seconds <= seconds
    with pytest.raises(OSError) as info:  # the second extent lies past the end of the file
        io.read_at(store.fd, [8 * ALIGN, 64 * ALIGN], stage, [[memoryview(np.zeros(100, dtype=np.uint8))]] * 2, ALIGN)
    assert info.value.errno == errno.EIO
    store.close()


def test_a_forked_child_reads_scattered_extents_too(tmp_path, depth):
    """The AIO context a thread keeps is its process's: in a child forked after the parent used it, read_at still
    reads right (a new context, or preads), instead of failing every swap-in."""
    io = staged_io()
    store = ExtentStore(tmp_path, 16 * ALIGN)
    data = runs()
    stage = np.frombuffer(mmap.mmap(-1, 4 * ALIGN), dtype=np.uint8)  # 2 blocks of extents: two 1-block quarters
    # at depth 4 (at depth 2 they fit one 2-block half: one piece, as at depth 1)
    offsets = [8 * ALIGN, 1 * ALIGN]
    for off, seg in zip(offsets, [data[:2], data[5:]]):
        io.write(store.fd, off, stage, [memoryview(r) for r in seg], ALIGN)

    def read_ok() -> bool:
        back = [[np.zeros_like(r) for r in seg] for seg in (data[:2], data[5:])]
        io.read_at(store.fd, offsets, stage, [[memoryview(b) for b in s] for s in back], ALIGN)
        return all(np.array_equal(a, b) for sa, sb in zip(back, (data[:2], data[5:])) for a, b in zip(sa, sb))

    assert read_ok()  # the parent's thread now holds a context
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only
        ok = False
        try:
            ok = read_ok() and read_ok()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert read_ok()
    store.close()


def test_each_reading_thread_holds_one_aio_ring_of_the_size_the_ledger_counts(tmp_path, request):
    """A thread's first scattered read sets up its AIO context; the kernel maps its completion ring into the
    process ("/[aio] (deleted)" in /proc/self/maps) until the thread exits. Its size, read from the kernel's map,
    is what aio_ring_bytes predicts (and what the engine's ledger reserves per SSD I/O thread). Run in a process
    of its own: the rings are counted process-wide, and in the full suite another test's I/O thread could set one
    up inside this test's window (CI once saw two new rings of 20480 bytes here)."""
    import threading

    from tests.llm.engine.test_arena_ledger import in_own_process

    if in_own_process(request):
        return

    from memfit.llm.kernels.staged_io import aio_ring_bytes
    from tests.llm.engine.test_swap_tiers import aio_mappings

    io = staged_io()
    store = ExtentStore(tmp_path, 64 * ALIGN)
    stage = np.frombuffer(mmap.mmap(-1, 8 * ALIGN), dtype=np.uint8)
    for off in (2 * ALIGN, 20 * ALIGN):
        io.write(store.fd, off, stage, [memoryview(np.full(100, 7, dtype=np.uint8))], ALIGN)
    read, done, seen = threading.Event(), threading.Event(), {}

    def reader() -> None:
        own = np.frombuffer(mmap.mmap(-1, 8 * ALIGN), dtype=np.uint8)
        io.read_at(store.fd, [20 * ALIGN, 2 * ALIGN], own, [[memoryview(np.zeros(100, dtype=np.uint8))]] * 2, ALIGN)
        read.set()
        done.wait(30)

    before = aio_mappings()
    t = threading.Thread(target=reader)
    t.start()
    assert read.wait(30)
    seen["during"] = aio_mappings()
    done.set()
    t.join()
    new = sorted(seen["during"])
    for size in before:
        new.remove(size)
    if not new:
        pytest.skip("this kernel gave the thread no AIO context (io_setup refused): preads were used")
    assert new == [aio_ring_bytes()]
    assert sorted(aio_mappings()) == sorted(before)  # given back with the thread
    store.close()


def test_the_depth_is_1_2_or_4_and_set_process_wide():
    io = staged_io()
    before = io.depth
    try:
        assert io.set_depth(1) == before and io.depth == 1
        assert io.set_depth(2) == 1 and io.depth == 2
        assert io.set_depth(4) == 2 and io.depth == 4 and io.set_depth(2) == 4
        for bad in (0, 3, 5, -1):
            with pytest.raises(ValueError, match="depth must be 1, 2 or 4"):
                io.set_depth(bad)
        assert io.depth == 2
    finally:
        io.set_depth(before)
