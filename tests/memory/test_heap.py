"""HeapTrimmer: freed C-heap pages go back to the kernel once the process nears its limit, and not before."""
import ctypes

import pytest

from memfit.memory.heap import HeapTrimmer, IdleTrimmer
from memfit.memory.measure import status_bytes

MIB = 1 << 20
CHUNK = 64 * 1024  # below glibc's mmap threshold: served from the heap


def _anon() -> int:
    return status_bytes()["RssAnon"]


@pytest.fixture
def fragment_heap():
    """A function that frees 400 x 64 KiB heap chunks but keeps the one at the top: glibc keeps the 25 MiB
    below it resident."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    tops = []

    def fragment() -> None:
        libc.malloc_trim(0)  # start from a trimmed heap: earlier tests' freed pages would serve these chunks
        chunks = [libc.malloc(CHUNK) for _ in range(400)]
        for c in chunks:
            ctypes.memset(c, 1, CHUNK)
        tops.append(chunks.pop())
        for c in chunks:
            libc.free(c)

    yield fragment
    for top in tops:
        libc.free(top)


def _trimmer(limit: int) -> HeapTrimmer:
    t = HeapTrimmer(limit)
    if not t.active:
        pytest.skip("needs glibc's malloc_trim and /proc/self/status")
    return t


def test_trims_the_freed_heap_when_the_process_nears_its_limit(fragment_heap):
    ctypes.CDLL(None).malloc_trim(0)
    t = _trimmer(20 * MIB)  # built before the allocations, as the engine builds it before loading
    fragment_heap()
    before = _anon()
    assert t.held_bytes() > 18 * MIB  # glibc kept the freed chunks
    assert t.maybe_trim() and t.trims == 1
    assert before - _anon() > 20 * MIB  # the kernel's own count of anonymous pages fell


def test_leaves_the_heap_alone_below_the_threshold(fragment_heap):
    t = _trimmer(10 << 30)  # a 10 GiB limit: 25 MiB held is nowhere near it
    fragment_heap()
    before = _anon()
    assert not t.maybe_trim() and t.trims == 0
    assert abs(_anon() - before) < 4 * MIB


_RETAIN = """
import json, sys, torch
from memfit.memory.heap import fix_mmap_threshold
from memfit.memory.measure import status_bytes
fixed = fix_mmap_threshold(1 << 20) if sys.argv[1] == "fixed" else False
big = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del big  # glibc's own policy: the threshold is now 16 MiB, so the next blocks come from the heap
before = status_bytes()["RssAnon"]
a = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
pin = torch.empty(64 << 10, dtype=torch.uint8).fill_(1)  # allocated after `a`: keeps the heap from shrinking
del a
print(json.dumps({"fixed": fixed, "held": status_bytes()["RssAnon"] - before}))
"""


@pytest.mark.parametrize("mode", ["default", "fixed"])
def test_fixed_mmap_threshold_returns_freed_temporaries(mode):
    """A freed 8 MiB temporary under a live small block: at glibc's default (the threshold raised by an earlier
    16 MiB free) the kernel still counts its pages in the process; with the threshold fixed at 1 MiB it was
    its own mapping and is gone. Fresh interpreters, read from /proc/self/status."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _RETAIN, mode], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2], env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if mode == "fixed":
        assert out["fixed"] and out["held"] < 1 << 20, out
    else:
        assert out["held"] >= 7 << 20, out


def test_an_idle_trim_comes_once_after_the_idle_time(fragment_heap):
    """IdleTrimmer: nothing before `idle_s` has passed since the last busy step; then one trim, which the
    kernel's count of anonymous pages sees; then nothing more until the next busy step."""
    t = IdleTrimmer(idle_s=1.0)
    if t._trim is None:
        pytest.skip("needs glibc's malloc_trim")
    assert not t.maybe_trim(now=100.0)  # never busy: nothing to give back
    fragment_heap()
    t.busy(now=100.0)
    before = _anon()
    assert not t.maybe_trim(now=100.5) and t.trims == 0
    assert abs(_anon() - before) < 4 * MIB  # not trimmed: glibc still holds the freed chunks
    assert t.maybe_trim(now=101.0) and t.trims == 1
    assert before - _anon() > 20 * MIB
    assert not t.maybe_trim(now=200.0) and t.trims == 1  # once per idle period
    t.busy(now=200.0)
    assert t.maybe_trim(now=202.0) and t.trims == 2
