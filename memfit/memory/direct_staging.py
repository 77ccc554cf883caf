"""O_DIRECT through page-aligned staging buffers: the pool of buffers and the gather-write / read-scatter loops
that `ExtentStore` (extent_store.py) runs when its file is open with O_DIRECT.

O_DIRECT wants the file offset, the length and the buffer's address aligned. The KV runs being swapped are
unaligned tensor memory, so they go through a page-aligned buffer of `STAGE` bytes (an anonymous mmap), one
`STAGE`-sized write or read at a time; the gather into it and the scatter out of it are numpy copies, which
release the GIL. The pool holds at most `max_stages` buffers (one per thread that may do I/O at once), made on
first use and kept; an I/O that finds them all in use waits for one.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import Callable

import numpy as np

from memfit.memory.extent_map import ALIGN

STAGE = 1 << 20  # bytes of one O_DIRECT write or read through the staging buffer (a multiple of ALIGN)

Digest = Callable[[memoryview], None]


class StagingPool:
    """Up to `max_stages` page-aligned (STAGE,) uint8 buffers, lent one at a time."""

    def __init__(self, max_stages: int) -> None:
        if max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {max_stages}")
        self.max_stages = max_stages
        self.made = 0  # buffers made (at most max_stages)
        self._idle: list[np.ndarray] = []
        self._free = threading.Condition()
        self.open = True  # False once the store gives O_DIRECT up: buffers coming back are dropped

    def acquire(self) -> np.ndarray:
        """An idle buffer, a new one while fewer than max_stages exist, else wait for one to come back (mmap
        memory is page-aligned)."""
        with self._free:
            while not self._idle and self.made >= self.max_stages:
                self._free.wait()
            if self._idle:
                return self._idle.pop()
            self.made += 1
        return np.frombuffer(mmap.mmap(-1, STAGE), dtype=np.uint8)

    def give_back(self, stage: np.ndarray) -> None:
        with self._free:
            if self.open:  # else dropped: unmapped when the last view goes
                self._idle.append(stage)
            self._free.notify()

    def close(self) -> None:
        """Keep no buffer from now on (O_DIRECT given up)."""
        with self._free:
            self.open = False
            self._idle.clear()


def write_direct(fd: int, path: object, offset: int, stage: np.ndarray, views: list[memoryview],
                 digest: Digest | None) -> None:
    """Gather `views` into `stage` STAGE bytes at a time and write each piece at `offset` onwards (the last one
    padded with zeros to ALIGN: the extent was rounded up to it). `digest` sees each piece before it goes out."""
    pos = 0
    pieces = [np.frombuffer(v, dtype=np.uint8) for v in views if len(v)]
    while pieces:
        fill = 0
        while pieces and fill < STAGE:  # gather
            n = min(STAGE - fill, pieces[0].size)
            stage[fill : fill + n] = pieces[0][:n]
            fill += n
            pieces[0] = pieces[0][n:]
            if not pieces[0].size:
                pieces.pop(0)
        if digest is not None:
            digest(memoryview(stage)[:fill])
        size = -(-fill // ALIGN) * ALIGN
        stage[fill:size] = 0
        done = 0
        while done < size:  # a short write of whole blocks is continued
            n = os.pwrite(fd, memoryview(stage)[done:size], offset + pos + done)
            if n <= 0 or n % ALIGN:
                raise OSError(errno.EIO, f"short O_DIRECT write ({n} of {size - done} bytes) at offset "
                              f"{offset + pos + done} of {path}")
            done += n
        pos += size


def read_direct(fd: int, path: object, offset: int, stage: np.ndarray, views: list[memoryview],
                digest: Digest | None) -> None:
    """Read STAGE bytes at a time from `offset` into `stage` and scatter them into `views`; `digest` sees each
    piece as it arrives. A short read is an OSError (EIO)."""
    pos = 0
    pieces = [np.frombuffer(v, dtype=np.uint8) for v in views if len(v)]
    left = sum(p.size for p in pieces)
    while left:
        size = min(STAGE, -(-left // ALIGN) * ALIGN)
        got = os.preadv(fd, [memoryview(stage)[:size]], offset + pos)
        if got < min(size, left):
            raise OSError(errno.EIO, f"short read at offset {offset + pos} of {path}")
        take, used = min(size, left), 0
        if digest is not None:
            digest(memoryview(stage)[:take])
        while used < take:  # scatter
            n = min(take - used, pieces[0].size)
            pieces[0][:n] = stage[used : used + n]
            used += n
            pieces[0] = pieces[0][n:]
            if not pieces[0].size:
                pieces.pop(0)
        pos, left = pos + size, left - take
