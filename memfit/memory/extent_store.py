"""A preallocated file carved into extents: the SSD tier's storage for whole runs of swapped KV.

    store = ExtentStore(Path("/nvme/memfit"), 64 << 30)   # one file, its blocks allocated now
    off = store.alloc(nbytes)                               # None when no free extent is large enough
    store.write(off, memoryview(...)); store.readinto(off, [memoryview(...), ...]); store.free(off, nbytes)

Why one preallocated file rather than a file per run: the space is taken once, at start (`posix_fallocate`), so
a disk that cannot hold the tier fails then, with a clear error, instead of in the middle of a swap; a swap does
no file-system allocation or metadata work (no create, no unlink, no extent growth), only one positioned write
of the whole run; and a crash leaves one file to clean, not thousands. The price is an allocator here: first
fit over a list of free extents sorted by offset, coalescing neighbours on free, in `ALIGN`-byte units (so
that O_DIRECT, if later enabled, finds every offset aligned). Runs are whole sequences' KV, megabytes each, so
the free list stays short.

I/O is `os.pwritev` / `os.preadv` (both release the GIL, so reads on the swap thread pool overlap the model
step); a short write is continued, a short read is an error. The page cache is used (no O_DIRECT): the KV
runs are written from and read into unaligned tensor memory, which O_DIRECT refuses.
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path

from memfit.memory.aio import SwapSpaceError
from memfit.memory.budget import format_bytes
from memfit.memory.mapping import round_up

ALIGN = 4096  # extent granularity: a logical block, as O_DIRECT would want


class ExtentStore:
    def __init__(self, directory: str | Path, capacity: int, name: str | None = None) -> None:
        directory = Path(directory)
        if capacity < ALIGN:
            raise SwapSpaceError(f"an SSD swap space of {format_bytes(capacity)} cannot hold one {ALIGN}-byte extent")
        if not directory.is_dir():
            raise SwapSpaceError(f"the SSD swap directory {directory} does not exist; create it or choose another")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise SwapSpaceError(f"the SSD swap directory {directory} is not writable; choose another")
        self.capacity = round_up(capacity, ALIGN)
        self.path = directory / (name or f"memfit-kv-swap-{os.getpid()}-{id(self):x}.extents")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(self.fd, 0, self.capacity)
        except OSError as exc:
            self._remove()
            raise SwapSpaceError(f"cannot preallocate {format_bytes(self.capacity)} in {directory} ({exc.strerror}); "
                                 "free space there or lower --swap-ssd-space") from None
        self._starts = [0]  # free extents, sorted by offset: starts and (parallel) lengths
        self._lengths = [self.capacity]
        self.used_bytes = 0

    # ---- the allocator ------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free extent of `nbytes` (rounded up to ALIGN), first fit; None if none is large enough."""
        need = round_up(max(nbytes, 1), ALIGN)
        for i, length in enumerate(self._lengths):
            if length >= need:
                off = self._starts[i]
                if length == need:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i], self._lengths[i] = off + need, length - need
                self.used_bytes += need
                return off
        return None

    def free(self, offset: int, nbytes: int) -> None:
        """Give an extent back, merging it with free neighbours."""
        length = round_up(max(nbytes, 1), ALIGN)
        i = bisect.bisect_left(self._starts, offset)
        if (i < len(self._starts) and self._starts[i] < offset + length) or \
                (i > 0 and self._starts[i - 1] + self._lengths[i - 1] > offset):
            raise ValueError(f"extent {offset}+{length} is (partly) free already")
        self._starts.insert(i, offset)
        self._lengths.insert(i, length)
        if i + 1 < len(self._starts) and offset + length == self._starts[i + 1]:  # merge with the next
            self._lengths[i] += self._lengths.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == offset:  # and with the previous
            self._lengths[i - 1] += self._lengths.pop(i)
            self._starts.pop(i)
        self.used_bytes -= length

    @property
    def free_extents(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._lengths))

    # ---- I/O ------------------------------------------------------------------------------------------
    def write(self, offset: int, buffers: list[memoryview]) -> None:
        """Write `buffers`, in order, from `offset` (one gather write; a short write is continued; OSError as
        the OS raises it)."""
        views = [b.cast("B") for b in buffers]
        done, pos = os.pwritev(self.fd, views, offset), 0
        for b in views:  # continue whatever the kernel did not take
            lo = max(0, done - pos)
            while lo < len(b):
                n = os.pwrite(self.fd, b[lo:], offset + pos + lo)
                if n <= 0:
                    raise OSError(f"pwrite wrote nothing at offset {offset + pos + lo} of {self.path}")
                lo += n
            pos += len(b)

    def readinto(self, offset: int, buffers: list[memoryview]) -> None:
        """Fill `buffers`, in order, from `offset` (one scatter read where it can); OSError on a short read."""
        want = sum(len(b) for b in buffers)
        done = os.preadv(self.fd, buffers, offset)
        if done != want:  # the kernel may stop early: finish buffer by buffer, and call a true end an error
            pos = 0
            for b in buffers:
                lo = max(0, done - pos)
                while lo < len(b):
                    n = os.preadv(self.fd, [b[lo:]], offset + pos + lo)
                    if n <= 0:
                        raise OSError(f"short read at offset {offset + pos + lo} of {self.path}")
                    lo += n
                pos += len(b)

    def close(self) -> None:
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
