"""The host swap tier: where a preempted sequence's KV waits, so that it resumes without recomputation.

    swap = SwapSpace(kv, MemoryBudget(8 << 30, Tier.HOST, name="swap_space", parent=ledger), reuse=True)
    swap.try_swap_out(seq_id, n)   # before the scheduler frees the sequence's KV: copy positions 0..n-1 out
    kv.try_allocate(seq_id, n + k); swap.swap_in(seq_id)   # later, into whatever memory it gets then

The scheduler calls these (it never touches a tensor itself); this module and the KV manager own the copies.
A swapped sequence's KV is a list of chunks (swap_reuse.py), each one host buffer (uint8, pinned on CUDA) holding
a token range [lo, hi) of every segment, reserved in the swap budget before it is allocated: a full tier refuses
(`try_swap_out` returns False) and the scheduler recomputes the sequence instead.

How many runs a swap moves is the cache's layout, the point of FastSwitch's block groups: one run per segment
in the virtual cache, one per block in the paged one, one per contiguous run of blocks in the paged one with block
groups (swap_layout.py; `block_tokens` splits the virtual runs). Each run is a copy, except in a virtual cache on
the CPU, whose runs of a chunk are one strided (segments, bytes) copy (`SwapRuns.stacked`); the stats count runs.

Cross-turn reuse (`reuse`, FastSwitch's third idea): a swap-in leaves the host copy in place, *kept*, so the
sequence's next swap-out copies only its new tokens; kept copies are evicted least recently used first. The book
of copies (chunks, valid ranges, the LRU, making room, demotion to the SSD tier) is swap_reuse.py.

With `threads` > 0 both directions may run on a thread pool, overlapped with the model step (FastSwitch's swap
manager; the asynchronous half and the copies are swap_inflight.py). A swap-out with `wait=False` reserves the
host bytes and launches the copy; the sequence keeps its device KV (still counted in the KV budget, so no budget
is exceeded while both copies exist) until the scheduler calls `finish_swap_out` and only then frees it, so
nothing reads memory that was freed or reused mid-copy. The scheduler swaps synchronously when there is no step
to overlap with. A swap-out that spills straight to the SSD tier (the
host tier is full) takes its extent on the engine thread (the allocator and the tier's budget live there) and
writes it on the pool; demotions of host chunks stay synchronous.
A swap-in that cannot be served (an SSD read failed or its checksum did not match: `SwapLost`) returns None;
the scheduler then recomputes the sequence, so corrupt KV is never served.

`prefers_swap` is the `auto` preemption mode's cost model (swap_model.py).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from memfit.llm.kernels.copy_rows import in_one_call
from memfit.llm.kv.base import KVCacheError, KVCacheManager
from memfit.llm.kv.swap_inflight import InFlightSwaps
from memfit.llm.kv.swap_inflight import copy_in as _copy_in  # module names: tests patch swap._copy_out
from memfit.llm.kv.swap_inflight import copy_out as _copy_out
from memfit.llm.kv.swap_inflight import host_copies as _host_copies
from memfit.llm.kv.swap_inflight import run_count
from memfit.llm.kv.swap_layout import SwapRuns
from memfit.llm.kv.swap_model import OWNER, SWAP_SECONDS_BUCKETS, CostModel, SwapLost, SwapStats
from memfit.llm.kv.swap_pairs import merge_out, merge_pairs, restore_pairs, ssd_runs, tail_run
from memfit.llm.kv.swap_reuse import Chunk, Copy, HostCopies
from memfit.memory.budget import MemoryBudget, format_bytes
from memfit.memory.extent_map import extent_bytes
from memfit.memory.host_region import HostRegion, budget_for, table_bytes
from memfit.memory.mapping import VirtualMemoryError

if TYPE_CHECKING:
    from memfit.llm.kv.swap_ssd import SSDTier

log = logging.getLogger(__name__)

__all__ = ["MERGE_AT", "MERGE_AT_STACKED", "SWAP_SECONDS_BUCKETS", "CostModel", "SwapLost", "SwapSpace", "SwapStats"]

MERGE_AT = 2  # a swap-in makes at most this many copies per segment from host chunks (swap_pairs.py)
# Where a chunk's runs move in one copy (`SwapRuns.stacks`: the virtual cache on the CPU), a held chunk costs a
# swap-in one copy call, not one per segment, while a merge copies the whole held history again, host to host:
# merging at 2 made the 0.5B multi-turn run's reuse swap-outs of a few new tokens (24-600 KB) take 2-6 ms each
# (the history's 3-12 MB re-copied): the host tier ran at 0.49 of memcpy merging at 2, 0.60 at 8 (issue 15;
# docs/benchmarks.md, "Longer histories"). So there a copy's chunks are merged only once they are this many.
MERGE_AT_STACKED = 8
# A stacked swap (the CPU virtual cache) copies its rows by address (`SwapRuns.stacked_rows`, all a chunk's rows in
# one C call, kernels/copy_rows.py), without the views and the torch copy, each slow right after a model step:
# 0.78-0.94x their time a swap with cold caches (benchmarks/swap_cold.py; docs/engine.md, "A swap-out's fixed
# cost"). Not above BY_ADDRESS_MAX bytes with several threads (torch's copy splits a large copy across the engine's
# threads; there the copy's own time dominates). Where the C call cannot run (the rows go a ctypes.memmove each),
# also not above BY_ADDRESS_ROWS rows (a Python call a row: a head-major cache of a large model has thousands),
# nor on the swap pool (each row's memmove lets the GIL go and must take it back from the engine thread: the SSD
# tier's Python loop paid up to a switch interval a call that way, kernels/cpu_staged_io.cpp); the C call lets it
# go once, as torch's copy does.
BY_ADDRESS_MAX = 8 << 20
BY_ADDRESS_ROWS = 256

class SwapSpace(InFlightSwaps):
    def __init__(self, kv: KVCacheManager, budget: MemoryBudget, cost: CostModel | None = None,
                 threads: int = 0, block_tokens: int | None = None, reuse: bool = False,
                 ssd: SSDTier | None = None, keep_bytes: int | None = None, region: bool = False,
                 warm_ahead: bool = False) -> None:
        if not (kv.fixed_stride or kv.block_tables):
            raise ValueError(f"the {kv.kind or type(kv).__name__} KV cache cannot be swapped (it declares neither "
                             "fixed_stride nor block_tables)")
        if threads < 0:
            raise ValueError(f"swap threads must be >= 0, got {threads}")
        if block_tokens is not None and block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.kv, self.budget, self.cost, self.threads = kv, budget, cost, threads
        self.run_map = SwapRuns(kv, block_tokens)  # where a sequence's KV lives, as runs (swap_layout.py)
        self.reuse, self.ssd = reuse, ssd
        self.pin = kv.layout.device.type == "cuda"
        self.granule = self.run_map.granule  # a chunk starts on one
        self.stats = SwapStats()
        self.async_swap_ins = 0  # swap-ins that ran on the pool (the rest were synchronous)
        self.async_swap_outs = 0  # swap-outs that ran on the pool
        # a copy's trailing host chunks are merged at a swap-out once this many (0: never; None: by the layout,
        # MERGE_AT_STACKED where a chunk moves in one copy, else MERGE_AT: `merging_at`)
        self.merge_at: int | None = None
        self.by_address = True  # stacked swaps copy rows by address (BY_ADDRESS_MAX); benchmarks turn it off
        if self.run_map.stacks:
            in_one_call()  # the row copy's library loaded now, not inside the first swap (whose time it would join)
        # `region` (the engine's choice): the CPU tier's buffers come from a region of its own whose freed pages stay
        # committed (up to keep_bytes; None: the whole budget), so a swap-out writes into warm pages
        # (memory/host_region.py: why); the budget then also holds those pages, under the region's owner
        self.region = self._region(budget, keep_bytes) if region and not self.pin and HostRegion.supported else None
        # `warm_ahead` (the engine's choice, with a region): after each swap-out the region faults in the pages the
        # next one will take, up to the largest chunk taken so far, on a thread of its own (`_warm`)
        self.warm_ahead = warm_ahead
        self._ahead = 0  # the largest chunk taken from the region
        self._whole: int | None = None  # a full-length sequence's bytes (the warming's cap), shaped once
        # what is held, kept, evicted (swap_reuse.py)
        self.book = HostCopies(budget, self.stats, ssd, self.region, self.run_map.spans)
        self._inflight: dict[int, tuple[int, int, Future]] = {}  # seq -> (copies, bytes, future of seconds)
        # swap-outs on the pool: seq -> (copies, bytes, future, spill); spill = (chunk, offset) for a run written
        # straight to the SSD tier (its extent is known once the write and its CRC land), else None
        self._outflight: dict[int, tuple[int, int, Future, tuple[Chunk, int] | None]] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def _copies(self) -> dict[int, Copy]:  # the held copies by sequence id (tests look at their chunks)
        return self.book.copies

    @property
    def block_tokens(self) -> int | None:  # benchmarks/preemption.py sets it on a built engine's swap
        return self.run_map.block_tokens

    @block_tokens.setter
    def block_tokens(self, value: int | None) -> None:
        self.run_map.block_tokens = value

    def runs(self, seq_id: int, num_tokens: int, lo: int = 0) -> list[torch.Tensor]:
        """The memory holding positions lo..num_tokens-1 of `seq_id`, as contiguous uint8 runs (swap_layout.py)."""
        return self.run_map.runs(seq_id, num_tokens, lo)

    def runs_shape(self, num_tokens: int, lo: int = 0) -> tuple[int, int]:
        """(bytes, copies) a swap of positions lo..num_tokens-1 moves each way."""
        return self.run_map.shape(num_tokens, lo)

    def merging_at(self) -> int:
        """How many trailing host chunks a copy must hold for its next swap-out to merge them (the whole trailing
        run, which may be longer where a merge was skipped for room) with its new tokens; 0: never. `merge_at`,
        or the layout's default."""
        if self.merge_at is not None:
            return self.merge_at
        return MERGE_AT_STACKED if self.run_map.stacks else MERGE_AT

    # ---- the scheduler's calls ----------------------------------------------------------------------
    def holds(self, seq_id: int) -> bool:
        """A copy of `seq_id`'s KV is held (swapped out, or kept for reuse)."""
        return seq_id in self._copies

    def valid_tokens(self, seq_id: int) -> int:
        return self.book.valid_tokens(seq_id)

    def held_bytes(self) -> int:
        """Bytes of every chunk held on the host, summed from the buffers themselves."""
        return self.book.held_bytes()

    def swap_shape(self, seq_id: int, num_tokens: int) -> tuple[int, int]:
        """(bytes, copies) swapping `seq_id`'s positions 0..num_tokens-1 out makes, from where its KV lies now
        (block groups: its contiguous runs, not its blocks); the swap-in is modelled with the same count."""
        return self.run_map.seq_shape(seq_id, num_tokens)

    def prefers_swap(self, num_tokens: int, seq_id: int | None = None) -> bool:
        """The `auto` mode's choice: swapping out and back in is modelled cheaper than recomputing. With
        `seq_id`, the copies are the sequence's own runs (swap_shape), else the layout's most (runs_shape); one
        copy where its runs move as one (a CPU virtual cache: `SwapRuns.stacks`)."""
        if self.cost is None:
            return True
        nbytes, runs = self.runs_shape(num_tokens) if seq_id is None else self.swap_shape(seq_id, num_tokens)
        return self.cost.swap_s(nbytes, 1 if self.run_map.stacks else runs) < self.cost.recompute_s(num_tokens)

    def try_swap_out(self, seq_id: int, num_tokens: int, keep: bool = False, wait: bool = True) -> bool:
        """Copy positions 0..num_tokens-1 of `seq_id` to the host tier; False (nothing held) if it is full. With
        a kept copy of the first `valid` positions only the rest is copied. `keep`: the copy is evictable at
        once (a finished turn's KV, not a preempted sequence's). The caller frees the sequence's KV afterwards:
        at once, or, if `swapping_out(seq_id)` (`wait=False` with threads: the copy runs on the pool), only
        after `finish_swap_out`."""
        copy = self._copies.get(seq_id)
        if copy is not None and copy.live:
            raise KVCacheError(f"sequence {seq_id} is already swapped out")
        start = 0
        if copy is not None:
            self.book.truncate(copy, num_tokens)
            start = copy.valid - copy.valid % self.granule  # positions before it are held and unchanged
            self.book.drop_chunks(copy, start)  # a partly valid last block is copied again
            self.book.mark_kept(seq_id, False)  # not a victim while room is made for its own new tokens
        t0 = time.perf_counter()
        nbytes = self.run_map.shape(num_tokens, start)[0]
        spilled: object = None
        if nbytes and not self.book.reserve(nbytes, seq_id, self._busy()):
            if self.ssd is not None and not keep:  # the host tier cannot hold it: straight to the SSD tier
                runs = ssd_runs(self.run_map, self.ssd, seq_id, num_tokens, start)  # by address on the CPU
                if wait or not self.threads:
                    spilled = self.ssd.write_runs(runs)
                else:  # placed here (the allocator is the engine thread's), written and checksummed on the pool
                    off = self.ssd.place(nbytes)
                    if off is not None:
                        spilled = (off, self._pool_().submit(self.ssd.write_at, off, runs))
            if spilled is None:
                if copy is not None:
                    self.book.drop(seq_id)  # the sequence is recomputed: its older tokens are of no use alone
                return False
        if copy is None:
            copy = self._copies[seq_id] = Copy([], 0, False)
        if isinstance(spilled, tuple):
            chunk = Chunk(start, num_tokens, nbytes, None, None)
            copy.chunks.append(chunk)
            self._outflight[seq_id] = (1, nbytes, spilled[1], (chunk, spilled[0]))
        elif spilled is not None:
            copy.chunks.append(Chunk(start, num_tokens, nbytes, None, spilled))
        elif nbytes:
            olds, size = self._merge_plan(copy, start, num_tokens, nbytes)  # swap_pairs.py: why merge
            buf = None
            try:
                buf = self._host_buffer(size)
                job: tuple  # (the copy function, its arguments)
                if olds:  # (held bytes, new runs) pairs, resolved here on the engine thread like the runs
                    host, device = merge_pairs(self.run_map, seq_id, olds, start, num_tokens, buf)
                    ops, job = sum(run_count(src) for _, src in device), (merge_out, host, device)  # type: ignore[arg-type]
                elif self.by_address and (wait or not self.threads or in_one_call()) and self._by_address(nbytes) and \
                        (rows := self.run_map.stacked_rows(seq_id, start, num_tokens)) is not None:
                    ops, job = rows.rows, (_copy_out, [rows], buf)  # the stacked rows by address (BY_ADDRESS_MAX)
                else:  # the virtual cache's runs as one (segments, bytes) block where it can (swap_layout.py)
                    block = self.run_map.stacked(seq_id, start, num_tokens)
                    runs = [block] if block is not None else self.runs(seq_id, num_tokens, start)
                    ops, job = sum(run_count(r) for r in runs), (_copy_out, runs, buf)
                if wait or not self.threads:
                    job[0](*job[1:])
                else:  # the chunk is booked now; its bytes land while the model step runs
                    self._outflight[seq_id] = (ops, nbytes, self._pool_().submit(*job), None)
            except BaseException:  # nothing reads or writes the buffer now (the copy failed, or never started)
                if buf is not None and self.region is not None and self.region.owns(buf):
                    self.budget.release(size, OWNER)
                    self.region.free(buf)
                else:  # no region buffer took the reservation: what it borrowed from warm pages goes back
                    self.book.unreserve(size)
                raise
            if olds:  # the merged chunk replaces the trailing run; the old buffers go once its copy has landed
                del copy.chunks[len(copy.chunks) - len(olds):]
                self.book.retire(seq_id, olds)
                self.stats.merges += 1
                if seq_id not in self._outflight:
                    self.book.settle(seq_id)
            copy.chunks.append(Chunk(olds[0].lo if olds else start, num_tokens, size, buf))
            self.stats.resident_bytes += size
            if seq_id not in self._outflight:
                self._account(self.stats, nbytes, ops, time.perf_counter() - t0, out=True)
            self._warm()
        self.stats.reused_tokens += start
        copy.valid, copy.live = num_tokens, not keep
        self.book.mark_kept(seq_id, keep)
        return True

    def swap_in(self, seq_id: int) -> int | None:
        """Copy `seq_id`'s KV back into the memory the KV manager now gives it (the caller allocated at least
        the valid tokens) and mark them written; the host copy is kept (reuse) or freed. Returns the tokens
        restored, or None when they cannot be read back intact (SwapLost; the copy is dropped): the caller
        recomputes the sequence."""
        copy = self._live(seq_id)
        pairs, nbytes = self._pairs(seq_id, copy)
        try:
            seconds = _copy_in(pairs)
        except SwapLost:
            self._lost(seq_id)
            return None
        return self._complete(seq_id, copy, _host_copies(pairs), nbytes, seconds)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Positions from `num_tokens` on are about to be overwritten (a new turn's prompt diverged there)."""
        copy = self._copies.get(seq_id)
        if copy is not None:
            self.book.truncate(copy, num_tokens)
            if copy.valid == 0:
                self.book.drop(seq_id)

    def adopt(self, seq_id: int, num_tokens: int) -> int:
        """A session's next turn takes over the kept copy of `seq_id` for its first `num_tokens` tokens: the copy
        becomes live (swapped out, awaiting its swap-in). Returns the tokens it will restore (0: none held)."""
        if seq_id not in self._copies:
            return 0
        self.truncate(seq_id, num_tokens)
        copy = self._copies.get(seq_id)
        if copy is None:
            return 0
        copy.live = True
        self.book.mark_kept(seq_id, False)
        return copy.valid

    def discard(self, seq_id: int) -> None:
        """The sequence finished or was aborted (or is recomputed): forget its host copy."""
        if seq_id in self._inflight:  # copies into its KV, or out of it: let them land before either is freed
            self._inflight.pop(seq_id)[2].exception()
        if seq_id in self._outflight:
            self._land_out(seq_id)
        self.book.drop(seq_id)

    def trim(self) -> int:
        """Give back the host pages no held chunk uses (the region's cache); the bytes returned."""
        return self.region.trim() if self.region is not None else 0

    def close(self) -> None:
        for seq_id in [*self._copies, *self._inflight, *self._outflight]:
            self.discard(seq_id)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.region is not None:
            self.region.close()
        if self.ssd is not None:
            self.ssd.close()

    # ---- inside ----------------------------------------------------------------------------------------

    def _region(self, budget: MemoryBudget, keep_bytes: int | None) -> HostRegion | None:
        # the region's tables are in the tier's budget (host_region.py); a tier that cannot hold them and one chunk
        # (a granule of tokens) could never swap anything, so it is refused here, at start, rather than at each swap
        tables, chunk = table_bytes(budget.limit_bytes), self.run_map.shape(self.granule)[0]
        if tables + extent_bytes(chunk) > budget.limit_bytes:
            need = budget_for(chunk)
            raise ValueError(
                f"the host swap tier's {format_bytes(budget.limit_bytes)} (--swap-space) cannot hold its region's page "
                f"map and extent tables ({format_bytes(tables)}) and one chunk of {self.granule} token(s) "
                f"({format_bytes(chunk)}); give --swap-space at least {format_bytes(need)} ({need} bytes)")
        if budget.free_bytes < tables:  # the tier's own share holds them, the ledger it draws on (no --swap-space
            # on a CPU: the whole --memory-budget, shared with the KV cache) has not the room: as without a region
            log.warning("the host swap tier's region needs %s for its page map and extent tables and the memory "
                        "budget has %s free (--memory-budget, --swap-space); its chunks get buffers of their own",
                        format_bytes(tables), format_bytes(budget.free_bytes))
            return None
        try:
            return HostRegion(budget.limit_bytes, budget, keep_bytes)
        except VirtualMemoryError as exc:  # address space capped (ulimit -v, strict overcommit): buffers of their own
            log.warning("the host swap tier's region of %d bytes could not be mapped (%s); its chunks get buffers of "
                        "their own", budget.limit_bytes, exc)
            return None

    def _host_buffer(self, size: int) -> torch.Tensor:
        """A (size,) uint8 host buffer for a chunk (its bytes reserved by the caller): from the region, or, where
        it has no free extent that large (fragmented) or there is none (CUDA: pinned), a buffer of its own."""
        buf = self.region.take(size) if self.region is not None else None
        if buf is not None:
            self._ahead = max(self._ahead, size)
        return buf if buf is not None else torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def _warm(self) -> None:
        """After a swap-out's copy (or its launch), the region faults in the pages of the next chunk on a thread of
        its own, up to the largest chunk taken so far, so that swap-out copies into warm pages: in a serving run most
        of a 0.5B swap-out's time was faulting in and zeroing its cold pages (issue 15; docs/engine.md "region").
        Not before the copy: that thread's Python would take the GIL from the copy's."""
        if self.warm_ahead and self.region is not None and self._ahead:
            # twice the largest chunk, up to one whole sequence: a reuse swap-out of new tokens is smaller than the
            # first, a longer sequence's first larger (the 0.5B run's second swap-out, 3.1 MB after 1.8, was still
            # half cold when this was the largest chunk alone)
            if self._whole is None:  # once: shaping a full-length sequence walks all its pieces (ms at 32k tokens)
                self._whole = self.run_map.shape(self.kv.layout.max_seq_len)[0]
            self.region.warm_ahead(max(self._ahead, min(2 * self._ahead, self._whole)), least=self._ahead)

    def _live(self, seq_id: int) -> Copy:
        copy = self._copies.get(seq_id)
        if copy is None or not copy.live:
            raise KVCacheError(f"sequence {seq_id} is not swapped out")
        return copy

    def _pairs(self, seq_id: int, copy: Copy, on_pool: bool = False) -> tuple[list[tuple[object, object]], int]:
        by_address = self._by_address if self.by_address and (not on_pool or in_one_call()) else None
        return restore_pairs(self.run_map, self.ssd, seq_id, copy, by_address)  # swap_pairs.py

    def _by_address(self, nbytes: int) -> bool:
        """Whether a stacked copy of `nbytes` goes by address rather than through torch's copy (BY_ADDRESS_MAX,
        BY_ADDRESS_ROWS)."""
        return (nbytes <= BY_ADDRESS_MAX or torch.get_num_threads() == 1) and \
            (self.run_map.segments <= BY_ADDRESS_ROWS or in_one_call())

    def _merge_plan(self, copy: Copy, start: int, num_tokens: int, nbytes: int) -> tuple[list[Chunk], int]:
        """(the host chunks a swap-out of start..num_tokens-1 merges with its new tokens, the merged buffer's bytes):
        the trailing run once it has `merging_at()` chunks and the tier has room for the merged buffer beside them
        (reserved here; nothing is evicted for it), else ([], nbytes)."""
        olds = tail_run(copy)
        at = self.merging_at()
        if not at or len(olds) < at:
            return [], nbytes
        size = self.run_map.shape(num_tokens, olds[0].lo)[0]
        if not self.book.try_reserve(size - nbytes):  # nothing is evicted for a merge
            return [], nbytes
        return olds, size

    def _complete(self, seq_id: int, copy: Copy, copies: int, nbytes: int, seconds: float) -> int:
        self.kv.mark_restored(seq_id, copy.valid)  # a restored sequence holds these tokens again
        self.stats.swap_ins += 1
        self._account(self.stats, nbytes, copies, seconds, out=False)
        if self.reuse:
            copy.live = False
            self.book.mark_kept(seq_id, True)
        else:
            self.book.drop(seq_id)
        return copy.valid

    def _lost(self, seq_id: int) -> None:
        self.stats.io_errors += 1
        self.book.drop(seq_id)

    def _account(self, st: SwapStats, nbytes: int, ops: int, seconds: float, out: bool) -> None:
        st.account(nbytes, ops, seconds, out)
        if self.cost is not None:
            self.cost.observe_copy(nbytes, seconds)
