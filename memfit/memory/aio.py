"""SSD swap space: block I/O from a thread pool, O_DIRECT where the file system allows it.

`AioEngine` splits each read or write into `block_size` requests and keeps up to `queue_depth` of them in
flight on a thread pool (`os.preadv`/`os.pwritev` release the GIL, so the requests overlap each other and
the caller's compute). Two layouts of the swap space sit on top of it:

- `ExtentFile`: one file, preallocated once (`posix_fallocate`) with an aligned extent per key, so the
  file system does no allocation and no metadata work while training;
- `FilePerKey`: one file per key, created on its first write (what DeepSpeed's swappers do:
  `{id}_param.tensor.swp`, deepspeed/runtime/swap_tensor/partitioned_param_swapper.py, `_get_swap_paths`).

With O_DIRECT the page cache is bypassed, so what the process reads and writes is what the SSD does (and
the page cache does not grow with the swap files); buffers, lengths and offsets must then be aligned to
`IO_ALIGN`. A file system that refuses O_DIRECT (tmpfs on older kernels, some network mounts) gets
buffered I/O and one warning.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memfit.memory.hostpool import IO_ALIGN
from memfit.memory.mapping import round_up

log = logging.getLogger(__name__)


class SwapSpaceError(OSError, ValueError):
    """The SSD swap directory cannot hold what was asked (no space, not writable); the message says what to do.
    A ValueError too: the user's input is what to change, so every command refuses it as one message (errors.py's
    USER_ERRORS) rather than with a traceback."""


@dataclass
class IOStats:
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0  # summed over requests (busy time, not wall time)
    write_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, write: bool, nbytes: int, seconds: float) -> None:
        with self._lock:
            if write:
                self.bytes_written += nbytes
                self.write_seconds += seconds
            else:
                self.bytes_read += nbytes
                self.read_seconds += seconds

    def to_json(self) -> dict:
        return {"bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "read_seconds": round(self.read_seconds, 4), "write_seconds": round(self.write_seconds, 4)}


_direct_warned: set[str] = set()


def open_direct(path: Path, create: bool = True) -> tuple[int, bool]:
    """Open `path` read-write with O_DIRECT; where the file system refuses it, open it buffered and warn once
    per directory. Returns (fd, direct)."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o600), True
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    where = str(path.parent)
    if where not in _direct_warned:
        _direct_warned.add(where)
        log.warning("%s does not support O_DIRECT; using buffered I/O there (the page cache will hold swap "
                    "data; put --ssd-dir on an ext4/xfs SSD for direct I/O)", where)
    return os.open(path, flags, 0o600), False


def _view(t: torch.Tensor, nbytes: int) -> memoryview:
    """A writable memoryview over `nbytes` at t's address (may run past t's numel up to its slot's end)."""
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


class AioEngine:
    """Reads and writes split into `block_size` requests, `queue_depth` in flight (DeepSpeed's aio defaults:
    1 MiB blocks, queue depth 8: deepspeed/runtime/swap_tensor/constants.py, AIO_BLOCK_SIZE_DEFAULT and
    AIO_QUEUE_DEPTH_DEFAULT)."""

    def __init__(self, block_size: int = 1 << 20, queue_depth: int = 8) -> None:
        if block_size % IO_ALIGN or block_size <= 0 or queue_depth <= 0:
            raise ValueError(f"block_size must be a positive multiple of {IO_ALIGN} and queue_depth positive")
        self.block_size, self.queue_depth = block_size, queue_depth
        self.stats = IOStats()
        self._pool = ThreadPoolExecutor(queue_depth, thread_name_prefix="memfit-aio")

    def submit(self, write: bool, fd: int, buf: torch.Tensor, nbytes: int, offset: int) -> list[Future]:
        """Queue a transfer of `nbytes` between `buf` (a contiguous host tensor) and the file at `offset`."""
        futures = []
        for start in range(0, nbytes, self.block_size):
            n = min(self.block_size, nbytes - start)
            futures.append(self._pool.submit(self._one, write, fd, buf, start, n, offset + start))
        return futures

    def _one(self, write: bool, fd: int, buf: torch.Tensor, start: int, n: int, offset: int) -> None:
        view = _view(buf, start + n)[start:]
        t0 = time.perf_counter()
        done = os.pwritev(fd, [view], offset) if write else os.preadv(fd, [view], offset)
        if done != n:
            raise OSError(errno.EIO, f"short {'write' if write else 'read'}: {done} of {n} bytes at {offset}")
        self.stats.add(write, n, time.perf_counter() - t0)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def wait(futures: list[Future]) -> None:
    for f in futures:
        f.result()


