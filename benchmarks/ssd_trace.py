"""Where the SSD swap tier's time goes in an engine run (benchmarks/preemption.py, the swap-run-reuse-ssd variants).

    trace = SSDTrace.install()        # before the engine is built: wraps the tier's C O_DIRECT loop
    ... run the workload ...
    trace.summary("/tmp")             # per direction: I/Os, bytes, seconds, and what they were spent on

Per call of the C loop (kernels/staged_io.py: one call per extent, or per group of extents written or read
together) it records the stretches of the file it moved (extents rounded up to their ALIGN blocks, as on disk,
merged where one follows another: the C loop's I/Os, at most 1 MiB each), the call's
seconds, the part in pread/pwrite (the C loop's own count), and the calling thread's runqueue wait over the call
(/proc/thread-self/schedstat: time runnable but not given a CPU, on a loaded machine the time after an I/O completes
before the thread runs again). `summary` then replays the same I/Os (same offsets and sizes, in the same order, in
pieces of at most the tier's 1 MiB staging buffer) on a fresh fallocated file of the same size with plain
os.pwritev / os.preadv on one thread, one at a time, with no engine beside it: the disk's speed for the tier's own
I/O pattern.
So the gap between the reference bandwidth and the tier's splits into what the pattern costs (I/O sizes, first
writes into unwritten extents) and what running inside the engine costs (CPU time, waiting for a CPU).
"""
from __future__ import annotations

import mmap
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field


def _schedstat() -> int:
    """This thread's runqueue wait so far, in ns (0 where the kernel does not say)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class SSDTrace:
    # kind, [(file offset, bytes)] stretches contiguous in the file, seconds, in syscalls, runqueue wait
    calls: list[tuple[str, list[tuple[int, int]], float, float, float]] = field(default_factory=list)
    capacity: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def install(cls) -> SSDTrace:
        import memfit.llm.kernels.staged_io as sio
        from memfit.memory.extent_store import extent_bytes

        trace, real = cls(), sio.StagedIO._call

        def call(fn, fd, offset, stage, segments, align):  # type: ignore[no-untyped-def]
            w0 = _schedstat()
            crcs, seconds, io_seconds = real(fn, fd, offset, stage, segments, align)
            wait = (_schedstat() - w0) / 1e9
            sizes = [extent_bytes(sum(len(v) for v in seg)) for seg in segments]
            starts = [offset + sum(sizes[:i]) for i in range(len(sizes))] if isinstance(offset, int) else list(offset)
            stretches: list[tuple[int, int]] = []
            for at, n in zip(starts, sizes):  # merged where one extent follows another, as the C loop does
                if stretches and sum(stretches[-1]) == at:
                    stretches[-1] = (stretches[-1][0], stretches[-1][1] + n)
                else:
                    stretches.append((at, n))
            with trace._lock:
                trace.calls.append(("write" if "pwrite" in fn.__name__ else "read", stretches, seconds,
                                    io_seconds, wait))
            return crcs, seconds, io_seconds

        sio.StagedIO._call = staticmethod(call)  # type: ignore[method-assign]
        return trace

    def summary(self, directory: str, capacity: int) -> dict:
        replayed = self.replay(directory, capacity)
        out = {}
        for kind in ("write", "read"):
            rows = [c for c in self.calls if c[0] == kind]
            out[kind] = {"calls": len(rows), "ios": sum(len(c[1]) for c in rows),
                         "bytes": sum(n for c in rows for _, n in c[1]), "seconds": sum(c[2] for c in rows),
                         "syscall_seconds": sum(c[3] for c in rows), "runqueue_wait_seconds": sum(c[4] for c in rows),
                         "replay_seconds": replayed[kind]}
        return out

    def replay(self, directory: str, capacity: int, piece: int = 1 << 20) -> dict[str, float]:
        """Seconds per direction for the same I/Os on a fresh fallocated file, one thread, nothing else running."""
        fd_, path = tempfile.mkstemp(dir=directory, prefix="memfit-ssd-replay-")
        os.close(fd_)
        seconds = {"write": 0.0, "read": 0.0}
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            except OSError:
                fd = os.open(path, os.O_RDWR)
            os.posix_fallocate(fd, 0, capacity)
            buf = mmap.mmap(-1, piece)  # page-aligned
            buf.write(os.urandom(piece))
            for kind, stretches, *_ in self.calls:
                io = os.pwritev if kind == "write" else os.preadv
                for offset, nbytes in stretches:
                    for p in range(0, nbytes, piece):
                        n = min(piece, nbytes - p)
                        t0 = time.perf_counter()
                        io(fd, [memoryview(buf)[:n]], offset + p)
                        seconds[kind] += time.perf_counter() - t0
            os.close(fd)
        finally:
            os.unlink(path)
        return seconds
