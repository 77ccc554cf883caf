"""Keep the C heap's freed pages from eating into a memory budget.

glibc's malloc keeps memory it has been given back: a freed chunk inside the heap (not at its top) stays
resident until something calls `malloc_trim`, and the mmap threshold grows with the largest block freed, so a
step's activations soon come from the heap instead of fresh mappings. Step after step of varied shapes
(prefill chunks, decode batches) leaves the heap holding more than any one step needs
(`benchmarks/heap_trim.py` measures what the trimmer saves and costs).

`fix_mmap_threshold` is the other remedy, for a process whose large temporaries come and go every step (the
offloaded trainer's logits, activations and optimizer chunks): with the threshold fixed, every block at least
that large is its own mapping, returned to the system when freed, and glibc stops raising the threshold.

`HeapTrimmer` watches what the process holds (anonymous and shared pages, from /proc/self/status: no library
pages) against a limit and trims the heap when it gets close, so the cost (the next step faults its pages in
again) is paid only where a budget is tight. glibc only; elsewhere it does nothing.

`IdleTrimmer` trims once each time the process has been idle for a while (an engine with no request to run),
budget or not: a server that has given its KV back should also give back the heap pages its steps freed,
and while it is idle the cost of faulting them in again is not on any request's path.
"""
from __future__ import annotations

import ctypes

from memfit.memory.mapping import get_libc
from memfit.memory.measure import anon_shmem_bytes

TRIM_AT = 0.9  # trim once the process holds this share of its limit
M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> mallopt parameter
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses a larger threshold


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of at least `nbytes` from its own mapping, returned to the system on free, for the
    rest of the process (glibc's `mallopt(M_MMAP_THRESHOLD)`; it also stops glibc raising the threshold to the
    largest block freed, up to 32 MiB, and its trim threshold to twice that). Freed temporaries then leave the
    process's RSS instead of staying in the heap; the cost is their page faults when next allocated. True
    where it took effect (glibc); elsewhere nothing changes."""
    fn = getattr(get_libc(), "mallopt", None)
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn(M_MMAP_THRESHOLD, int(nbytes)) == 1


def _malloc_trim():
    fn = getattr(get_libc(), "malloc_trim", None)  # glibc only
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Give the C heap's free pages back now (glibc's `malloc_trim(0)`); False where there is no such call."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


class HeapTrimmer:
    """Trim the C heap when the memory held since construction passes `TRIM_AT` of `limit_bytes`.

    Build it before the allocations it should watch (the engine builds it before loading the model)."""

    def __init__(self, limit_bytes: int, trim_at: float = TRIM_AT) -> None:
        self.limit_bytes = int(limit_bytes)
        self.trim_at = trim_at
        self._trim = _malloc_trim()
        self._baseline = anon_shmem_bytes()
        self.trims = 0  # how many times it trimmed (reported in the engine's stats)

    @property
    def active(self) -> bool:
        return self._trim is not None and self._baseline is not None

    def held_bytes(self) -> int:
        """Anonymous and shared memory added since construction (0 where it can't be read)."""
        now = anon_shmem_bytes()
        return 0 if now is None or self._baseline is None else now - self._baseline

    def maybe_trim(self) -> bool:
        """Trim if the process holds more than the threshold; True when it trimmed."""
        if not self.active or self.held_bytes() < self.trim_at * self.limit_bytes:
            return False
        self._trim(0)
        self.trims += 1
        return True


class IdleTrimmer:
    """Trim the C heap once per idle period, `idle_s` seconds after the last busy moment.

    The engine calls `busy()` on every step that ran work and `maybe_trim()` from its housekeeping; after a
    trim nothing happens until the next busy step, so an idle server trims once, not every second."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = float(idle_s)
        self._trim = _malloc_trim()
        self._busy_at: float | None = None  # monotonic time of the last busy step not yet followed by a trim
        self.trims = 0

    def busy(self, now: float) -> None:
        self._busy_at = now

    def maybe_trim(self, now: float) -> bool:
        """Trim if the last busy step was at least `idle_s` ago and no trim has followed it; True when the idle period
        began (the caller gives back its own idle memory then), whether or not this libc has a heap to trim."""
        if self._busy_at is None or now - self._busy_at < self.idle_s:
            return False
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
        self._busy_at = None
        return True
