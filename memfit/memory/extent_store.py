"""A preallocated file carved into extents: the SSD tier's storage for whole runs of swapped KV.

    store = ExtentStore(Path("/nvme/memfit"), 64 << 30)   # one file, its blocks allocated now, O_DIRECT if allowed
    off = store.alloc(nbytes)                               # None when no free extent is large enough
    store.write(off, memoryview(...)); store.readinto(off, [memoryview(...), ...]); store.free(off, nbytes)

Why one preallocated file rather than a file per run: the space is taken once, at start (`posix_fallocate`), so
a disk that cannot hold the tier fails then, with a clear error, instead of in the middle of a swap; a swap does
no file-system allocation or metadata work (no create, no unlink, no extent growth), only one positioned write
of the whole run; and a crash leaves one file to clean, not thousands. The price is an allocator: first fit
over free extents, coalescing neighbours on free (extent_map.py), in `ALIGN`-byte units. Several extents written
together are placed as one (`segment_offsets`) and written and read back in one pass (`write_segments`,
`readinto_segments`): fewer, larger I/Os; each is still freed on its own.

I/O is `os.pwritev` / `os.preadv` (both release the GIL, so reads on the swap thread pool overlap the model
step); a short write is continued, a short read is an error.

O_DIRECT (`direct`, on by default): the file is opened with it where the file system allows, so swapped KV goes to
the disk without a second copy in the page cache (that copy would be RAM, the very thing the tier exists to free,
and the kernel would account it to whoever runs the engine). O_DIRECT wants the file offset, the length and the
buffer's address aligned: extents start and end on `ALIGN`, and the KV runs (unaligned tensor memory) go through
a page-aligned staging buffer of `STAGE` bytes (an anonymous mmap; direct_staging.py): in this Python loop one
`STAGE`-sized write or read at a time (the C loop, kernels/staged_io.py, cuts it in pieces, several in flight);
the gather into it and the scatter out of it are numpy copies, which release the GIL too. The buffers are a pool
of at most `max_stages` (one per thread that may do I/O at once: the engine thread and each swap thread), made
on first use and kept with the store; an I/O that finds them all in use waits for one. `staging_bytes` is what
the pool may hold, the figure the engine reserves in its ledger (engine/ledger.py), and `on_fallback` is called
once if O_DIRECT is given up, when that memory is no longer needed. A file system
that refuses O_DIRECT (EINVAL at open, or at the first write: some accept the flag and refuse the I/O) gets the
buffered path above, writing from and reading into the runs themselves; `direct` says which is in use and
`direct_fallback` why it is not.

`prewrite` (off by default): after `posix_fallocate`, write zeros over the whole file once, through a staging
buffer, with progress on stderr. fallocate leaves ext4 extents "unwritten", and the first write into one converts
it (a journalled metadata update): measured here, 1.4 ms for a first ~150 KB write against 0.2 ms for a rewrite.
Prewriting pays that once at start, at the disk's sequential bandwidth, instead of in the first swaps.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from memfit.memory.aio import SwapSpaceError
from memfit.memory.budget import format_bytes
from memfit.memory.byte_span import ByteRun, ByteSpan, as_view
from memfit.memory.direct_staging import STAGE, Digest, StagingPool, read_direct, write_direct
from memfit.memory.extent_map import ALIGN, ExtentMap, extent_bytes, segment_offsets

log = logging.getLogger(__name__)

# extent_map's and direct_staging's names that callers of the store use, re-exported from here
__all__ = ["ALIGN", "STAGE", "ExtentStore", "Staged", "extent_bytes", "segment_offsets"]

# (fd, the extents' offsets, staging buffer, segments: each one extent's runs, byte views or ByteSpans by
# address, memory/byte_span.py): one I/O loop over several extents
Staged = Callable[[int, list[int], np.ndarray, list[list[ByteRun]]], None]

# The most buffers one pwritev/preadv takes (Linux: 1024; more is EINVAL): a head-major chunk of a large model, or
# a chunk cut at its valid tokens, can have more runs, so the buffered I/O goes a group of this many at a time
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def _laid_out(offsets: int | list[int], segments: list[list[ByteRun]],
              digests: list[Callable[[memoryview], None] | None] | None
              ) -> tuple[list[list[ByteRun]], list[Callable[[memoryview], None] | None], list[int]]:
    """Segments as byte runs (views cast to bytes; ByteSpans as they are, for `staged`: the Python loops make
    views of them, `as_view`), a digest slot per segment, and each segment's extent offset: the given list, or
    from one offset, laid out one after another as `segment_offsets` places them."""
    segs = [[b if isinstance(b, ByteSpan) else b.cast("B") for b in seg] for seg in segments]
    offs = offsets if isinstance(offsets, list) else segment_offsets(offsets, [sum(b.nbytes for b in seg) for seg in segs])
    return segs, digests or [None] * len(segs), offs


class ExtentStore(ExtentMap):
    """The file and its I/O; `alloc`, `free`, `free_extents` and `used_bytes` are the free space's (ExtentMap)."""

    def __init__(self, directory: str | Path, capacity: int, name: str | None = None, direct: bool = True,
                 max_stages: int = 1, prewrite: bool = False) -> None:
        directory = Path(directory)
        if max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {max_stages}")
        if capacity < ALIGN:
            raise SwapSpaceError(f"an SSD swap space of {format_bytes(capacity)} cannot hold one {ALIGN}-byte extent")
        if directory.exists() and not directory.is_dir():
            raise SwapSpaceError(f"the SSD swap directory {directory} is a file, not a directory; choose a directory")
        if not directory.is_dir():
            raise SwapSpaceError(f"the SSD swap directory {directory} does not exist; create it or choose another")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SwapSpaceError(f"the SSD swap directory {directory} is not writable; choose another")
        ExtentMap.__init__(self, capacity)
        self.path = directory / (name or f"memfit-kv-swap-{os.getpid()}-{id(self):x}.extents")
        self.direct, self.direct_fallback = False, None if direct else "not asked for"
        self._direct_proven = False  # a direct write succeeded: a later EINVAL is an I/O error, not a fallback
        self.max_stages = max_stages
        self._pool = StagingPool(max_stages)
        self.on_fallback: Callable[[], None] | None = None  # called once if O_DIRECT is given up
        self._lock = threading.Lock()  # writes run on the engine thread and the swap pool: one fallback
        self._old_fds: list[int] = []  # O_DIRECT descriptors replaced by a fallback (another write may be using one)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd, self.direct = os.open(self.path, flags | os.O_DIRECT, 0o600), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # os.access can pass where open fails (root on a read-only mount)
                    raise SwapSpaceError(f"cannot create the SSD swap file in {directory} ({exc.strerror or exc}); "
                                         "choose another directory") from None
                self._fall_back(f"open with O_DIRECT: {exc.strerror}")
        elif direct:
            self.direct_fallback = "O_DIRECT is not available on this platform"
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, flags, 0o600)
            except OSError as exc:
                raise SwapSpaceError(f"cannot create the SSD swap file in {directory} ({exc.strerror or exc}); "
                                     "choose another directory") from None
        try:
            os.posix_fallocate(self.fd, 0, self.capacity)
        except OSError as exc:
            self._remove()
            raise SwapSpaceError(f"cannot preallocate {format_bytes(self.capacity)} in {directory} ({exc.strerror}); "
                                 "free space there or lower --swap-ssd-space") from None
        if prewrite:
            self._prewrite()

    # ---- I/O ------------------------------------------------------------------------------------------
    def write(self, offset: int, buffers: list[ByteRun], digest: Callable[[memoryview], None] | None = None,
              staged: Staged | None = None) -> None:
        """Write `buffers`, in order, from `offset` (an extent's start): through the staging buffer with O_DIRECT,
        else one gather write (a short write is continued). OSError as the OS raises it. `digest` is called on
        the bytes, in order, as they go out: on each staged piece while it is still in the CPU's caches (a
        checksum then costs no second pass over the source memory), or on the buffers. `staged(fd, offset, stage,
        segments)`: the caller's own O_DIRECT loop (the same bytes on disk, in one call that releases the GIL once,
        kernels/staged_io.py; it checksums by itself, so `digest` then runs only if the store falls back)."""
        self.write_segments(offset, [buffers], [digest], staged)

    def write_segments(self, offset: int, segments: list[list[ByteRun]],
                       digests: list[Callable[[memoryview], None] | None] | None = None,
                       staged: Staged | None = None) -> None:
        """Write several extents laid out one after another from `offset` (`segment_offsets`: each from an ALIGN
        boundary), segment i's buffers into extent i, as `write` does one; `digests[i]` sees segment i's bytes.
        With O_DIRECT and `staged` that is one call, in I/Os of the stage or its pieces across the extents'
        boundaries (a segment padded with zeros to ALIGN); without, one write per extent."""
        segs, digests, offs = _laid_out(offset, segments, digests)
        if self.direct:
            try:
                self._through_stage(offs, segs, digests, staged, self._write_direct)
                self._direct_proven = True
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL or self._direct_proven:
                    raise
                with self._lock:
                    if self.direct:
                        self._fall_back(f"first O_DIRECT write: {exc.strerror}")
        for off, runs, digest in zip(offs, segs, digests):
            self._write_buffered(off, [as_view(b) for b in runs], digest)

    def _through_stage(self, offs: list[int], segs: list[list[ByteRun]],
                       digests: list[Callable[[memoryview], None] | None], staged: Staged | None,
                       each: Callable[..., None]) -> None:
        """With O_DIRECT, every extent through one staging buffer of the pool: in one `staged` call, or one
        `each(offset, stage, views, digest)` (_write_direct or _read_direct) per extent."""
        stage = self._pool.acquire()
        try:
            if staged is not None:
                staged(self.fd, offs, stage, segs)
            else:
                for off, runs, digest in zip(offs, segs, digests):
                    each(off, stage, [as_view(b) for b in runs], digest)
        finally:
            self._pool.give_back(stage)

    def _write_buffered(self, offset: int, views: list[memoryview],
                        digest: Callable[[memoryview], None] | None) -> None:
        if digest is not None:
            for b in views:
                digest(b)
        for group in _iov_groups(views):  # one gather write per IOV_MAX runs (more: EINVAL)
            done, pos = os.pwritev(self.fd, group, offset), 0
            for b in group:  # continue whatever the kernel did not take
                lo = max(0, done - pos)
                while lo < len(b):
                    n = os.pwrite(self.fd, b[lo:], offset + pos + lo)
                    if n <= 0:
                        raise OSError(f"pwrite wrote nothing at offset {offset + pos + lo} of {self.path}")
                    lo += n
                pos += len(b)
            offset += pos

    def readinto(self, offset: int, buffers: list[ByteRun], digest: Callable[[memoryview], None] | None = None,
                 staged: Staged | None = None) -> None:
        """Fill `buffers`, in order, from `offset` (an extent's start; through the staging buffer with O_DIRECT,
        else one scatter read where it can); OSError on a short read. `digest`: called on the bytes read, in
        order (on each staged piece as it arrives, or on the buffers once filled). `staged`: as for `write`."""
        self.readinto_segments(offset, [buffers], [digest], staged)

    def readinto_segments(self, offsets: int | list[int], segments: list[list[ByteRun]],
                          digests: list[Callable[[memoryview], None] | None] | None = None,
                          staged: Staged | None = None) -> None:
        """Fill segment i's buffers from the extent at offsets[i] (or, given one offset, from extent i of those laid
        out from it as `write_segments` wrote them): with O_DIRECT and `staged` in one call (a STAGE's worth of
        extents at a time, submitted together), else one read per extent."""
        segs, digests, offs = _laid_out(offsets, segments, digests)
        if self.direct:
            self._through_stage(offs, segs, digests, staged, self._read_direct)
            return
        for off, runs, digest in zip(offs, segs, digests):
            self._read_buffered(off, [as_view(b) for b in runs], digest)

    def _read_buffered(self, offset: int, buffers: list[memoryview],
                       digest: Callable[[memoryview], None] | None) -> None:
        for group in _iov_groups(buffers):  # one scatter read per IOV_MAX runs (more: EINVAL)
            want = sum(len(b) for b in group)
            done = os.preadv(self.fd, group, offset)
            if done != want:  # the kernel may stop early: finish buffer by buffer, and call a true end an error
                pos = 0
                for b in group:
                    lo = max(0, done - pos)
                    while lo < len(b):
                        n = os.preadv(self.fd, [b[lo:]], offset + pos + lo)
                        if n <= 0:
                            raise OSError(f"short read at offset {offset + pos + lo} of {self.path}")
                        lo += n
                    pos += len(b)
            offset += want
        if digest is not None:
            for b in buffers:
                digest(b)

    # ---- O_DIRECT ---------------------------------------------------------------------------------------
    @property
    def staging_bytes(self) -> int:
        """The most the staging pool may hold: max_stages x STAGE with O_DIRECT, 0 without it."""
        return self.max_stages * STAGE if self.direct else 0

    @property
    def stages_made(self) -> int:
        return self._pool.made

    def _write_direct(self, offset: int, stage: np.ndarray, views: list[memoryview], digest: Digest | None) -> None:
        write_direct(self.fd, self.path, offset, stage, views, digest)

    def _read_direct(self, offset: int, stage: np.ndarray, views: list[memoryview], digest: Digest | None) -> None:
        read_direct(self.fd, self.path, offset, stage, views, digest)

    def _prewrite(self) -> None:
        """Zeros over the whole file, STAGE bytes per write (O_DIRECT, or buffered then fsync), so every extent
        is written before its first swap; progress on stderr every tenth. A failure removes the file."""
        stage, t0, shown = self._pool.acquire(), time.perf_counter(), 0
        stage[:] = 0
        print(f"SSD swap tier: writing zeros over {format_bytes(self.capacity)} in {self.path.parent} "
              "(--swap-ssd-prewrite)", file=sys.stderr, flush=True)
        try:
            for off in range(0, self.capacity, STAGE):
                n = min(STAGE, self.capacity - off)  # capacity is a multiple of ALIGN
                if os.pwrite(self.fd, memoryview(stage)[:n], off) != n:
                    raise OSError(errno.EIO, f"short write at offset {off}")
                tenth = (off + n) * 10 // self.capacity
                if tenth > shown:
                    shown = tenth
                    print(f"SSD swap tier: {tenth * 10}% written ({time.perf_counter() - t0:.1f} s)",
                          file=sys.stderr, flush=True)
            if not self.direct:
                os.fsync(self.fd)
        except OSError as exc:
            self._remove()
            raise SwapSpaceError(f"cannot write the SSD swap file in {self.path.parent} ({exc.strerror or exc}); "
                                 "free space there or lower --swap-ssd-space") from None
        finally:
            self._pool.give_back(stage)

    def _fall_back(self, why: str) -> None:
        """Buffered I/O from now on (the same file, reopened without O_DIRECT where it was open with it)."""
        if self.fd >= 0:
            self._old_fds.append(self.fd)  # closed with the store: a write on another thread may hold it now
            self.fd = os.open(self.path, os.O_RDWR)
        self.direct, self.direct_fallback = False, f"{why}; buffered I/O instead"
        log.warning("SSD swap tier in %s: O_DIRECT refused (%s); buffered I/O instead", self.path.parent, why)
        self._pool.close()
        if self.on_fallback is not None:  # the staging pool's reservation is no longer needed
            self.on_fallback()

    def close(self) -> None:
        for fd in self._old_fds:
            os.close(fd)
        self._old_fds.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._remove()

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _iov_groups(views: list[memoryview]) -> list[list[memoryview]]:
    return [views[i : i + IOV_MAX] for i in range(0, len(views), IOV_MAX)]
