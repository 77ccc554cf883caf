"""Automatic prefix caching's bookkeeping, shared by the virtual and the paged caches (no tensors here).

A sequence's tokens are cut into blocks of `block` tokens (the virtual cache: the fewest tokens that fill
whole pages of every segment; the paged cache: its block size). Block b's hash chains the hash of block
b - 1 with block b's token ids, as vLLM's automatic prefix caching does, so one hash names a whole prefix:
two sequences whose block-b hashes agree hold the same tokens at positions 0 .. (b+1) x block - 1 (up to a
64-bit collision, which `PrefixIndex.match` rules out by comparing the holder's tokens). Only full blocks
are hashed; a partly filled last block is never shared (the virtual cache copies it instead).

`PrefixIndex` maps a block hash to the holders of that block (a slot of the virtual cache, a block id of the
paged one): several holders may hold the same content (two sequences prefilled the same prompt at once).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

ROOT = 0x6D656D666974  # the parent hash of block 0


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """The chained hash of one full block (Python's hash of ints and tuples is the same in every process)."""
    return hash((parent, tuple(tokens)))


def chain_hashes(tokens: Sequence[int], block: int, known: Sequence[int] = (), limit: int | None = None) -> list[int]:
    """Hashes of the full blocks of `tokens[:limit]`, reusing the `known` hashes of its first blocks."""
    n = (len(tokens) if limit is None else min(limit, len(tokens))) // block
    out = list(known[:n])
    parent = out[-1] if out else ROOT
    for b in range(len(out), n):
        parent = block_hash(parent, tokens[b * block : (b + 1) * block])
        out.append(parent)
    return out


@dataclass
class PrefixStats:
    """Counters for metrics: prompts looked up, their tokens, and the tokens found cached (not prefilled)."""

    queries: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0

    def record(self, num_tokens: int, hit: int) -> None:
        self.queries += 1
        self.query_tokens += num_tokens
        self.hit_tokens += hit


class PrefixIndex:
    """block hash -> holders of that block (insertion-ordered; any one of them will do)."""

    def __init__(self) -> None:
        self._holders: dict[int, dict[Hashable, None]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def __contains__(self, h: int) -> bool:
        return h in self._holders

    def add(self, h: int, holder: Hashable) -> None:
        self._holders.setdefault(h, {})[holder] = None

    def remove(self, h: int, holder: Hashable) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.pop(holder, None)
            if not holders:
                del self._holders[h]

    def holders(self, h: int) -> list[Hashable]:
        return list(self._holders.get(h, ()))

    def has_other(self, h: int, holder: Hashable) -> bool:
        """Does someone besides `holder` hold block `h`?"""
        return any(x != holder for x in self._holders.get(h, ()))

    def longest(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` some holder has (a hit on block b implies blocks 0 .. b - 1)."""
        n = 0
        while n < len(hashes) and hashes[n] in self._holders:
            n += 1
        return n