def check_free_space(directory: Path, nbytes: int) -> None:
    total, _, free = shutil.disk_usage(directory)  # statvfs
    if total == 0:  # no blocks at all, not a full disk: a pseudo file system such as /proc or /sys
        raise SwapSpaceError(
            f"{directory} is not on a disk that can hold the swap files: its file system reports no space at all "
            "(0 bytes in total, as pseudo file systems such as /proc and /sys do); pass --ssd-dir a directory on an "
            "SSD"
        )
    if free < nbytes:
        raise SwapSpaceError(
            f"{directory} has {free / 2**30:.2f} GiB free but the swap space needs {nbytes / 2**30:.2f} GiB; "
            "free space there, or pass --ssd-dir on a larger disk"
        )


def _span(length: int, nbytes: int | None, offset: int, base: int) -> tuple[int, int]:
    """(bytes to move, file offset) of a transfer within one key's space: aligned, and never past its end."""
    n = length - offset if nbytes is None else round_up(nbytes, IO_ALIGN)
    if offset % IO_ALIGN or offset < 0 or offset + n > length:
        raise ValueError(f"transfer of {n} bytes at {offset} is outside the {length}-byte space or unaligned")
    return n, base + offset


class ExtentFile:
    """One preallocated file with an aligned extent per key. `sizes`: key -> bytes."""

    def __init__(self, directory: Path, sizes: dict[str, int], engine: AioEngine, name: str = "swap.extents") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.engine, self.path = engine, directory / name
        self.offsets: dict[str, int] = {}
        self.lengths: dict[str, int] = {}
        end = 0
        for key, n in sizes.items():
            self.offsets[key], self.lengths[key] = end, round_up(n, IO_ALIGN)
            end += self.lengths[key]
        self.size = end
        check_free_space(directory, end)
        self.fd, self.direct = open_direct(self.path)
        try:
            os.posix_fallocate(self.fd, 0, max(end, IO_ALIGN))
        except OSError as exc:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise SwapSpaceError(f"no space left in {directory} for {end / 2**30:.2f} GiB of swap extents; "
                                     "pass --ssd-dir on a larger disk") from exc
            raise

    @property
    def files(self) -> int:
        return 1

    def write(self, key: str, buf: torch.Tensor, nbytes: int | None = None, offset: int = 0) -> list[Future]:
        """Write `nbytes` of `buf` (default: the whole extent) at `offset` into key's extent."""
        return self.engine.submit(True, self.fd, buf, *self._span(key, nbytes, offset))

    def read(self, key: str, buf: torch.Tensor, nbytes: int | None = None, offset: int = 0) -> list[Future]:
        return self.engine.submit(False, self.fd, buf, *self._span(key, nbytes, offset))

    def _span(self, key: str, nbytes: int | None, offset: int) -> tuple[int, int]:
        return _span(self.lengths[key], nbytes, offset, self.offsets[key])

    def close(self, remove: bool = True) -> None:
        os.close(self.fd)
        if remove:
            self.path.unlink(missing_ok=True)


class FilePerKey:
    """One file per key (`{key}.tensor.swp`), opened on first use and grown by its writes."""

    def __init__(self, directory: Path, sizes: dict[str, int], engine: AioEngine) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        check_free_space(directory, sum(round_up(n, IO_ALIGN) for n in sizes.values()))
        self.engine, self.directory = engine, directory
        self.lengths = {k: round_up(n, IO_ALIGN) for k, n in sizes.items()}
        self._fds: dict[str, int] = {}
        self.direct = True
        self._lock = threading.Lock()

    @property
    def files(self) -> int:
        return len(self._fds)

    def _fd(self, key: str) -> int:
        with self._lock:
            if key not in self._fds:
                self._fds[key], direct = open_direct(self.directory / f"{key}.tensor.swp")
                self.direct = self.direct and direct
            return self._fds[key]

    def write(self, key: str, buf: torch.Tensor, nbytes: int | None = None, offset: int = 0) -> list[Future]:
        return self.engine.submit(True, self._fd(key), buf, *_span(self.lengths[key], nbytes, offset, 0))

    def read(self, key: str, buf: torch.Tensor, nbytes: int | None = None, offset: int = 0) -> list[Future]:
        return self.engine.submit(False, self._fd(key), buf, *_span(self.lengths[key], nbytes, offset, 0))

    def close(self, remove: bool = True) -> None:
        for key, fd in self._fds.items():
            os.close(fd)
            if remove:
                (self.directory / f"{key}.tensor.swp").unlink(missing_ok=True)
        self._fds.clear()
