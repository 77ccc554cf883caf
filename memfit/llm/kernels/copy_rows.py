"""Strided rows copied by address in one C call (cpu_copy_rows.cpp): the swap tiers' by-address copies.

    copy_rows(dst, dst_stride, src, src_stride, rows, row_bytes)   # addresses (ints) and byte counts

One foreign call (and one GIL release) a block of rows, where ctypes.memmove makes one a row; where memfit's
I/O kernels cannot run (no compiler, no SSE4.2) it falls back to that memmove loop, the same bytes.
"""
from __future__ import annotations

import ctypes
import threading

from memfit.llm.kernels.build import load_cpu_io

__all__ = ["copy_rows", "in_one_call", "set_one_call"]

_fn: ctypes._CFuncPtr | None = None
_tried = False
_lock = threading.Lock()
_off = False  # set_one_call(False): the memmove a row, as before (benchmarks compare the two)


def _kernel() -> ctypes._CFuncPtr | None:
    global _fn, _tried
    if _off:
        return None
    if not _tried:
        with _lock:  # (swap threads may ask first: each waits for the one load, then sees its result)
            if not _tried:
                lib = load_cpu_io()
                if lib is not None:
                    fn = lib.memfit_copy_rows
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_int64]
                    fn.restype = None
                    _fn = fn
                _tried = True
    return _fn


def set_one_call(on: bool) -> bool:
    """Use the C call where it runs (True, the default) or a memmove a row (False: what it replaced, for
    benchmarks/swap_tiers.py's comparison), process-wide; returns the previous setting."""
    global _off
    before, _off = not _off, not on
    return before


def in_one_call() -> bool:
    """Whether `copy_rows` is one C call here (else a memmove a row)."""
    return _kernel() is not None


def copy_rows(dst: int, dst_stride: int, src: int, src_stride: int, rows: int, row_bytes: int) -> None:
    """Copy `rows` rows of `row_bytes` bytes from `src` (rows `src_stride` bytes apart) to `dst` (`dst_stride`
    apart). The caller vouches for the addresses (memory that stays mapped, rows that do not overlap)."""
    fn = _kernel()
    if fn is not None:
        fn(dst, dst_stride, src, src_stride, rows, row_bytes)
        return
    move = ctypes.memmove
    for i in range(rows):
        move(dst + i * dst_stride, src + i * src_stride, row_bytes)
