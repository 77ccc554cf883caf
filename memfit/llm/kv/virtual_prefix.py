"""Prefix sharing by page aliasing for the `virtual` KV cache (issue 14): the part of VirtualKVCache that runs
when `prefix_caching` is on (its arena is then a `memfit.memory.vmem_shared.SharedArena`).

Blocks. A block is the fewest tokens whose rows fill whole pages of every segment (lcm(row, page) / row,
raised to at least 16 tokens), so block b of a slot is pages [b x ppb, (b+1) x ppb) of each segment and can
be mapped elsewhere as whole pages. Full blocks are hashed as they are written (kv/prefix.py).

A new sequence whose tokens start with cached blocks maps the holder's physical pages at the start of its
own slot (`SharedArena.alias`: no copy, no new memory), copies the rows of a partly matching last block
(less than one block per segment), and is prefilled from there. Its K/V stays one strided view per layer,
so every attention kernel reads it unchanged. Where the match is every full block of a cached (finished) prefix, the
sequence takes that slot itself instead, pages where they are (`_takes_in_place`).

Cached prefixes. A finished sequence whose full blocks nobody else holds keeps its slot with all its pages: the
full blocks for matching, and the pages past them as a pool the slot's next sequence reuses without a commit
(`_recycle`). An LRU of cached slots, twice `max_seqs` slots in all (address space is free). Cached pages are
reserved in the budget like any other, counted once however many slots map them; they go first when a commit
would not fit (before the scheduler refuses or preempts anyone; the pool pages of every cached slot before any
whole prefix), when a new sequence needs a slot, or when idle for `kv_reclaim_idle_s` above the watermark (pool
pages first there too). `cached_bytes` is what evicting them all would free.

Copy-on-write. Pages below `_shared_upto[slot]` (per segment) may be mapped by another slot too. Sequences
only write at or past their `written` count, which is past every block they share, except after `truncate`
(a session's next turn): then `try_grow` first gives the pages from the write position on a copy of their own
(`SharedArena.make_private`, reserved in the budget like a commit).
"""
from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Sequence

from memfit.llm.kv.base import KVCacheError, SeqRecord
from memfit.llm.kv.prefix import PrefixIndex, chain_hashes

MIN_BLOCK_TOKENS = 16  # vLLM's default block: shorter blocks would hash and map more often for little gain


