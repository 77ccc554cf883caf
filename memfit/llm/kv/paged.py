"""`paged` KV cache: a vLLM-style block pool, the baseline the `virtual` cache is compared against.

Per layer, K and V are each a pool viewed as `(num_blocks, block_size, Hkv, D)`; a sequence owns a *block table*
(the list of its block ids, in position order), and position p lives in block `table[p // block_size]`
at offset `p % block_size`. Free blocks sit in a deque used as a stack: allocate and free are O(1), and
the most recently freed (cache-warm) block is handed out first. With `block_groups=True` they come instead from
a buddy allocator of contiguous block groups (memory/blocks.py, FastSwitch's block groups): a sequence's table
is then a few physically contiguous runs, and a swap (kv/swap_layout.py) copies each run once instead of each
block; attention, budgets and everything else are the same.

Inside a block the rows are head-major on the CPU (`head_major`, default there): block, head, token, D, so
one head's rows of a block are one contiguous run, as vLLM's CPU backend lays them out (its attention reads
each head's block as one stream; measured here 1.2-1.4x faster than token-major blocks for memfit's kernel).
Token-major blocks (block, token, head, D), vLLM's GPU layout, are the default on CUDA. The views keep the
(num_blocks, block_size, Hkv, D) shape either way; only their strides differ.

Memory accounting. The pool tensors are allocated once, up front, as vLLM does; `num_blocks` defaults to
what the budget has room for (capped at `max_seqs` full-length sequences when `max_seqs` is given), so
the pool never exceeds the budget. *Committed* bytes are the blocks handed to sequences: each block is
reserved in the budget (owner "kv") when a sequence takes it and released when it is freed. On CUDA the
whole pool is device memory from construction (`pool_bytes`); on the CPU its pages are faulted in on
first write and kept by the allocator.

Reading. The cache declares `block_tables`: `pools(layer)` hands out the pools and each step plan carries
`batch_table`, so a paged-attention kernel follows the block tables in place (memfit's CPU kernel,
kernels/cpu_paged.cpp, as vLLM's kernels do; on CUDA flex attention, kernels/paged_flex*.py). Without one,
`context` and `context_batch` gather a
sequence's blocks into a contiguous tensor: a copy per layer per step that a fair comparison must not charge
to this design, so the engine uses the kernel wherever it runs. Block sizes that are powers of two (the
default 16) are what the kernel addresses.
Prefix caching (`prefix_caching=True`): vLLM's block-hash automatic prefix caching, with shared blocks counted
once and an LRU of cached blocks (kv/paged_prefix.py).
Waste: at most one partly filled block per sequence (block_size - 1 tokens), plus capacity asked for but
not yet written (`waste_bound_bytes`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memfit.llm.kv.base import KVCacheError, KVCacheManager, KVLayout, SeqRecord, SeqStep
from memfit.llm.kv.paged_prefix import PagedPrefixMixin
from memfit.llm.kv.registry import register_kv_cache
from memfit.memory.blocks import BlockGroups, BlockStack
from memfit.memory.budget import MemoryBudget, format_bytes


@dataclass
class _Seq(SeqRecord):
    blocks: list[int] = field(default_factory=list)  # block ids, in position order


@dataclass
class PagedPlan:
    seq_ids: list[int]
    ends: list[int]
    write_block: torch.Tensor  # (N,) block of each new token
    write_offset: torch.Tensor  # (N,) its row in the block
    tables: list[torch.Tensor]  # per sequence: (ceil(end / bs),) block ids covering 0 .. end-1
    batch_table: torch.Tensor  # (B, nb_max) block ids, padded with block 0 (masked by the caller)
    max_end: int


@register_kv_cache("paged")
class PagedKVCache(PagedPrefixMixin, KVCacheManager):
    block_tables = True  # pools(layer) + plans' batch_table: kernels read the blocks in place
    _record_type = _Seq  # what the prefix mixin builds a sequence's record with

    @classmethod
    def engine_options(cls, *, max_num_seqs: int, block_size: int, kv_layout: str = "auto",
                       prefault: bool = True, eager_pages: int | None = None, prefix_caching: bool = False,
                       block_groups: bool = False) -> dict:
        # the pool takes what the budget holds, as vLLM sizes it
        return {"block_size": block_size, "prefix_caching": prefix_caching, "block_groups": block_groups}

    def __init__(
        self,
        layout: KVLayout,
        budget: MemoryBudget,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_seqs: int | None = None,
        owner: str = "kv",
        head_major: bool | None = None,
        prefix_caching: bool = False,
        block_groups: bool = False,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        super().__init__(layout, budget)
        self.block_size, self.owner = block_size, owner
        self.block_bytes = block_size * layout.bytes_per_token  # one block id across all layers, K and V
        if num_blocks is None:
            num_blocks = budget.available_bytes // self.block_bytes
            if max_seqs is not None:
                num_blocks = min(num_blocks, max_seqs * -(-layout.max_seq_len // block_size))
        if num_blocks <= 0:
            raise ValueError(
                f"the KV budget ({format_bytes(budget.available_bytes)} free) holds no {format_bytes(self.block_bytes)} "
                "block; raise the KV budget or lower block_size"
            )
        self.num_blocks = num_blocks
        L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        self.head_major = layout.device.type == "cpu" if head_major is None else bool(head_major)

        def pool() -> torch.Tensor:  # (num_blocks, block_size, H, D) view; head-major storage: a permuted view
            if self.head_major:
                return torch.empty(num_blocks, H, block_size, D, dtype=layout.dtype, device=layout.device).transpose(1, 2)
            return torch.empty(num_blocks, block_size, H, D, dtype=layout.dtype, device=layout.device)

        self.k = [pool() for _ in range(L)]
        self.v = [pool() for _ in range(L)]
        self.block_groups = bool(block_groups)  # swaps copy contiguous runs of blocks (kv/swap_layout.py)
        self._free = BlockGroups(num_blocks) if block_groups else BlockStack(num_blocks)  # memory/blocks.py
        # Blocks are zeroed the first time they are handed out, so positions past a sequence's end read finite
        # values: masked garbage that were NaN would survive softmax as NaN x 0. (A mask, not a watermark: block
        # groups do not hand ids out in rising order, and zeroing ahead would fault in the whole pool at once.)
        self._zeroed = np.zeros(num_blocks, dtype=bool)
        self._seqs: dict[int, _Seq] = {}  # type: ignore[assignment]
        self._ref = np.zeros(num_blocks, dtype=np.int32)  # block -> sequences whose table lists it
        self._held = 0  # blocks with a nonzero refcount
        if prefix_caching:
            self._init_prefix()

    @property
    def pool_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def num_free_blocks(self) -> int:
        return self._free.free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @classmethod
    def full_sequence_bytes(cls, layout: KVLayout, block_size: int = 16, **_: Any) -> int:
        return -(-layout.max_seq_len // block_size) * block_size * layout.bytes_per_token

    def bytes_needed(self, num_tokens: int) -> int:
        """Committed bytes one sequence of `num_tokens` needs: whole blocks."""
        return self.blocks_for(num_tokens) * self.block_size * self.layout.bytes_per_token

    # ---- scheduler side (base class hooks, called under self._lock) ---------------------------------
    def _try_place(self, num_tokens: int, final_tokens: int | None = None) -> _Seq | None:
        record = _Seq()
        return record if self._try_extend(record, num_tokens) else None

    def _try_extend(self, record: _Seq, num_tokens: int) -> bool:  # type: ignore[override]
        if self.prefix_caching and not self._cow(record):
            return False  # blocks it would write are shared and their copies do not fit
        extra = self.blocks_for(num_tokens) - len(record.blocks)
        if extra <= 0:
            return True
        blocks = self._take_blocks(extra, id(record), record.blocks)  # block groups: continuing its last run
        if blocks is None:
            return False  # out of blocks or of budget: nothing taken
        record.blocks.extend(blocks)
        return True

    def _zero_new(self, blocks: list[int]) -> None:
        fresh = [b for b in blocks if not self._zeroed[b]]
        if fresh:
            idx = torch.tensor(fresh, dtype=torch.long, device=self.layout.device)  # (n,)
            for pool in (*self.k, *self.v):
                pool.index_fill_(0, idx, 0)
            self._zeroed[fresh] = True

    def _release(self, record: _Seq) -> None:  # type: ignore[override]
        for blk in reversed(record.blocks):  # the first blocks end up most recently used in the LRU
            self._drop_ref(blk)
        record.blocks = []
        self._free.release(id(record))  # blocks claimed ahead for its growth (block groups)

    def _capacity_of(self, record: _Seq) -> int:  # type: ignore[override]
        return min(self.layout.max_seq_len, len(record.blocks) * self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).blocks)  # type: ignore[attr-defined]

    # ---- runner side ------------------------------------------------------------------------------
    def _plan(self, steps: list[SeqStep], records: list[_Seq], read_len: int) -> PagedPlan:  # type: ignore[override]
        dev, bs = self.layout.device, self.block_size
        blocks, offsets = [], []
        for st, record in zip(steps, records):
            if self.prefix_caching and st.num_new:
                self._check_private(record, st.start, st.end)
            pos = np.arange(st.start, st.end)
            blocks.append(np.asarray(record.blocks, dtype=np.int64)[pos // bs])
            offsets.append(pos % bs)
        write_block = torch.from_numpy(np.concatenate(blocks)).to(dev)  # (N,)
        write_offset = torch.from_numpy(np.concatenate(offsets).astype(np.int64)).to(dev)
        ends = [st.end for st in steps]
        nbs = [self.blocks_for(e) for e in ends]
        nb_max = max(max(nbs), self.blocks_for(read_len))
        table = np.zeros((len(steps), nb_max), dtype=np.int64)  # padding reads block 0, masked later
        for i, (record, nb) in enumerate(zip(records, nbs)):
            table[i, :nb] = record.blocks[:nb]
        batch_table = torch.from_numpy(table).to(dev)  # (B, nb_max)
        tables = [batch_table[i, :nb] for i, nb in enumerate(nbs)]
        return PagedPlan([st.seq_id for st in steps], ends, write_block, write_offset, tables, batch_table, read_len)

    def write(self, layer: int, plan: PagedPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dtype != self.layout.dtype or v.dtype != self.layout.dtype:
            raise KVCacheError(f"K/V dtype {k.dtype} does not match the cache's {self.layout.dtype}")
        idx = (plan.write_block, plan.write_offset)
        self.k[layer].index_put_(idx, k)  # touches only rows (block, offset) of the step
        self.v[layer].index_put_(idx, v)

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def _gather(self, pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(..., nb) block ids -> (..., nb * block_size, Hkv, D), a copy."""
        blocks = pool.index_select(0, table.reshape(-1))  # (prod, bs, Hkv, D), laid out as the pool
        return blocks.reshape(*table.shape[:-1], table.shape[-1] * self.block_size, *pool.shape[2:])

    def context(self, layer: int, plan: PagedPlan, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        e, t = plan.ends[i], plan.tables[i]
        return self._gather(self.k[layer], t)[:e], self._gather(self.v[layer], t)[:e]  # (end, Hkv, D)

    def context_batch(self, layer: int, plan: PagedPlan) -> tuple[torch.Tensor, torch.Tensor]:
        lmax = plan.max_end
        k = self._gather(self.k[layer], plan.batch_table)[:, :lmax]  # (B, Lmax, Hkv, D)
        v = self._gather(self.v[layer], plan.batch_table)[:, :lmax]
        return k, v

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def committed_bytes(self) -> int:
        """Blocks some sequence reads, each once however many share it, plus cached blocks kept for reuse."""
        with self._lock:
            return self.block_bytes * (self._held + (len(self._lru) if self.prefix_caching else 0))

    def reclaim(self, nbytes: int | None = None) -> int:
        """Give back cached blocks (all by default), least recently used first; returns the bytes."""
        with self._lock:
            return self._evict_cached(nbytes) if self.prefix_caching else 0

    def reclaim_idle(self, watermark_bytes: int, idle_s: float, now: float | None = None, keep_slots: int = 0) -> int:
        # keep_slots is not used: the pool is allocated once, so an evicted block costs no decommit and no commit
        if not self.prefix_caching:
            return 0
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._evict_cached(None, older_than=now - idle_s, keep_bytes=watermark_bytes)

    def waste_bound_bytes(self) -> int:
        """Per sequence: capacity asked for but unwritten, plus one partly filled block."""
        with self._lock:
            return self.cached_bytes + self.layout.bytes_per_token * sum(
                max(s.requested, s.written) - s.written + self.block_size - 1 for s in self._seqs.values()
            )

    def close(self) -> None:
        with self._lock:
            for record in self._seqs.values():
                self._release(record)
            self._seqs.clear()
            if self.prefix_caching:
                self._evict_cached(None)
            self.k, self.v = [], []
            self._free.clear()
