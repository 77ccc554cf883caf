"""The swap tier's book of host copies (kv/swap.py moves the bytes; this module decides what is held).

A sequence's copy is a list of chunks, each one host buffer (uint8, pinned on CUDA) holding a token range
[lo, hi) of every segment, or an extent on the SSD tier (swap_ssd.py) once demoted; a swap-in restores
positions 0..valid-1.

Cross-turn reuse (FastSwitch's third idea). A swap-in leaves the host copy in place, marked *kept*. While the
sequence runs on, positions 0..valid-1 do not change (new tokens go after them), so its next swap-out copies only
[valid, n): one more chunk. A finished conversation turn whose device KV is evicted goes to the host the same
way (scheduler: `_evict_retained`), and the session's next turn swaps in instead of prefilling (engine/sessions.py:
`adopt_session_kv`). A prompt that diverges from the held tokens truncates `valid` (`truncate`). Kept copies are
evictable: when a reservation does not fit, the least recently used kept copies go first (to the SSD tier below
when there is one); a copy that is a swapped-out sequence's only KV (`live`) is never dropped.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from memfit.llm.kv.swap_model import OWNER, SwapStats
from memfit.memory.budget import MemoryBudget

if TYPE_CHECKING:
    from memfit.llm.kv.swap_layout import Span
    from memfit.llm.kv.swap_ssd import SSDTier
    from memfit.memory.host_region import HostRegion

__all__ = ["Chunk", "Copy", "HostCopies"]


@dataclass
class Chunk:
    lo: int  # first token (a multiple of the cache's granule)
    hi: int  # one past the last token
    nbytes: int
    buf: torch.Tensor | None  # (nbytes,) uint8 on the host: the runs of [lo, hi) in swap_layout.py's order; None on SSD
    extent: object | None = None  # where it sits on the SSD tier (swap_ssd.py), when demoted


@dataclass
class Copy:
    chunks: list[Chunk]
    valid: int  # positions 0..valid-1 of the sequence: what a swap-in restores
    live: bool  # the swapped-out sequence's only KV (never evicted); False: a kept copy (reuse)


class HostCopies:
    """Every held copy by sequence id, the LRU order of the kept ones, and the host budget they are reserved in
    (`stats` is the swap tier's: the resident bytes and kept evictions are counted here)."""

    def __init__(self, budget: MemoryBudget, stats: SwapStats, ssd: SSDTier | None = None,
                 region: HostRegion | None = None, spans: Callable[[int, int], list[Span]] | None = None) -> None:
        self.budget, self.stats, self.ssd, self.region = budget, stats, ssd, region
        # where each run of positions lo..hi-1 lies in a chunk's buffer (SwapRuns.spans): a chunk reaching past
        # `valid` or past the next chunk's start goes to the SSD tier as the runs before them alone (`_runs_upto`)
        self.spans = spans
        self.copies: dict[int, Copy] = {}
        self.kept: OrderedDict[int, None] = OrderedDict()  # seq ids of kept copies, least recently used first
        # chunks a merge replaced (swap_pairs.py), still held until the merging copy that reads them lands
        self.retiring: dict[int, list[Chunk]] = {}

    def valid_tokens(self, seq_id: int) -> int:
        copy = self.copies.get(seq_id)
        return copy.valid if copy is not None else 0

    def held_bytes(self) -> int:
        """Bytes of every chunk held on the host, summed from the buffers themselves."""
        held = [*(c for copy in self.copies.values() for c in copy.chunks), *(c for r in self.retiring.values() for c in r)]
        return sum(c.buf.numel() for c in held if c.buf is not None)

    def retire(self, seq_id: int, chunks: list[Chunk]) -> None:
        """`chunks` left `seq_id`'s copy (merged); their bytes stay reserved until `settle`."""
        self.retiring.setdefault(seq_id, []).extend(chunks)

    def settle(self, seq_id: int) -> None:
        """The copies reading `seq_id`'s retired chunks landed (or failed): free them."""
        for chunk in self.retiring.pop(seq_id, []):
            self.free_chunk(chunk)

    def mark_kept(self, seq_id: int, kept: bool) -> None:
        """`seq_id`'s copy is evictable (most recently used now) or not."""
        self.kept.pop(seq_id, None)
        if kept:
            self.kept[seq_id] = None

    def truncate(self, copy: Copy, num_tokens: int) -> None:
        copy.valid = min(copy.valid, num_tokens)
        for chunk in copy.chunks:  # an SSD chunk is read whole: one reaching past `valid` goes, and what follows
            if chunk.buf is None and chunk.hi > copy.valid:
                copy.valid = min(copy.valid, chunk.lo)
        self.drop_chunks(copy, copy.valid)

    def drop_chunks(self, copy: Copy, lo: int) -> None:
        """Free the chunks starting at or past token `lo`."""
        for chunk in [c for c in copy.chunks if c.lo >= lo]:
            copy.chunks.remove(chunk)
            self.free_chunk(chunk)

    def free_chunk(self, chunk: Chunk) -> None:
        if chunk.buf is not None:
            self.budget.release(chunk.nbytes, OWNER)
            self.stats.resident_bytes -= chunk.nbytes
            if self.region is not None and self.region.owns(chunk.buf):
                self.region.free(chunk.buf)  # its pages may stay warm, reserved by the region (host_region.py)
            chunk.buf = None
        elif self.ssd is not None:
            self.ssd.free(chunk.extent)

    def drop(self, seq_id: int) -> None:
        copy = self.copies.pop(seq_id, None)
        self.kept.pop(seq_id, None)
        self.settle(seq_id)  # (callers let a copy in flight land first)
        if copy is not None:
            for chunk in copy.chunks:
                self.free_chunk(chunk)

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve host bytes for a chunk if they fit, nothing evicted. With a region, the shortfall may come from its
        warm free pages: their reservation moves to the chunk's owner and the chunk is carved from them (host_region.py:
        at the high-water mark the pages are neither returned nor faulted in again)."""
        if self.region is not None:
            return self.region.try_reserve(nbytes, OWNER)
        return self.budget.try_reserve(nbytes, OWNER)

    def unreserve(self, nbytes: int) -> None:
        """Give back a reservation no chunk took (its copy failed before a buffer held it)."""
        if self.region is not None:
            self.region.unreserve(nbytes, OWNER)  # what came from warm pages goes back to the region
        else:
            self.budget.release(nbytes, OWNER)

    def reserve(self, nbytes: int, for_seq: int, busy: Container[int]) -> bool:
        """Reserve host bytes, making room by demoting (SSD tier) or dropping kept copies, least recently used
        first; a live copy is demoted only to the SSD tier, never dropped (and not while in `busy`: a swap-in
        of it is in flight)."""
        while not self.try_reserve(nbytes):
            victim = next((s for s in self.kept if s != for_seq and s not in busy and self.on_host(s)), None)
            if victim is not None:
                self.stats.kept_evictions += 1
                if not (self.ssd is not None and self.demote(victim)):  # (a refused demotion changes nothing)
                    self.drop(victim)
                continue
            if self.ssd is None or not self._demote_live(for_seq, busy):
                return False
        return True

    def on_host(self, seq_id: int) -> bool:
        return any(c.buf is not None for c in self.copies[seq_id].chunks)

    def demote(self, seq_id: int) -> bool:
        """Move `seq_id`'s host chunks to the SSD tier (a kept copy stays kept, a live one live); False if none
        moved (the tier cannot take them, or none is left). A host chunk goes down as the runs of the positions it
        alone holds, up to the copy's valid tokens and the next chunk's start (where a new turn diverged inside it,
        or a later chunk rewrote its last rows), and holds only those from then on: an SSD chunk is read back whole,
        into memory given for `valid` tokens (`_runs_upto`)."""
        copy = self.copies[seq_id]
        ends = [c.lo for c in copy.chunks[1:]] + [copy.valid]  # (chunks are in order of their first token)
        host = [(c, min(c.hi, copy.valid, end)) for c, end in zip(copy.chunks, ends) if c.buf is not None]
        runs = [self._runs_upto(c, upto) for c, upto in host]
        if not host or any(r is None for r in runs):
            return False
        extents = self.ssd.write_chunks(runs)  # type: ignore[union-attr, arg-type]
        while extents is None and not self.ssd.write_failed:  # type: ignore[union-attr]  # full: its LRU kept copy goes
            victim = next((s for s in self.kept if s != seq_id and not self.on_host(s)), None)
            if victim is None:
                return False
            self.drop(victim)
            extents = self.ssd.write_chunks(runs)  # type: ignore[union-attr, arg-type]
        if extents is None:
            return False
        for (chunk, upto), extent in zip(host, extents):
            self.free_chunk(chunk)  # (the host reservation it held: the bytes of lo..hi-1)
            chunk.extent, chunk.hi, chunk.nbytes = extent, upto, extent.nbytes
        self.kept.pop(seq_id, None)
        if not copy.live:
            self.kept[seq_id] = None  # still kept, now from the SSD tier: least recently used again
            self.kept.move_to_end(seq_id, last=False)
        return True

    def _runs_upto(self, chunk: Chunk, upto: int) -> torch.Tensor | list[torch.Tensor] | None:
        """A host chunk's bytes of positions lo..upto-1 for the SSD tier: its buffer where upto is its end, else the
        slices of it holding them, in the order a buffer of just those positions has them (a run's first rows lie
        at its start in the buffer: a segment's rows, or whole paged blocks), with no copy made; None where that
        cannot be cut (no layout given, or nothing before upto: truncate drops such chunks)."""
        if chunk.hi <= upto:
            return chunk.buf
        if self.spans is None or upto <= chunk.lo:
            return None
        at = {piece[:2]: lo for piece, lo, _ in self.spans(chunk.lo, chunk.hi)}
        runs: list[tuple[int, int]] = []
        for piece, lo, hi in self.spans(chunk.lo, upto):
            start = at[piece[:2]]
            if runs and runs[-1][1] == start:  # adjacent in the buffer too: one run
                runs[-1] = (runs[-1][0], start + hi - lo)
            else:
                runs.append((start, start + hi - lo))
        return [chunk.buf[a:b] for a, b in runs]  # type: ignore[index]

    def _demote_live(self, for_seq: int, busy: Container[int]) -> bool:
        """Under host pressure with no kept copy left, the oldest live copy with host chunks goes to SSD."""
        for seq_id, copy in list(self.copies.items()):  # a demotion may drop kept copies from the SSD tier
            if seq_id != for_seq and seq_id not in busy and copy.live \
                    and self.on_host(seq_id) and self.demote(seq_id):
                return True
        return False
