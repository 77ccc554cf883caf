"""Block-hash prefix caching for the `paged` KV cache: vLLM's automatic prefix caching, the baseline the virtual
cache's page aliasing is compared against (issue 14).

Every block has a reference count: the sequences whose block tables list it. A full block is registered under
the chained hash of its tokens (kv/prefix.py) once written; a new sequence whose tokens start with registered
blocks lists them in its own table (their count goes up) and is prefilled from the first block it lacks. Only
full blocks are shared, as in vLLM.

When its last sequence lets go of a registered block, the block keeps its data and its budget reservation in
an LRU of cached blocks; a hit takes it back. A sequence that needs blocks takes free ones while the budget
allows and then evicts cached blocks, least recently used first, before the scheduler refuses or preempts
anyone. `cached_bytes` is the LRU's size.

Copy-on-write: a sequence writes at or past its `written` count, past every block it shares, except after
`truncate`; then `try_grow` first gives it a copy of every shared block it will write into.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from memfit.llm.kv.base import KVCacheError, SeqRecord
from memfit.llm.kv.prefix import ROOT, chain_hashes


class PagedPrefixMixin:
    """Mixed into PagedKVCache (which defines the pools, the free list and the budget this code uses)."""

    def _init_prefix(self) -> None:
        self.prefix_caching = True
        self.prefix_block = self.block_size
        self._index: dict[int, int] = {}  # block hash -> the block registered under it
        self._key: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # block -> (hash, parent hash, tokens)
        self._lru: OrderedDict[int, float] = OrderedDict()  # cached blocks (no reader) -> when let go, LRU first

    # ---- taking blocks ---------------------------------------------------------------------------------
    def _take_blocks(self, n: int, owner: int | None = None, held: Sequence[int] = ()) -> list[int] | None:
        """`n` blocks for one sequence (`owner`: its record's id, `held`: the blocks it has, for the block-group
        allocator's claims and runs), each with refcount 1: free ones while the budget allows, then evicted cached
        ones; None with nothing changed if even that is not enough."""
        if n <= 0:
            return []
        cached = len(self._lru) if self.prefix_caching else 0
        room = self.budget.available_bytes // self.block_bytes
        from_free = min(self._free.free, n, max(0, room))
        if n - from_free > cached:
            return None
        if from_free and not self.budget.try_reserve(from_free * self.block_bytes, self.owner):
            return None
        blocks = self._free.take(from_free, owner, len(held), held[-1] if held else None)
        for _ in range(n - from_free):  # reuse an evicted cached block and its reservation
            blk, _ = self._lru.popitem(last=False)
            self._unregister(blk)
            blocks.append(blk)
        for blk in blocks:
            self._ref[blk] = 1
        self._held += n
        self._zero_new(blocks)  # before any other block is handed out: zeroing goes by rising ids
        return blocks

    def _drop_ref(self, blk: int) -> None:
        self._ref[blk] -= 1
        if self._ref[blk]:
            return
        self._held -= 1
        if self.prefix_caching and blk in self._key:
            self._lru[blk] = time.monotonic()  # keeps its data and its reservation
        else:
            self._free.give(blk)
            self.budget.release(self.block_bytes, self.owner)

    def _unregister(self, blk: int) -> None:
        key = self._key.pop(blk, None)
        if key is not None and self._index.get(key[0]) == blk:
            del self._index[key[0]]

    # ---- prefix hits -------------------------------------------------------------------------------------
    def _try_place_prefix(self, token_ids: Sequence[int], num_tokens: int,
                          final_tokens: int | None = None) -> tuple[SeqRecord, int] | None:
        bs = self.block_size
        hashes = chain_hashes(token_ids, bs, limit=len(token_ids) - 1) if len(token_ids) > 1 else []
        matched: list[int] = []
        parent = ROOT
        for b, h in enumerate(hashes):
            blk = self._index.get(h)
            if blk is None or self._key[blk] != (h, parent, tuple(token_ids[b * bs : (b + 1) * bs])):
                break  # not cached, or a hash collision: never share those rows
            matched.append(blk)
            parent = h
        cached = len(matched) * bs
        total = cached + min(len(token_ids) - cached, num_tokens)
        revived = [blk for blk in matched if self._ref[blk] == 0]
        for blk in revived:  # taken back from the LRU first, so taking new blocks cannot evict them
            del self._lru[blk]
            self._held += 1
        for blk in matched:
            self._ref[blk] += 1
        fresh = self._take_blocks(self.blocks_for(total) - len(matched))
        if fresh is None:
            for blk in matched:
                self._ref[blk] -= 1
            for blk in revived:
                self._lru[blk] = time.monotonic()
                self._held -= 1
            return None
        record = self._record_type(blocks=matched + fresh)
        record.hashes = hashes[: len(matched)]
        return record, cached

    # ---- index upkeep and copy-on-write -------------------------------------------------------------------
    def _blocks_full(self, record: SeqRecord, first: int) -> None:
        bs = self.block_size
        for b in range(first, len(record.hashes)):
            h, blk = record.hashes[b], record.blocks[b]
            if h not in self._index and blk not in self._key:  # the first block with this content is the one kept
                self._index[h] = blk
                parent = record.hashes[b - 1] if b else ROOT
                self._key[blk] = (h, parent, tuple(record.tokens[b * bs : (b + 1) * bs]))

    def _blocks_dropped(self, record: SeqRecord, first: int, hashes: list[int]) -> None:
        for blk in record.blocks[first : first + len(hashes)]:
            if self._ref[blk] == 1:  # only this sequence reads it, and it will be overwritten
                self._unregister(blk)

    def _cow(self, record: SeqRecord) -> bool:
        """Give `record` its own copy of every block from its write position on that others read or that is
        registered for reuse; False with nothing changed if the blocks do not fit."""
        first = record.written // self.block_size
        todo = [i for i in range(first, len(record.blocks))
                if self._ref[record.blocks[i]] > 1 or record.blocks[i] in self._key]
        shared = [i for i in todo if self._ref[record.blocks[i]] > 1]
        for i in todo:
            if i not in shared:
                self._unregister(record.blocks[i])  # this sequence's own: it just stops being findable
        if not shared:
            return True
        fresh = self._take_blocks(len(shared), id(record))
        if fresh is None:
            return False
        for i, new in zip(shared, fresh):
            old = record.blocks[i]
            for pool in (*self.k, *self.v):
                pool[new].copy_(pool[old])
            record.blocks[i] = new
            self._drop_ref(old)
        return True

    def _check_private(self, record: SeqRecord, start: int, end: int) -> None:
        for i in range(start // self.block_size, self.blocks_for(end)):
            if self._ref[record.blocks[i]] > 1:
                raise KVCacheError(f"block {record.blocks[i]} is shared: try_grow the sequence before writing at {start}")

    # ---- cached blocks ---------------------------------------------------------------------------------------
    @property
    def cached_bytes(self) -> int:
        return len(self._lru) * self.block_bytes if self.prefix_caching else 0

    def _evict_cached(self, nbytes: int | None, older_than: float | None = None, keep_bytes: int = 0) -> int:
        freed = 0
        while self._lru and (nbytes is None or freed < nbytes) and len(self._lru) * self.block_bytes > keep_bytes:
            blk, since = next(iter(self._lru.items()))
            if older_than is not None and since > older_than:
                break
            del self._lru[blk]
            self._unregister(blk)
            self._free.give(blk)
            self.budget.release(self.block_bytes, self.owner)
            freed += self.block_bytes
        return freed
