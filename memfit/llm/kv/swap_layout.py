"""Where a sequence's KV lives, as contiguous runs: the runs a swap moves (kv/swap.py moves the bytes).

How many runs a swap moves is the cache's layout (`pieces`), and is the point of FastSwitch's block groups:
- virtual cache: a sequence's K/V are contiguous per segment of its slot, so rows lo..hi-1 of each segment are
  one run: 1 run for the token-major layout, 2 x layers for per-layer, 2 x layers x heads for head-major; on the
  CPU a chunk's runs all lie at one stride and move in one copy (`stacked`);
- paged cache: every block of every layer's K and V is its own run and copy (2 x layers x blocks): vLLM's
  per-block synchronous swap, kept as the baseline;
- paged cache with block groups (`block_groups`, memory/blocks.py): neighbouring blocks of a sequence that are
  also neighbours in the pool are one run (`coalesce`), so a swap takes 2 x layers x (runs in its block table).
`block_tokens` splits the virtual cache's runs into copies of that many tokens: the per-block baseline in the
same cache, so a comparison differs in the copy granularity alone (benchmarks/preemption.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from memfit.llm.kernels.copy_rows import copy_rows
from memfit.llm.kv.base import KVCacheError, KVCacheManager
from memfit.memory.byte_span import ByteSpan

__all__ = ["Piece", "SwapRuns"]

Piece = tuple[int, int, int]  # (segment or pool index, first token, one past the last token)
Span = tuple[Piece, int, int]  # a piece and the byte range [lo, hi) it takes in a swap buffer


class RowBlock(NamedTuple):
    """`rows` rows of `row_bytes` bytes at `address`, `stride` bytes apart: a stacked swap's source by address
    (`SwapRuns.stacked_rows`). It answers the few questions the tier asks of a (rows, row_bytes) uint8 view."""

    address: int
    stride: int
    rows: int
    row_bytes: int
    owner: object = None  # what holds the memory (a host chunk's buffer), kept alive while a copy on the pool runs

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.row_bytes

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.rows * self.row_bytes

    def element_size(self) -> int:
        return 1

    def copy_to(self, address: int, stride: int) -> None:
        """Copy the rows to `address` onwards, `stride` bytes apart, in one C call (kernels/copy_rows.py; a
        memmove a row where memfit's kernels cannot run)."""
        copy_rows(address, stride, self.address, self.stride, self.rows, self.row_bytes)


class SwapRuns:
    """The runs of a KV cache that declares `fixed_stride` (virtual) or `block_tables` (paged)."""

    def __init__(self, kv: KVCacheManager, block_tokens: int | None = None) -> None:
        self.kv = kv
        self.block_tokens = block_tokens  # None: whole runs (see the module docstring)
        self.granule = 1 if kv.fixed_stride else kv.block_size  # type: ignore[attr-defined]  # a chunk starts on one
        self.stacking = True  # `stacked` views where they apply (benchmarks/swap_tiers.py turns it off to compare)
        # a virtual cache on the CPU, whose runs can stack (`stacks`): fixed for the cache's life, asked at every swap
        self._cpu_virtual = bool(kv.fixed_stride and kv.layout.device.type == "cpu")

    def pieces(self, lo: int, hi: int) -> list[Piece]:
        """The runs holding positions lo..hi-1 in buffer order, by arithmetic alone (no sequence needed)."""
        kv = self.kv
        if hi <= lo:
            return []
        if kv.fixed_stride:  # virtual cache: rows lo..hi-1 of each segment of the slot
            step = hi - lo if self.block_tokens is None else self.block_tokens
            return [(j, a, min(a + step, hi)) for j in range(kv.num_segments) for a in range(lo, hi, step)]  # type: ignore[attr-defined]
        bs = self.granule
        blocks = range(lo // bs, kv.blocks_for(hi))  # type: ignore[attr-defined]
        return [(p, i * bs, (i + 1) * bs) for p in range(2 * kv.layout.num_layers) for i in blocks]

    def piece_bytes(self, piece: Piece) -> int:
        kv = self.kv
        if kv.fixed_stride:
            return (piece[2] - piece[1]) * kv.row_bytes  # type: ignore[attr-defined]
        blocks = (piece[2] - piece[1]) // self.granule
        return blocks * kv.block_bytes // (2 * kv.layout.num_layers)  # type: ignore[attr-defined]  # pool blocks

    @property
    def segments(self) -> int:
        """Segments of the virtual cache's slot, or (layer, K|V) pools of the paged cache: a buffer's outer order."""
        kv = self.kv
        return kv.num_segments if kv.fixed_stride else 2 * kv.layout.num_layers  # type: ignore[attr-defined]

    def offset(self, lo: int, hi: int, seg: int, pos: int) -> int:
        """Where token `pos` (on a granule) of segment `seg` starts in a buffer holding positions lo..hi-1: the
        buffer is segment-major (`pieces`' order, however `block_tokens` cuts it), whole blocks in the paged cache."""
        end = hi if self.kv.fixed_stride else self.kv.blocks_for(hi) * self.granule  # type: ignore[attr-defined]
        return seg * self.piece_bytes((seg, lo, end)) + self.piece_bytes((seg, lo, pos))

    def spans(self, lo: int, hi: int) -> list[Span]:
        """`pieces(lo, hi)` with the byte range each takes in a buffer holding them in order."""
        out, off = [], 0
        for p in self.pieces(lo, hi):
            n = self.piece_bytes(p)
            out.append((p, off, off + n))
            off += n
        return out

    def coalesce(self, spans: list[Span], table: list[int] | None) -> list[Span]:
        """With block groups, each stretch of spans that is contiguous both in the pool (one pool, consecutive
        block ids) and in the buffer as one span; otherwise `spans` unchanged (the per-block baseline)."""
        if table is None or not getattr(self.kv, "block_groups", False):
            return spans
        bs, out = self.granule, []
        for span in spans:
            (j, a, b), lo, hi = span
            if out:
                (pj, pa, pb), plo, phi = out[-1]
                if pj == j and pb == a and phi == lo and table[a // bs] == table[pb // bs - 1] + 1:
                    out[-1] = ((j, pa, b), plo, hi)
                    continue
            out.append(span)
        return out

    def table(self, seq_id: int) -> list[int] | None:
        """The sequence's block table (paged cache), read once per swap; None for the virtual cache."""
        return None if self.kv.fixed_stride else self.kv.block_table(seq_id)  # type: ignore[attr-defined]

    def view(self, seq_id: int, piece: Piece, table: list[int] | None = None) -> torch.Tensor:
        """The sequence's memory of one piece, as a uint8 run."""
        kv, (j, a, b) = self.kv, piece
        if kv.fixed_stride:
            off = kv.slot_of(seq_id) * kv.slot_bytes + j * kv.seg_bytes + a * kv.row_bytes  # type: ignore[attr-defined]
            return kv.arena.view(torch.uint8, ((b - a) * kv.row_bytes,), (1,), off)  # type: ignore[attr-defined]
        pool = (*kv.k, *kv.v)[j]  # type: ignore[attr-defined]  # (num_blocks, bs, Hkv, D) view
        first = (table if table is not None else kv.block_table(seq_id))[a // self.granule]  # type: ignore[attr-defined]
        blocks = pool[first : first + (b - a) // self.granule]  # (n, bs, Hkv, D): consecutive ids (coalesce)
        blocks = blocks.transpose(1, 2) if kv.head_major else blocks  # type: ignore[attr-defined]  # storage order
        return blocks.reshape(-1).view(torch.uint8)

    @property
    def stacks(self) -> bool:
        """Whether a chunk's runs move in one copy here (`stacked`): a virtual cache on the CPU, whole runs."""
        return self.stacking and self.block_tokens is None and self._cpu_virtual

    def stacked(self, seq_id: int, lo: int, hi: int) -> torch.Tensor | None:
        """Positions lo..hi-1 of every segment of the sequence's slot as one (segments, bytes) uint8 view, row j
        segment j's run (`pieces`' order, so a chunk's buffer viewed as (segments, bytes) matches it row for row):
        one copy moves a whole swap, where a copy per run pays a view and a dispatch each (about 6 us a run, 48
        runs a swap at the 0.5B shape: benchmarks/swap_tiers.py). For a virtual cache on the CPU with whole runs
        (no `block_tokens`); None otherwise (a paged cache's blocks, the per-block baseline, and GPU caches, whose
        copies of one large run each were measured that way)."""
        rows = self.stacked_rows(seq_id, lo, hi)
        if rows is None:
            return None
        arena = self.kv.arena  # type: ignore[attr-defined]
        return arena.byte_view(rows.shape, (rows.stride, 1), rows.address - arena.address)  # one torch call

    def stacked_rows(self, seq_id: int, lo: int, hi: int) -> RowBlock | None:
        """`stacked`'s rows by address alone: no tensor is made (a view is one of the torch calls that cost 0.1-0.3
        ms each right after a model step: benchmarks/swap_cold.py). None where `stacked` gives None. Valid while the
        sequence holds its slot and the cache is open (the tier copies before the sequence's KV is freed, and the
        engine closes the tier before the cache)."""
        kv = self.kv
        if not self.stacks or hi <= lo:
            return None
        slot = self._slot_address(seq_id, lo, hi)
        return RowBlock(slot + lo * kv.row_bytes, kv.seg_bytes, kv.num_segments, (hi - lo) * kv.row_bytes)  # type: ignore[attr-defined]

    def _slot_address(self, seq_id: int, lo: int, hi: int) -> int:
        """Where the virtual cache's slot of `seq_id` starts, once positions lo..hi-1 of its every segment are
        known to lie in the open arena: what a view would raise for, and a copy by address would not (it would
        write past the arena, or into memory unmapped)."""
        kv, arena = self.kv, self.kv.arena  # type: ignore[attr-defined]
        if arena.closed:
            raise KVCacheError("the KV cache is closed")
        slot = kv.slot_of(seq_id) * kv.slot_bytes  # type: ignore[attr-defined]
        if hi > lo and slot + (self.segments - 1) * kv.seg_bytes + hi * kv.row_bytes > arena.size:  # type: ignore[attr-defined]
            raise KVCacheError(f"positions {lo}..{hi - 1} of sequence {seq_id} lie past its cache's arena")
        return arena.address + slot

    def runs(self, seq_id: int, num_tokens: int, lo: int = 0, table: list[int] | None = None) -> list[torch.Tensor]:
        """The memory holding positions lo..num_tokens-1 of `seq_id`, as the fewest contiguous uint8 runs the
        layout allows; concatenated, their bytes are in an order that depends only on the range (so a swap-in
        into other memory, cut into other runs, matches)."""
        table = self.table(seq_id) if table is None else table
        return [self.view(seq_id, p, table) for p, _, _ in self.coalesce(self.spans(lo, num_tokens), table)]

    def addresses(self, seq_id: int, num_tokens: int, lo: int = 0,
                  table: list[int] | None = None) -> list[ByteSpan] | None:
        """`runs`' memory by address alone, the same runs in the same order, for the SSD tier's C loop (it wants a
        pointer and a length a run: memory/byte_span.py); no tensor is made. None for a cache not on the CPU.
        Valid while the sequence holds its memory and the cache is open (kv/swap.py lands or waits for every
        copy before either is given back, and the engine closes the tier before the cache)."""
        kv = self.kv
        if kv.layout.device.type != "cpu":
            return None
        if kv.fixed_stride:  # virtual cache: row `a` of segment j at a fixed offset from the slot's start
            base, seg, row = self._slot_address(seq_id, lo, num_tokens), kv.seg_bytes, kv.row_bytes  # type: ignore[attr-defined]
            return [ByteSpan(base + j * seg + a * row, (b - a) * row) for j, a, b in self.pieces(lo, num_tokens)]
        pools = (*kv.k, *kv.v)  # type: ignore[attr-defined]
        if not pools:
            raise KVCacheError("the KV cache is closed")
        table = self.table(seq_id) if table is None else table
        # a pool's blocks lie block_bytes / (2 x layers) apart (its stride(0)), each contiguous in storage (`view`)
        per = pools[0].stride(0) * pools[0].element_size()
        if per != self.piece_bytes((0, 0, self.granule)):
            return None  # pools not packed block after block (no cache here makes them): views, as `runs` does
        bases = [p.data_ptr() for p in pools]
        bs = self.granule
        return [ByteSpan(bases[j] + table[a // bs] * per, (b - a) // bs * per)  # type: ignore[index]
                for (j, a, b), _, _ in self.coalesce(self.spans(lo, num_tokens), table)]

    def seq_shape(self, seq_id: int, num_tokens: int, lo: int = 0) -> tuple[int, int]:
        """(bytes, runs) a swap-out of `seq_id`'s positions lo..num_tokens-1 moves as it is laid out now: with
        block groups, one run per contiguous run of its block table and pool (`coalesce`, as `runs` gives them)."""
        spans = self.coalesce(self.spans(lo, num_tokens), self.table(seq_id))
        return (spans[-1][2] if spans else 0), len(spans)

    def shape(self, num_tokens: int, lo: int = 0) -> tuple[int, int]:
        """(bytes, runs) a swap of positions lo..num_tokens-1 moves each way (block groups: at most that many
        runs, as few as 2 x layers when the sequence's blocks are one run): `pieces`' byte sum and count, by
        arithmetic. Every swap-out asks it first, inside its timed window, where building and summing 48 pieces
        (the 0.5B shape) cost more than a small chunk's copy."""
        kv, hi = self.kv, num_tokens
        if hi <= lo:
            return 0, 0
        if kv.fixed_stride:  # each segment's rows lo..hi-1, cut into copies of block_tokens
            splits = 1 if self.block_tokens is None else -(-(hi - lo) // self.block_tokens)
            return kv.num_segments * (hi - lo) * kv.row_bytes, kv.num_segments * splits  # type: ignore[attr-defined]
        pools = 2 * kv.layout.num_layers
        blocks = kv.blocks_for(hi) - lo // self.granule  # type: ignore[attr-defined]  # (hi > lo: at least one)
        return pools * blocks * (kv.block_bytes // pools), pools * blocks  # type: ignore[attr-defined]
