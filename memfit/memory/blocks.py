"""Free-block allocators for a pool of fixed-size blocks (the paged KV cache's), by block id; no bytes move here.

    stack = BlockStack(1024)             # vLLM's free-block stack: any free block, most recently freed first
    groups = BlockGroups(1024)           # buddy-style groups of contiguous blocks (FastSwitch's block groups)
    ids = groups.take(10, owner=seq)     # the caller checked `free >= 10`; ids come in contiguous runs
    groups.give(ids[0]); groups.release(seq)

Why groups. A swap of a paged sequence copies each physically contiguous run of its blocks once, so the fewer
runs a sequence's block table has, the fewer (and larger) the copies (FastSwitch, arXiv 2411.18424: a 16-token
block of one layer is tens of KiB, and thousands of such copies waste the link). The stack hands out whatever
was freed last, so after some churn a sequence's blocks are scattered and a swap is one copy per block.

`BlockGroups` is a binary buddy allocator over block ids: free space is kept as aligned power-of-two groups
(a group of 2^k blocks starts at a multiple of 2^k; its buddy is the group at `start ^ 2^k`), split on demand
and merged with a free buddy on release, so freed space heals into large groups again. A request for `n` blocks
takes a group of the next power of two at or above max(n, `min_group`, `held`) (up to `max_group`; `held`, the
blocks the owner has already, makes a growing sequence's groups double as a vector's capacity does, so its table
is O(log length) runs), hands out the first `n` blocks and keeps the rest as the owner's *claim*: its next
blocks, when it grows, continue the same run. A claim is soft: its blocks are free as far as any budget is
concerned (`free` counts them), and when no unclaimed block is left the tail of the largest claim is given back to
the buddy lists and used. An owner whose claim is gone continues in place while the blocks after its last one
are free (`after`). So the allocator never refuses
what the stack would give: with `free >= n`, `take(n)` succeeds. Where no large group is free, smaller ones are
used, or a contiguous stretch of neighbouring free groups ("where possible"); the order of ids within a
sequence never matters for correctness, only for copies.

Both allocators prefer low ids (a fresh pool hands out block 0, 1, 2, ...), which keeps the caller's
zero-on-first-use watermark (kv/paged.py) low; it stays correct either way (every id below it was zeroed once).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Hashable

__all__ = ["BlockGroups", "BlockStack", "runs_of"]


def runs_of(ids: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ids, in list order: [(first id, length), ...]."""
    out: list[tuple[int, int]] = []
    for b in ids:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


