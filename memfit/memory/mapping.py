"""Primitives that the virtual arenas (vmem.py, vmem_cuda.py) and the huge-page host arena (host.py) share:
the error type, libc's mmap/munmap/madvise through ctypes, and the owner object whose finaliser unmaps.

Its own module so that the CPU and CUDA backends import it, and neither imports the other.
"""
from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable


class VirtualMemoryError(MemoryError):
    """The OS or driver refused to reserve/commit virtual memory."""


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


_libc: ctypes.CDLL | None = None


def get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)  # ctypes releases the GIL around these calls
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.restype = ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = libc
    return _libc


class MappingOwner:
    """Owns one mapping; its finaliser unmaps. Kept alive by every tensor that views the mapping."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._finalizer = weakref.finalize(self, release)
