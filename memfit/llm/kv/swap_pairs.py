"""The (destination, source) pairs a swap copies, one pair per copy (kv/swap.py runs them, swap_inflight.py on a pool).

- `restore_pairs`: a swap-in, chunk by chunk in order (a later chunk rewrites a partly valid block of an earlier one).
- `merge_pairs`: a swap-out that merges the copy's trailing host chunks and its new tokens into one host buffer.

Why merge. With cross-turn reuse every swap-out of a sequence adds one chunk holding only its new tokens, and a
swap-in copies every chunk separately: after n turns, n copies per segment where one would do (on an H200, 2,089
swap-in copies of ~1.6 MB for 272 swap-ins; issue 15). So once a copy's trailing run of host chunks reaches
`merge_at`, the next swap-out writes those chunks' bytes (host to host) and its new tokens (device to host) into
one buffer that replaces them: a swap-in then makes at most `merge_at` copies per segment for the host part. The
merge runs where that swap-out's copy runs (the pool when it is asynchronous), not on a swap-in, which is what a
request waits for; it costs one host copy of the held history every `merge_at` swap-outs. Where a chunk's runs
move in one copy (the virtual cache on the CPU) a held chunk costs a swap-in one call, so there the merge waits
for more chunks (kv/swap.py: MERGE_AT_STACKED, and what it was measured against).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from memfit.llm.kv.base import KVCacheError
from memfit.llm.kv.swap_inflight import copy_in
from memfit.llm.kv.swap_layout import RowBlock, SwapRuns
from memfit.llm.kv.swap_reuse import Chunk, Copy

if TYPE_CHECKING:
    from memfit.llm.kv.swap_ssd import SSDTier

__all__ = ["Pair", "merge_out", "merge_pairs", "restore_pairs", "ssd_runs", "tail_run"]

Pair = tuple[object, object]  # (destination run, source: a host slice, or an SSD reader; or two RowBlocks)


def restore_pairs(lay: SwapRuns, ssd: SSDTier | None, seq_id: int, copy: Copy,
                  by_address: Callable[[int], bool] | None = None) -> tuple[list[Pair], int]:
    """Pairs restoring positions 0..valid-1 of `seq_id`, and the bytes they move from host buffers (the SSD tier
    counts its own reads). A source is a host buffer slice, or consecutive SSD chunks (read in one call and checked
    on the copying thread). Where a chunk stacks and `by_address(its bytes)` says so, its pair is two `RowBlock`s
    (the slot's rows and the buffer's, by address: kv/swap.py BY_ADDRESS_MAX), not two views."""
    table = lay.table(seq_id)
    pairs: list[Pair] = []
    nbytes = 0
    group: list[Chunk] = []  # consecutive SSD chunks: read in one call (swap_ssd.py: one submission at a time)

    def flush() -> None:
        if group:
            runs = [r for c in group for r in ssd_runs(lay, ssd, seq_id, c.hi, c.lo, table)]  # type: ignore[arg-type]
            pairs.append((runs, ssd.reader([c.extent for c in group])))  # type: ignore[union-attr, misc]
            group.clear()
    for chunk in copy.chunks:
        if chunk.buf is None:  # on SSD: read into the runs, then the checksums (hi <= valid)
            if group and not ssd.batch:  # type: ignore[union-attr]
                flush()
            group.append(chunk)
            continue
        flush()  # a host chunk rewrites a partly valid block of the SSD chunks before it: keep the order
        if chunk.lo >= copy.valid:
            continue
        hi = min(chunk.hi, copy.valid)
        rows = lay.stacked_rows(seq_id, chunk.lo, hi) if by_address is not None else None
        if rows is not None and by_address(rows.numel()):  # type: ignore[misc]
            stride = (chunk.hi - chunk.lo) * lay.kv.row_bytes  # type: ignore[attr-defined]  # the buffer is segment-major
            if chunk.buf.numel() != lay.segments * stride:  # type: ignore[union-attr]  # (as _rows checks)
                raise KVCacheError(f"swap-in layout differs from swap-out ({chunk.lo}..{chunk.hi}: "
                                   f"{chunk.buf.numel()} bytes held, {lay.segments * stride} expected)")  # type: ignore[union-attr]
            pairs.append((rows, RowBlock(chunk.buf.data_ptr(), stride, rows.rows, rows.row_bytes, chunk.buf)))  # type: ignore[union-attr]
            nbytes += rows.numel()
            continue
        block = lay.stacked(seq_id, chunk.lo, hi)
        if block is not None:  # the virtual cache: the chunk's valid rows of every segment in one copy
            src = _rows(lay, chunk)[:, : block.shape[1]]
            pairs.append((block, src))
            nbytes += block.numel()
            continue
        spans = lay.spans(chunk.lo, chunk.hi)
        if (spans[-1][2] if spans else 0) != chunk.buf.numel():
            raise KVCacheError(f"swap-in layout differs from swap-out ({chunk.lo}..{chunk.hi}: "
                               f"{chunk.buf.numel()} bytes held)")
        kept = []
        for (j, a, b), lo, hi in spans:
            if a >= copy.valid:
                continue
            if lay.kv.fixed_stride and b > copy.valid:  # rows past `valid` are stale: leave them out
                b, hi = copy.valid, lo + (copy.valid - a) * lay.kv.row_bytes  # type: ignore[attr-defined]
            kept.append(((j, a, b), lo, hi))
        for piece, lo, hi in lay.coalesce(kept, table):  # block groups: one copy per contiguous run
            pairs.append((lay.view(seq_id, piece, table), chunk.buf[lo:hi]))
            nbytes += hi - lo
    flush()
    return pairs, nbytes


def ssd_runs(lay: SwapRuns, ssd: SSDTier, seq_id: int, hi: int, lo: int = 0, table: list[int] | None = None) -> list:
    """Positions lo..hi-1 of `seq_id` as the SSD tier's runs: by address on the CPU (SwapRuns.addresses: its C loop
    wants pointers only), else tensor views."""
    spans = lay.addresses(seq_id, hi, lo, table) if ssd.by_address else None
    return lay.runs(seq_id, hi, lo, table) if spans is None else spans


def _rows(lay: SwapRuns, chunk: Chunk) -> torch.Tensor:
    """A host chunk of the virtual cache as (segments, bytes): row j segment j's run (the buffer is segment-major)."""
    want = lay.segments * (chunk.hi - chunk.lo) * lay.kv.row_bytes  # type: ignore[attr-defined]
    if chunk.buf.numel() != want:  # type: ignore[union-attr]
        raise KVCacheError(f"swap-in layout differs from swap-out ({chunk.lo}..{chunk.hi}: "
                           f"{chunk.buf.numel()} bytes held, {want} expected)")  # type: ignore[union-attr]
    return chunk.buf.view(lay.segments, -1)  # type: ignore[union-attr]


