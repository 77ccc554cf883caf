"""Give back resident pages of memory-mapped files (Linux).

A checkpoint loaded with safetensors is memory-mapped: its pages become resident as they are read, and
stay resident (counted in RSS) while the mapping lives, even after the model stops using a tensor (for
example because the runner replaced it with a repacked copy). `drop_file_pages` tells the kernel this
process no longer needs a tensor's pages (`madvise(MADV_DONTNEED)`): the RSS drops at once, and should
the tensor be read again its data is simply paged back in from the file.

`populate_file_pages` does the opposite: it makes a mapped tensor resident now (`MADV_POPULATE_READ`), so
what a process holds no longer depends on which rows its lookups happened to touch, and a memory budget that
counts the tensor in full is exact.

`drop_file_pages` refuses anonymous memory, where MADV_DONTNEED would *zero* the data instead of dropping a copy.
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import os
import sys

import torch

_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux >= 5.14
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed mappings, sorted by start; [] off Linux."""
    if not sys.platform.startswith("linux"):
        return []
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi, parts[5].strip()))
    maps.sort()
    return maps


def _in_file_mapping(lo: int, hi: int, maps: list[tuple[int, int, str]]) -> bool:
    starts = [m[0] for m in maps]
    i = bisect.bisect_right(starts, lo) - 1
    return i >= 0 and maps[i][0] <= lo and hi <= maps[i][1]


def is_file_backed(tensor: torch.Tensor, maps: list[tuple[int, int, str]] | None = None) -> bool:
    """Does `tensor`'s memory lie inside one file mapping (e.g. a memory-mapped safetensors checkpoint)?"""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    start = tensor.data_ptr()
    return _in_file_mapping(start, start + tensor.numel() * tensor.element_size(), file_mappings() if maps is None else maps)


def drop_file_pages(tensor: torch.Tensor, maps: list[tuple[int, int, str]] | None = None) -> int:
    """Drop the whole pages inside `tensor`'s bytes from this process's resident set, if the tensor lives
    in a file mapping. Returns the bytes of address range advised (0 if it is not file-backed)."""
    if not is_file_backed(tensor, maps):
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo = -(-start // PAGE) * PAGE  # only pages wholly inside the tensor: neighbours may still be in use
    hi = end // PAGE * PAGE
    if hi <= lo:
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(lo), hi - lo, _MADV_DONTNEED) != 0:
        return 0
    return hi - lo


def populate_file_pages(tensor: torch.Tensor, maps: list[tuple[int, int, str]] | None = None) -> int:
    """Make the pages of a file-backed tensor resident (read them in now). Returns the bytes of address range
    populated (0 if the tensor is not file-backed). Falls back to reading the tensor where the kernel lacks
    MADV_POPULATE_READ."""
    if not is_file_backed(tensor, maps):
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo, hi = start // PAGE * PAGE, -(-end // PAGE) * PAGE
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(lo), hi - lo, _MADV_POPULATE_READ) != 0:
        tensor.view(torch.uint8).sum() if tensor.is_contiguous() else tensor.sum()  # touch every page
    return hi - lo
