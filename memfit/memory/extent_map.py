"""Free space in a preallocated file, kept as extents: the allocator behind `ExtentStore` (extent_store.py).

    space = ExtentMap(64 << 30)
    off = space.alloc(nbytes)      # first fit, in ALIGN units; None when no free extent is large enough
    space.free(off, nbytes)        # merged with free neighbours

Why first fit over a sorted list, written here rather than taken from a library: the SSD tier holds a few
hundred to a few thousand extents at once (one per swapped run of KV), so a list with `bisect` is small and
fast, and coalescing on free keeps the file from fragmenting into pieces too small for a whole run.
Everything is in `ALIGN`-byte units so that O_DIRECT finds every offset and length aligned.
"""
from __future__ import annotations

import bisect

from memfit.memory.mapping import round_up

ALIGN = 4096  # extent granularity: a logical block, as O_DIRECT wants (offsets, lengths, buffer addresses)


def extent_bytes(nbytes: int) -> int:
    """The file bytes an extent of `nbytes` takes (what `alloc` takes for it)."""
    return round_up(max(nbytes, 1), ALIGN)


def segment_offsets(offset: int, sizes: list[int]) -> list[int]:
    """Where extents of `sizes` bytes lie when laid out one after another from `offset` (each from an ALIGN
    boundary): one `alloc(sum(extent_bytes(n)))` holds them all, and each can be freed on its own."""
    offs = []
    for n in sizes:
        offs.append(offset)
        offset += extent_bytes(n)
    return offs


class ExtentMap:
    """The free extents of `capacity` bytes (rounded up to ALIGN), sorted by offset, and the bytes in use."""

    def __init__(self, capacity: int) -> None:
        self.capacity = round_up(capacity, ALIGN)
        self._starts = [0]  # free extents, sorted by offset: starts and (parallel) lengths
        self._lengths = [self.capacity]
        self.used_bytes = 0

    def first_fit(self, nbytes: int) -> int | None:
        """The index of the first free extent that holds `nbytes` (rounded up to ALIGN), or None: where `alloc`
        would take it (HostRegion's warming looks without taking)."""
        need = extent_bytes(nbytes)
        return next((i for i, length in enumerate(self._lengths) if length >= need), None)

    def start(self, index: int) -> int:
        return self._starts[index]

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free extent of `nbytes` (rounded up to ALIGN), first fit; None if none is large enough."""
        i = self.first_fit(nbytes)
        if i is None:
            return None
        need, off, length = extent_bytes(nbytes), self._starts[i], self._lengths[i]
        if length == need:
            del self._starts[i], self._lengths[i]
        else:
            self._starts[i], self._lengths[i] = off + need, length - need
        self.used_bytes += need
        return off

    def free(self, offset: int, nbytes: int) -> None:
        """Give an extent back, merging it with free neighbours; ValueError if any of it is free already."""
        length = extent_bytes(nbytes)
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
        """(offset, length) of every free extent, by offset."""
        return list(zip(self._starts, self._lengths))
