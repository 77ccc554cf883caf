"""Swaps in flight on the thread pool (FastSwitch's swap manager), the asynchronous half of `SwapSpace` (kv/swap.py),
and the copies both halves run.

A swap-in: `start_swap_in` launches the copies into the memory the sequence was just given, the scheduler admits
the sequence only once `swap_in_ready`, and `finish_swap_in` completes it on the engine thread. A swap-out:
`try_swap_out(..., wait=False)` (kv/swap.py) books the chunk and submits its copy here; the sequence keeps its
device KV until `finish_swap_out` lands it, and only then does the scheduler free it. `_busy()` names the
sequences with copies in flight, whose host chunks are not demoted meanwhile. The copies are torch copies, a
stacked chunk's rows by address in one C call (kernels/copy_rows.py) and the SSD tier's C loop (or
`os.pwritev`/`os.preadv`), all of which release the GIL.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from memfit.llm.kv.base import KVCacheError
from memfit.llm.kv.swap_layout import RowBlock
from memfit.llm.kv.swap_model import SwapLost, SwapStats
from memfit.llm.kv.swap_reuse import Chunk, HostCopies

if TYPE_CHECKING:
    from memfit.llm.kv.swap_ssd import SSDTier

__all__ = ["InFlightSwaps", "copy_in", "copy_out", "host_copies", "run_count"]


class InFlightSwaps:
    """Mixed into SwapSpace, which builds these fields and defines the `_copies`, `_live`, `_pairs`, `_complete`,
    `_lost` and `_account` used here."""

    threads: int
    stats: SwapStats
    book: HostCopies
    ssd: SSDTier | None
    async_swap_ins: int  # swap-ins that ran on the pool (the rest were synchronous)
    async_swap_outs: int  # swap-outs that ran on the pool
    _pool: ThreadPoolExecutor | None
    _inflight: dict[int, tuple[int, int, Future]]  # seq -> (copies, bytes, future of seconds)
    # swap-outs on the pool: seq -> (copies, bytes, future, spill); spill = (chunk, offset) for a run written
    # straight to the SSD tier (its extent is known once the write and its checksum land), else None
    _outflight: dict[int, tuple[int, int, Future, tuple[Chunk, int] | None]]

    def swapping_out(self, seq_id: int) -> bool:
        """An asynchronous swap-out of `seq_id` is in flight: its device KV must stay until `finish_swap_out`."""
        return seq_id in self._outflight

    def swap_out_ready(self, seq_id: int) -> bool:
        return self._outflight[seq_id][2].done()

    def finish_swap_out(self, seq_id: int) -> bool:
        """Wait for an asynchronous swap-out (at once if `swap_out_ready`) and account it; the caller frees the
        sequence's device KV afterwards. False: the copy failed, nothing is held (the sequence is recomputed)."""
        self.async_swap_outs += 1
        spill = self._outflight[seq_id][3] is not None
        if not self._land_out(seq_id):
            if not spill:  # (a failed SSD write is counted by its tier)
                self.stats.io_errors += 1
            self.book.drop(seq_id)
            return False
        return True

    def start_swap_in(self, seq_id: int) -> None:
        """`swap_in` on the thread pool: the copies overlap the next model step (which must not touch this
        sequence's KV: it is not scheduled until `finish_swap_in`)."""
        if not self.threads:
            raise RuntimeError("asynchronous swap-in needs threads > 0")
        if seq_id in self._outflight:
            raise KVCacheError(f"sequence {seq_id} is still being swapped out")
        copy = self._live(seq_id)
        pairs, nbytes = self._pairs(seq_id, copy, on_pool=True)  # resolved here, on the engine thread
        self._inflight[seq_id] = (host_copies(pairs), nbytes, self._pool_().submit(copy_in, pairs))

    def in_flight(self, seq_id: int) -> bool:
        return seq_id in self._inflight

    def swap_in_ready(self, seq_id: int) -> bool:
        return self._inflight[seq_id][2].done()

    def finish_swap_in(self, seq_id: int) -> int | None:
        """Wait for an asynchronous swap-in (at once if `swap_in_ready`) and complete it on this thread; None as
        for `swap_in`."""
        copies, nbytes, future = self._inflight.pop(seq_id)
        self.async_swap_ins += 1
        try:
            seconds = future.result()
        except SwapLost:
            self._lost(seq_id)
            return None
        return self._complete(seq_id, self._copies[seq_id], copies, nbytes, seconds)

    def _pool_(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="memfit-swap")
        return self._pool

    def _land_out(self, seq_id: int) -> bool:
        """Wait for an asynchronous swap-out and book it: the host copy's stats, or the SSD chunk's extent. False:
        it failed (an SSD write: its extent is given back and the chunk removed, so the copy can be dropped)."""
        copies, nbytes, future, spill = self._outflight.pop(seq_id)
        try:
            result = future.result()
        except Exception:  # noqa: BLE001 - a failed copy is a lost swap: recomputed, never resumed from it
            self.book.settle(seq_id)
            if spill is not None:
                chunk, off = spill
                self._copies[seq_id].chunks.remove(chunk)
                self.ssd.unplace(off, chunk.nbytes)  # type: ignore[union-attr]
            return False
        if spill is not None:
            spill[0].extent = result  # the SSD tier counted its own bytes
        else:
            self.book.settle(seq_id)  # chunks a merge replaced: its copy has read them
            self._account(self.stats, nbytes, copies, result, out=True)
        return True

    def _busy(self) -> set[int]:
        """Sequences with copies in flight: their host chunks are not demoted to the SSD tier meanwhile."""
        return {*self._inflight, *self._outflight}


