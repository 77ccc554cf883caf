"""Where a sequence's KV lives, as contiguous runs: the copies a swap makes (kv/swap.py moves the bytes).

How many copies a swap takes is the cache's layout (`pieces`), and is the point of FastSwitch's block groups:
- virtual cache: a sequence's K/V are contiguous per segment of its slot, so rows lo..hi-1 of each segment are
  one run: 1 copy for the token-major layout, 2 x layers for per-layer, 2 x layers x heads for head-major;
- paged cache: every block of every layer's K and V is its own run (2 x layers x blocks copies): vLLM's
  per-block synchronous swap, kept as the baseline.
`block_tokens` splits the virtual cache's runs into copies of that many tokens: the per-block baseline in the
same cache, so a comparison differs in the copy granularity alone (benchmarks/preemption.py).
"""
from __future__ import annotations

import torch

from memfit.llm.kv.base import KVCacheManager

__all__ = ["Piece", "SwapRuns"]

Piece = tuple[int, int, int]  # (segment or pool index, first token, one past the last token)


class SwapRuns:
    """The runs of a KV cache that declares `fixed_stride` (virtual) or `block_tables` (paged)."""

    def __init__(self, kv: KVCacheManager, block_tokens: int | None = None) -> None:
        self.kv = kv
        self.block_tokens = block_tokens  # None: whole runs (see the module docstring)
        self.granule = 1 if kv.fixed_stride else kv.block_size  # type: ignore[attr-defined]  # a chunk starts on one

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
        return kv.block_bytes // (2 * kv.layout.num_layers)  # type: ignore[attr-defined]  # one pool's block

    def table(self, seq_id: int) -> list[int] | None:
        """The sequence's block table (paged cache), read once per swap; None for the virtual cache."""
        return None if self.kv.fixed_stride else self.kv.block_table(seq_id)  # type: ignore[attr-defined]

    def view(self, seq_id: int, piece: Piece, table: list[int] | None = None) -> torch.Tensor:
        """The sequence's memory of one piece, as a uint8 run."""
        kv, (j, a, b) = self.kv, piece
        if kv.fixed_stride:
            off = kv.slot_of(seq_id) * kv.slot_bytes + j * kv.seg_bytes + a * kv.row_bytes  # type: ignore[attr-defined]
            return kv.arena.view(torch.uint8, ((b - a) * kv.row_bytes,), (1,), off)  # type: ignore[attr-defined]
        pool = (*kv.k, *kv.v)[j]  # type: ignore[attr-defined]
        block = pool[(table if table is not None else kv.block_table(seq_id))[a // self.granule]]  # type: ignore[attr-defined]
        block = block.transpose(0, 1) if kv.head_major else block  # type: ignore[attr-defined]  # (bs, Hkv, D) either way
        return block.reshape(-1).view(torch.uint8)

    def runs(self, seq_id: int, num_tokens: int, lo: int = 0) -> list[torch.Tensor]:
        """The memory holding positions lo..num_tokens-1 of `seq_id`, as the fewest contiguous uint8 runs the
        layout allows, in an order that depends only on the range (so a swap-in into other memory matches)."""
        table = self.table(seq_id)
        return [self.view(seq_id, p, table) for p in self.pieces(lo, num_tokens)]

    def shape(self, num_tokens: int, lo: int = 0) -> tuple[int, int]:
        """(bytes, copies) a swap of positions lo..num_tokens-1 moves each way."""
        pieces = self.pieces(lo, num_tokens)
        return sum(self.piece_bytes(p) for p in pieces), len(pieces)