class VirtualPrefixMixin:
    """Mixed into VirtualKVCache (which defines the slots, pages and arena this code uses)."""

    @staticmethod
    def prefix_geometry(row_bytes: int, page: int) -> tuple[int, int]:
        """(tokens, pages per segment) of one block: the fewest tokens whose rows fill whole pages, >= 16."""
        lcm = row_bytes * page // math.gcd(row_bytes, page)
        scale = -(-MIN_BLOCK_TOKENS // (lcm // row_bytes))
        return lcm // row_bytes * scale, lcm // page * scale

    def _init_prefix(self) -> None:
        self.prefix_block, self.block_pages = self.prefix_geometry(self.row_bytes, self.page)
        self.prefix_caching = True
        self._index = PrefixIndex()  # block hash -> slots holding it
        self._cached: OrderedDict[int, SeqRecord] = OrderedDict()  # finished slots kept for reuse, LRU first
        self._holder: dict[int, SeqRecord] = {}  # slot -> its record (live or cached): tokens for matching
        self._shared_upto = [0] * self.num_slots  # pages per segment that may be mapped by another slot too
        self._pinned: set[int] = set()  # cached slots an allocation in progress reads from: not evictable
        # Cached slots the idle reclaim would have evicted but kept for the sequences waiting to be placed
        # (`_reclaim_idle_prefix`'s keep_slots); `_take_slot` recycles them before it takes an empty slot.
        self._stale: set[int] = set()

    # ---- placing a sequence --------------------------------------------------------------------------
    def _match(self, token_ids: Sequence[int]) -> tuple[list[int], int | None, int]:
        """The hashes of the matched full blocks, a slot holding them (None without a hit), and how many
        tokens past them that slot's rows match too (copied, not aliased)."""
        bt, limit = self.prefix_block, len(token_ids) - 1  # the last token is always computed
        hashes = chain_hashes(token_ids, bt, limit=limit) if limit > 0 else []
        m = self._index.longest(hashes)
        while m:
            best, ext = None, -1
            for slot in self._index.holders(hashes[m - 1]):
                toks = self._holder[slot].tokens
                if toks[: m * bt] != list(token_ids[: m * bt]):  # a hash collision: never share those rows
                    continue
                held = min(len(toks), self._holder[slot].written, limit)
                e = 0
                while m * bt + e < held and toks[m * bt + e] == token_ids[m * bt + e]:
                    e += 1
                if e > ext:
                    best, ext = slot, e
            if best is not None:
                return hashes[:m], best, ext
            m -= 1
        return [], None, 0

    def _try_place_prefix(self, token_ids: Sequence[int], num_tokens: int,
                          final_tokens: int | None = None) -> tuple[SeqRecord, int] | None:
        match = self._match(token_ids)
        placed = self._place(token_ids, num_tokens, *match, final_tokens=final_tokens)
        if placed is None and match[1] is not None:
            # The matched holder stays pinned while the sequence maps it, so its blocks past the match count as
            # neither the sequence's nor reclaimable: a sequence that would fit alone could be refused. Placed
            # with no match, the holder may be evicted like any cached prefix (a live one is never evicted).
            placed = self._place(token_ids, num_tokens, [], None, 0, final_tokens=final_tokens)
        return placed

    def _place(self, token_ids: Sequence[int], num_tokens: int, hashes: list[int], src: int | None,
               ext: int, final_tokens: int | None = None) -> tuple[SeqRecord, int] | None:
        """Place a sequence that maps `hashes`' blocks of `src` and copies `ext` rows past them (none: no match)."""
        m = len(hashes)
        cached = m * self.prefix_block + ext
        # capacity for num_tokens after the cached ones, no further than the tokens known (none: a plain placement)
        need = self.pages_for(cached + min(len(token_ids) - cached, num_tokens) if token_ids else num_tokens)
        if src is not None:
            self._pinned.add(src)
        try:
            shared = m * self.block_pages
            if self._takes_in_place(src, m):
                # The whole cached prefix is this sequence's: it takes the holder's slot, pages where they are,
                # instead of mapping them at a second address (see `_takes_in_place`). Grown first, while still
                # cached: if the budget is short the prefix stays as it was.
                slot = src
                if not self._try_commit_to(slot, need):
                    return None
                self._recycle(slot, shared)  # out of the LRU and the index; its pages change owner, not state
            else:
                slot = self._take_slot(shared)
                if slot is None:
                    return None
                if shared:  # map the holder's pages: [0, shared) of every segment
                    if self._pages[slot]:  # a recycled slot's own pages there make way (_recycle kept them private)
                        self.arena.decommit_many(self._ranges(slot, 0, min(shared, self._pages[slot])))
                    for (s_off, n), (d_off, _) in zip(self._ranges(src, 0, shared), self._ranges(slot, 0, shared)):
                        self.arena.alias(s_off, d_off, n)
                    self._pages[slot] = max(shared, self._pages[slot])
                if not self._try_commit_to(slot, need):
                    self.arena.decommit_many(self._ranges(slot, 0, self._pages[slot]))
                    self._pages[slot] = 0
                    self._give_back(slot)
                    return None
            keep = max(shared, min(self.seg_pages, need + self.eager_pages))
            if self._pages[slot] > keep:  # a recycled slot's surplus would break the waste bound: trim it
                self.arena.decommit_many(self._ranges(slot, keep, self._pages[slot]))
                self._pages[slot] = keep
            if ext and slot != src:  # the partly matching block: copy its rows (views: every layout, no page arithmetic)
                a, b = m * self.prefix_block, cached
                for layer in range(self.layout.num_layers):
                    self.k[layer][slot, a:b].copy_(self.k[layer][src, a:b])
                    self.v[layer][slot, a:b].copy_(self.v[layer][src, a:b])
            if shared:
                self._shared_upto[slot] = shared
                self._shared_upto[src] = max(self._shared_upto[src], shared)
            if src in self._cached:  # a hit makes a cached prefix recently used (and no longer stale)
                self._cached.move_to_end(src)
                self._idle_since[src] = time.monotonic()
                self._stale.discard(src)
        finally:
            self._pinned.discard(src)
        record = self._record_type(slot=slot)
        record.hashes = list(hashes)
        for h in hashes:
            self._index.add(h, slot)
        self._holder[slot] = record
        self._ahead(slot, need, final_tokens)
        return record, cached

    def _takes_in_place(self, src: int | None, m: int) -> bool:
        """Does a sequence matching `m` blocks of `src` take `src`'s slot itself? Yes when `src` is a cached prefix
        (no live sequence) whose full blocks are all matched (a preempted request placed again, a session's next
        turn): nothing of the prefix is lost, and its pages stay mapped once. Aliasing them into another slot
        instead would leave them mapped at two addresses until the prefix is evicted: held once (the memfd's
        blocks, the ledger), but twice in the process's RSS, which counts a shared page once per mapping (ps, top
        and `HeldMemoryMeter` read it: 1.9 MB over the ledger when a preempted request came back in
        tests/llm/engine/budget_probe.py), and with twice the page-table entries and mmap calls."""
        return (src is not None and src in self._cached
                and m == len(self._cached[src].hashes) and self._shared_upto[src] <= m * self.block_pages
                and len(self._seqs) < self.max_seqs)

    def _take_slot(self, shared: int = 0) -> int | None:
        """A stale cached slot (one the idle reclaim would have evicted: see `_reclaim_idle_prefix`), else an empty
        slot, else the least recently used cached one; a cached slot is recycled (`_recycle`). None at max_seqs live
        ones. `shared`: the pages per segment the new sequence will map from a cached prefix."""
        if len(self._seqs) >= self.max_seqs:
            return None
        if self._stale:  # LRU first, as the reclaim would have evicted them
            for slot in self._cached:
                if slot in self._stale and slot not in self._pinned:
                    self._recycle(slot, shared)
                    return slot
        if self._empty:
            return heapq.heappop(self._empty)
        for slot in self._cached:
            if slot not in self._pinned:
                self._recycle(slot, shared)
                return slot
        return None

    def _recycle(self, slot: int, shared: int) -> None:
        """Forget a cached prefix and hand its slot to a new sequence with its pages still committed, where they
        are the slot's own: the new sequence overwrites them (every row it reads it writes first), so evicting
        and committing again would only add syscalls (a decommit and a commit of every segment: a one-off
        cProfile of a 32-request prefill batch, not kept, put them at 0.14 s of it; the measured before/after is
        benchmarks/prefill.py's, docs/benchmarks.md). Pages another slot may map
        (`_shared_upto`) must not be written: kept only when the new sequence maps a prefix over all of them
        (`shared` pages, which the caller then releases and aliases), else the slot is emptied as before. The
        kept pages stay in the budget and in `committed_bytes` throughout: they change owner, not state."""
        if self._shared_upto[slot] > min(shared, self._pages[slot]) or not self._pages[slot]:
            self._evict(slot)
            return
        record = self._cached.pop(slot)
        self._idle_since.pop(slot, None)
        self._stale.discard(slot)
        self._shared_upto[slot] = 0
        for h in record.hashes:
            self._index.remove(h, slot)
        self._holder.pop(slot, None)

    def _give_back(self, slot: int) -> None:
        self._shared_upto[slot] = 0
        heapq.heappush(self._empty, slot)

    # ---- cached prefixes -------------------------------------------------------------------------------
    def _release_prefix(self, record: SeqRecord) -> None:
        """A sequence finished: keep its full blocks as a cached prefix if some of them are held nowhere else."""
        slot = record.slot
        keep = len(record.hashes) * self.block_pages
        if keep and any(not self._index.has_other(h, slot) for h in record.hashes):
            # The pages past the full blocks stay committed too (a pool: the slot's next sequence reuses them,
            # `_recycle`); they are the slot's own, counted in the budget and in `cached_bytes`, and go with it
            # when it is evicted. Only the full blocks' rows stay valid for matching.
            record.written = len(record.hashes) * self.prefix_block
            del record.tokens[record.written :]
            self._cached[slot] = record
            self._idle_since[slot] = time.monotonic()
            return
        self._drop(slot, record)
        self._give_back(slot)

    def _drop(self, slot: int, record: SeqRecord) -> int:
        return self.arena.decommit_many(self._unindex(slot, record))

    def _unindex(self, slot: int, record: SeqRecord) -> list[tuple[int, int]]:
        """Take `slot`'s blocks out of the index and its pages out of its count; the ranges to decommit."""
        for h in record.hashes:
            self._index.remove(h, slot)
        self._holder.pop(slot, None)
        ranges = self._ranges(slot, 0, self._pages[slot])
        self._pages[slot] = 0
        return ranges

    def _uncache(self, slot: int) -> SeqRecord:
        record = self._cached.pop(slot)
        self._idle_since.pop(slot, None)
        self._stale.discard(slot)
        self._shared_upto[slot] = 0
        return record

    def _evict(self, slot: int) -> int:
        """Forget a cached prefix; returns the physical bytes that freed (pages no other slot maps)."""
        return self._drop(slot, self._uncache(slot))

    def _surplus_start(self, slot: int) -> int:
        """A cached slot's first page past its full blocks: the pool pages from there on hold no matchable rows."""
        return min(len(self._cached[slot].hashes) * self.block_pages, self._pages[slot])

    def _cached_ranges(self, exclude: int | set[int] | None = None) -> list[tuple[int, int]]:
        """What evicting every cached slot but `exclude` (one slot or a set) could free: the whole of each unpinned
        one, and the pool pages of a pinned one (a prefix being matched keeps its full blocks, not its surplus)."""
        out = exclude if isinstance(exclude, set) else {exclude}
        starts = {s: self._surplus_start(s) if s in self._pinned else 0 for s in self._cached if s not in out}
        return [r for s, start in starts.items() if start < self._pages[s] for r in self._ranges(s, start, self._pages[s])]

    def _reclaimable_prefix(self, exclude: int | set[int] | None = None) -> int:
        return self.arena.exclusive_bytes(self._cached_ranges(exclude))

    def _trim_pool(self, slot: int) -> int:
        """Give back a cached slot's pool pages (past its full blocks); returns the bytes that freed."""
        start = self._surplus_start(slot)
        if start >= self._pages[slot]:
            return 0
        freed = self.arena.decommit_many(self._ranges(slot, start, self._pages[slot]))
        self._pages[slot] = start
        return freed

    def _reclaim_prefix(self, nbytes: int | None, exclude: int | None = None) -> int:
        freed = 0
        # The pool pages first, least recently used first: they cost a commit later, a whole prefix a prefill.
        for slot in [s for s in self._cached if s != exclude]:
            if nbytes is not None and freed >= nbytes:
                return freed
            freed += self._trim_pool(slot)
        for slot in [s for s in self._cached if s != exclude and s not in self._pinned]:
            if nbytes is not None and freed >= nbytes:
                break
            freed += self._evict(slot)
            self._give_back(slot)
        return freed

    def _reclaim_idle_prefix(self, watermark_bytes: int, idle_s: float, now: float, keep_slots: int = 0) -> int:
        due = [s for s in self._cached if now - self._idle_since.get(s, now) >= idle_s]
        freed = 0
        self._stale = set()
        if not due:
            return 0
        if keep_slots:
            # Deferred reclamation (vAttention): of the slots this call would evict, the newest `keep_slots` stay,
            # pages and all, marked stale; the sequences about to be placed recycle them (`_take_slot`) and
            # overwrite their pages instead of this call decommitting them and the placement committing new ones.
            # A stale prefix can still be hit until then (a hit makes it recent again); what the placements leave
            # goes at the next call, which has fewer sequences waiting. The rest below runs as before on the
            # others, with the stale slots' bytes counted as gone (as the old eviction would have made them).
            goes = self._evicted_by_time(due, watermark_bytes)
            self._stale = set(goes[max(0, len(goes) - keep_slots):])
            due = [s for s in due if s not in self._stale]
            if not due:
                return 0
        held = self._reclaimable_prefix(self._stale)
        # The pool pages of every due slot before any prefix, oldest first (LRU order), one slot at a time until
        # what is held is down to the watermark. Where that loop would take every due slot (the usual case: the
        # default watermark is 0), one arena call does it (see _goes_whole).
        starts = {s: self._surplus_start(s) for s in due}
        pools = {s: self._ranges(s, a, self._pages[s]) for s, a in starts.items() if a < self._pages[s]}  # (off, len)
        if pools and self._goes_whole(held, watermark_bytes, list(pools.values())):
            given = self.arena.decommit_many([r for ranges in pools.values() for r in ranges])
            for s in pools:
                self._pages[s] = starts[s]
            held, freed = held - given, freed + given
        elif pools:
            for slot in due:
                if held <= watermark_bytes:
                    return freed
                given = self._trim_pool(slot)
                held, freed = held - given, freed + given
        if self._goes_whole(held, watermark_bytes, [self._ranges(s, 0, self._pages[s]) for s in due]):
            return freed + self._evict_many(due)
        for slot in due:
            if held <= watermark_bytes:
                break
            given = self._evict(slot)
            self._give_back(slot)
            held, freed = held - given, freed + given
        return freed

    def _evicted_by_time(self, due: list[int], watermark_bytes: int) -> list[int]:
        """The `due` slots (LRU order) that the loop of `_reclaim_idle_prefix` evicts whole: all of them under the
        default watermark 0; above it, as that loop counts, each slot's full blocks taken as the bytes its eviction
        frees (pages shared between due slots make this an estimate there, never an eviction: it only picks which
        slots stay stale)."""
        held = self._reclaimable_prefix()
        if watermark_bytes <= 0:
            return list(due) if held > 0 else []
        held -= self.arena.exclusive_bytes([r for s in due for r in self._ranges(s, self._surplus_start(s), self._pages[s])])
        goes = []
        for slot in due:
            if held <= watermark_bytes:
                break
            goes.append(slot)
            held -= self.arena.exclusive_bytes(self._ranges(slot, 0, self._surplus_start(slot)))
        return goes

    def _goes_whole(self, held: int, watermark_bytes: int, ranges: list[list[tuple[int, int]]]) -> bool:
        """Would releasing the slots of `ranges` one at a time, in order, stopping once `held` <= the watermark,
        release every one of them? Yes iff what is held after all but the last still exceeds the watermark:
        releasing ranges one by one frees, in all, the pages no address outside their union maps."""
        if held <= watermark_bytes:
            return False
        if len(ranges) <= 1:
            return True
        return held - self.arena.exclusive_bytes([r for rs in ranges[:-1] for r in rs]) > watermark_bytes

    def _evict_many(self, slots: list[int]) -> int:
        """`_evict` and `_give_back` of every one of `slots` (cached) with one arena call: one lock, one pass over
        the page tables and one budget release instead of one of each per slot (32 prompts' prefixes go idle
        together in benchmarks/prefill.py; a perf profile of it put the per-slot calls at ~5 ms a batch)."""
        freed = self.arena.decommit_many([r for slot in slots for r in self._unindex(slot, self._uncache(slot))])
        for slot in slots:
            self._give_back(slot)
        return freed

    @property
    def cached_bytes(self) -> int:
        if not self.prefix_caching:
            return 0
        with self._lock:
            return self._reclaimable_prefix()

    # ---- index upkeep and copy-on-write -------------------------------------------------------------------
    def _blocks_full(self, record: SeqRecord, first: int) -> None:
        for h in record.hashes[first:]:
            self._index.add(h, record.slot)

    def _blocks_dropped(self, record: SeqRecord, first: int, hashes: list[int]) -> None:
        for h in hashes:
            self._index.remove(h, record.slot)

    def _cow(self, slot: int, from_token: int) -> bool:
        """Give the pages from `from_token`'s on that another slot may map copies of their own; False (some
        may have been copied, none lost) when the budget cannot take them even after evicting cached ones."""
        p0 = from_token * self.row_bytes // self.page
        hi = min(self._shared_upto[slot], self._pages[slot])
        if p0 >= hi:
            return True
        for off, n in self._ranges(slot, p0, hi):
            while not self.arena.make_private(off, n):
                if not self._reclaim_prefix(n, exclude=slot):
                    return False
        self._shared_upto[slot] = p0
        return True

    def _check_private(self, slot: int, start: int) -> None:
        """Before a step writes from `start`: the pages it writes must be this slot's own."""
        if start * self.row_bytes // self.page < self._shared_upto[slot] and not self._cow(slot, start):
            raise KVCacheError(f"slot {slot}: no budget to copy shared pages before writing at {start}; "
                               "try_grow the sequence first")