def copy_out(runs: list[torch.Tensor | RowBlock], buf: torch.Tensor) -> float:
    """Copy `runs` (uint8: 1-D runs, or (segments, bytes) blocks from `SwapRuns.stacked`, or a `RowBlock` by
    address from `SwapRuns.stacked_rows`), in order, into the host buffer `buf`; returns the seconds it took.
    A RowBlock's rows are copied by `RowBlock.copy_to` (one C call): the same bytes in the same order as the
    view's copy, without the view and the torch copy's dispatch (kv/swap.py: BY_ADDRESS_MAX)."""
    t0, off = time.perf_counter(), 0
    for r in runs:
        n = r.numel()
        if isinstance(r, RowBlock):
            if off + n > buf.numel():
                raise ValueError(f"{n} bytes of rows at offset {off} do not fit a {buf.numel()}-byte buffer")
            r.copy_to(buf.data_ptr() + off, r.row_bytes)  # packed: the buffer holds the rows back to back
            off += n
            continue
        dst = buf if n == buf.numel() else buf[off : off + n]  # a stacked chunk fills its buffer: no slice to make
        dst.view(r.shape).copy_(r)
        off += n
    return time.perf_counter() - t0


def copy_in(pairs: list[tuple[torch.Tensor, object]]) -> float:
    """Copy each source into its destination run (a host slice by a torch copy; an SSD chunk by its reader,
    which raises SwapLost on a bad read); returns the seconds the host copies took (the SSD tier times its own)."""
    seconds = 0.0
    for dst, src in pairs:
        if isinstance(src, RowBlock):  # a stacked chunk's rows by address (restore_pairs), in one C call
            t0 = time.perf_counter()
            src.copy_to(dst.address, dst.stride)  # type: ignore[attr-defined]
            seconds += time.perf_counter() - t0
        elif isinstance(src, torch.Tensor):
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds += time.perf_counter() - t0
        else:
            src(dst)  # type: ignore[operator]
    return seconds


def run_count(t: torch.Tensor) -> int:
    """The runs a copy moves: one a row of a (segments, bytes) block (`SwapRuns.stacked`), else one."""
    return t.shape[0] if t.dim() == 2 else 1


def host_copies(pairs: list[tuple[torch.Tensor, object]]) -> int:
    """Runs the host sources of `pairs` move (SwapStats counts runs, however few calls move them)."""
    return sum(run_count(src) for _, src in pairs if isinstance(src, (torch.Tensor, RowBlock)))