def tail_run(copy: Copy) -> list[Chunk]:
    """The copy's trailing host chunks, oldest first (what a merge may replace: SSD chunks before them stay)."""
    tail: list[Chunk] = []
    for chunk in reversed(copy.chunks):
        if chunk.buf is None:
            break
        tail.append(chunk)
    return tail[::-1]


def merge_pairs(lay: SwapRuns, seq_id: int, olds: list[Chunk], start: int, hi: int,
                buf: torch.Tensor) -> tuple[list[Pair], list[Pair]]:
    """Pairs filling `buf`, a buffer for positions olds[0].lo..hi-1: (host pairs) each old chunk's bytes for the
    positions it alone holds, up to the next chunk's start (the next one rewrote what they share), the last up
    to `start`; (device pairs) the sequence's runs of start..hi-1, each written where the merged layout puts it."""
    lo0 = olds[0].lo
    block = lay.stacked(seq_id, start, hi)
    if block is not None:  # the virtual cache: one copy per old chunk and one for the new rows, (segments, bytes) each
        row = lay.kv.row_bytes  # type: ignore[attr-defined]
        rows = buf.view(lay.segments, -1)  # the merged buffer, segment-major
        ends = [c.lo for c in olds[1:]] + [start]
        host_blocks: list[Pair] = [(rows[:, (c.lo - lo0) * row : (end - lo0) * row], _rows(lay, c)[:, : (end - c.lo) * row])
                                   for c, end in zip(olds, ends)]
        return host_blocks, [(rows[:, (start - lo0) * row :], block)]
    host: list[Pair] = []
    for chunk, end in zip(olds, [c.lo for c in olds[1:]] + [start]):  # chunks start on a granule, in order
        for seg in range(lay.segments):
            n = lay.piece_bytes((seg, chunk.lo, end))
            src, dst = lay.offset(chunk.lo, chunk.hi, seg, chunk.lo), lay.offset(lo0, hi, seg, chunk.lo)
            host.append((buf[dst : dst + n], chunk.buf[src : src + n]))  # type: ignore[index]
    table = lay.table(seq_id)
    device: list[Pair] = []
    for piece, a, b in lay.coalesce(lay.spans(start, hi), table):
        dst = lay.offset(lo0, hi, piece[0], piece[1])
        device.append((buf[dst : dst + b - a], lay.view(seq_id, piece, table)))
    return host, device


def merge_out(host: list[Pair], device: list[Pair]) -> float:
    """Run a merging swap-out's copies: the held bytes, then the new runs; returns the seconds of the new runs
    alone (what the cost model's copy bandwidth is measured on)."""
    copy_in(host)
    return copy_in(device)