class BlockStack:
    """vLLM's free-block stack: O(1) take and give, the most recently freed (cache-warm) block first."""

    def __init__(self, num_blocks: int) -> None:
        self._free: deque[int] = deque(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int, owner: Hashable | None = None, held: int = 0, after: int | None = None) -> list[int]:
        if n > len(self._free):
            raise ValueError(f"{n} blocks asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def give(self, blk: int) -> None:
        self._free.append(blk)

    def release(self, owner: Hashable) -> None:
        """Nothing is claimed ahead here."""

    def clear(self) -> None:
        self._free.clear()


class BlockGroups:
    """Buddy-style groups of contiguous blocks, with per-owner claims for growth (see the module docstring)."""

    def __init__(self, num_blocks: int, min_group: int = 8, max_group: int = 256) -> None:
        if min_group < 1 or max_group < min_group or max_group & (max_group - 1) or min_group & (min_group - 1):
            raise ValueError(f"group sizes must be powers of two with 1 <= min <= max, got {min_group}, {max_group}")
        self.num_blocks = num_blocks
        self.min_group, self.max_order = min_group, max_group.bit_length() - 1
        self._free_at: list[set[int]] = [set() for _ in range(self.max_order + 1)]  # order -> free group starts
        self._order: dict[int, int] = {}  # free group start -> its order
        self._claims: dict[Hashable, tuple[int, int]] = {}  # owner -> [next, end): blocks kept for its growth
        self._claimed = 0
        pos = 0
        while pos < num_blocks:  # the pool as the largest aligned groups that fit (num_blocks need not be 2^k)
            k = self.max_order
            while pos % (1 << k) or pos + (1 << k) > num_blocks:
                k -= 1
            self._add(pos, k)
            pos += 1 << k
        self._buddy_free = num_blocks

    @property
    def free(self) -> int:
        """Blocks not handed out: in the buddy lists, or claimed ahead by an owner (claims are given up on demand)."""
        return self._buddy_free + self._claimed

    def free_groups(self) -> list[tuple[int, int]]:
        """(start, order) of every free group in the buddy lists, sorted (for tests and stats)."""
        return sorted(self._order.items())

    def claims(self) -> dict[Hashable, tuple[int, int]]:
        return dict(self._claims)

    def take(self, n: int, owner: Hashable | None = None, held: int = 0, after: int | None = None) -> list[int]:
        """`n` block ids, as few contiguous runs as the free groups allow: `owner`'s claim first, then the free
        blocks right after its last one (`after`, where its claim was given up), then new groups (`held`: blocks
        `owner` holds already, a hint for the size of its next group)."""
        if n > self.free:
            raise ValueError(f"{n} blocks asked for, {self.free} free")
        out: list[int] = []
        claim = self._claims.pop(owner, None) if owner is not None else None
        if claim is not None:
            nxt, end = claim
            m = min(n, end - nxt)
            out.extend(range(nxt, nxt + m))
            self._claimed -= end - nxt
            if nxt + m < end:  # still more than enough
                self._claims[owner] = (nxt + m, end)
                self._claimed += end - nxt - m
        last = out[-1] if out else after
        while len(out) < n and last is not None and last + 1 < self.num_blocks and self._carve(last + 1):
            last += 1  # the run goes on in place
            out.append(last)
        while len(out) < n:
            need = n - len(out)
            want = min(self.max_order, (max(need, self.min_group, held) - 1).bit_length())  # ceil(log2)
            if not self._buddy_free:  # everything left is claimed: take the tail of the largest claim
                self._steal(need)
            got = self._group(want, (need - 1).bit_length())
            if got is None:  # no aligned group holds it: the best contiguous stretch of free groups instead
                start, m = self._span(need)
                for b in range(start, start + m):
                    self._carve(b)
                out.extend(range(start, start + m))
                continue
            start, k = got
            size = 1 << k
            m = min(need, size)
            out.extend(range(start, start + m))
            if m < size:
                if owner is not None and owner not in self._claims and len(out) == n:
                    self._claims[owner] = (start + m, start + size)  # its growth continues this run
                    self._claimed += size - m
                else:
                    for b in range(start + m, start + size):
                        self._give(b)
        return out

    def give(self, blk: int) -> None:
        """A handed-out block comes back; it merges with its buddy while the buddy is free."""
        if not 0 <= blk < self.num_blocks:
            raise ValueError(f"block {blk} is outside the pool of {self.num_blocks}")
        self._give(blk)

    def release(self, owner: Hashable) -> None:
        """`owner` holds no more blocks: its claim goes back to the buddy lists."""
        claim = self._claims.pop(owner, None)
        if claim is not None:
            self._claimed -= claim[1] - claim[0]
            for b in range(*claim):
                self._give(b)

    def clear(self) -> None:
        self._claims.clear()
        self._claimed = self._buddy_free = 0
        self._order.clear()
        for s in self._free_at:
            s.clear()

    # ---- inside ------------------------------------------------------------------------------------------
    def _add(self, start: int, k: int) -> None:
        self._free_at[k].add(start)
        self._order[start] = k

    def _remove(self, start: int, k: int) -> None:
        self._free_at[k].remove(start)
        del self._order[start]

    def _is_free(self, blk: int) -> bool:
        """`blk` lies in a free group (of the order found at its start, aligned: that group covers it)."""
        return any(self._order.get(blk & ~((1 << k) - 1), -1) >= k for k in range(self.max_order + 1))

    def _steal(self, need: int) -> None:
        """Give the last `need` blocks of the largest claim back to the buddy lists (its owner keeps the rest, the
        blocks right after its own)."""
        owner, (nxt, end) = max(self._claims.items(), key=lambda c: c[1][1] - c[1][0])  # free > 0: someone claims
        cut = max(nxt, end - need)
        del self._claims[owner]
        if cut > nxt:
            self._claims[owner] = (nxt, cut)
        self._claimed -= end - cut
        for b in range(cut, end):
            self._give(b)

    def _carve(self, blk: int) -> bool:
        """Take the single block `blk` out of the free group holding it (the rest stays free, split into aligned
        groups); False if it is not in the buddy lists."""
        for k in range(self.max_order + 1):
            s = blk & ~((1 << k) - 1)
            if self._order.get(s, -1) >= k:
                k = self._order[s]
                break
        else:
            return False
        self._remove(s, k)
        while k:  # halve, keeping the half without `blk` free
            k -= 1
            half = 1 << k
            if blk < s + half:
                self._add(s + half, k)
            else:
                self._add(s, k)
                s += half
        self._buddy_free -= 1
        return True

    def _span(self, need: int) -> tuple[int, int]:
        """(start, length) to take of the free groups' contiguous stretches (neighbours that are not buddies do not
        merge, but a run of blocks may still cross them): the shortest stretch that holds `need`, else the longest."""
        spans: list[list[int]] = []
        for start, k in sorted(self._order.items()):
            if spans and spans[-1][0] + spans[-1][1] == start:
                spans[-1][1] += 1 << k
            else:
                spans.append([start, 1 << k])
        fits = [sp for sp in spans if sp[1] >= need]
        start, length = min(fits, key=lambda sp: sp[1]) if fits else max(spans, key=lambda sp: sp[1])
        return start, min(need, length)

    def _group(self, k: int, fit: int) -> tuple[int, int] | None:
        """Take a free group of order k (splitting a larger one), else the largest smaller one of order >= `fit`
        (one that still holds the request); None if there is none. Returns (start, order)."""
        for j in range(k, self.max_order + 1):
            if self._free_at[j]:
                start = min(self._free_at[j])  # low ids first: the zeroing watermark rises, caches stay warm
                self._remove(start, j)
                while j > k:  # split: keep the lower half, free the upper
                    j -= 1
                    self._add(start + (1 << j), j)
                self._buddy_free -= 1 << k
                return start, k
        for j in range(k - 1, fit - 1, -1):
            if self._free_at[j]:
                start = min(self._free_at[j])
                self._remove(start, j)
                self._buddy_free -= 1 << j
                return start, j
        return None

    def _give(self, blk: int) -> None:
        if self._is_free(blk):
            raise ValueError(f"block {blk} is free already")
        start, k = blk, 0
        self._buddy_free += 1
        while k < self.max_order:
            buddy = start ^ (1 << k)
            if self._order.get(buddy) != k:
                break
            self._remove(buddy, k)
            start, k = min(start, buddy), k + 1
        self._add(start, k)
