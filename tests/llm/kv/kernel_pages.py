"""What the kernel holds for a KV cache, read from /proc/self/pagemap: a measure independent of the
cache's own counters and of its budget ledger (which refuses any overrun by construction, so `used <=
limit` can't fail). Linux only, like the CPU arena itself."""
from __future__ import annotations

import numpy as np

from memfit.memory.vmem import CPU_PAGE_SIZE as PAGE

_PRESENT = np.uint64(1 << 63)
_EXCLUSIVE = np.uint64(1 << 56)  # mapped by this process alone: a page of its own, not the shared zero page


def resident_pages(address: int, nbytes: int) -> np.ndarray:
    """(ceil(nbytes / PAGE),) bool: which pages of [address, address + nbytes) hold physical memory of
    their own. A never-written page that was only read maps the kernel's shared zero page, which is
    present but costs nothing: it is not counted (smaps' Rss does not count it either)."""
    first, count = address // PAGE, -(-(address % PAGE + nbytes) // PAGE)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read(count * 8), dtype=np.uint64)
    return ((entries & _PRESENT) != 0) & ((entries & _EXCLUSIVE) != 0)


def arena_pages(cache) -> np.ndarray:
    """A virtual cache's resident pages as (num_slots, num_segments, seg_pages) bool."""
    flags = resident_pages(cache.arena.address, cache.num_slots * cache.slot_bytes)
    return flags.reshape(cache.num_slots, cache.num_segments, cache.seg_bytes // PAGE)


def arena_resident_bytes(cache) -> int:
    """Physical bytes the kernel holds for a virtual cache: with prefix caching (a memfd arena whose pages
    several slots may map) the memfd's allocated blocks, each page once; otherwise the arena's own pages."""
    if hasattr(cache.arena, "allocated_bytes"):
        return cache.arena.allocated_bytes()
    return int(arena_pages(cache).sum()) * PAGE


def assert_paged_tables_consistent(cache, seq_ids) -> int:
    """The paged cache's block tables (of `seq_ids`, every live sequence) against its pool and its budget
    ledger: no block held twice (unless prefix caching shares it) or lost, and the ledger holds exactly the
    blocks the tables name plus the cached ones, each once. Returns the bytes of the blocks held."""
    assert cache.stats().num_seqs == len(seq_ids)
    tables = [b for sid in seq_ids for b in cache.block_table(sid)]
    held = set(tables)
    assert all(0 <= b < cache.num_blocks for b in held)
    cached = set(cache._lru) if cache.prefix_caching else set()
    if not cache.prefix_caching:
        assert len(held) == len(tables)
    assert not held & cached
    assert len(held) + len(cached) + cache.num_free_blocks == cache.num_blocks
    assert (len(held) + len(cached)) * cache.block_bytes == cache.budget.by_owner().get(cache.owner, 0)
    return (len(held) + len(cached)) * cache.block_bytes


def kernel_page_changes(cache) -> dict[str, list[int]]:
    """Record, at each commit and each give-back the virtual cache's arena makes (the calls that reach the
    kernel: MADV_POPULATE_WRITE / fallocate(PUNCH_HOLE) on a memfd arena, MADV_POPULATE_WRITE / MADV_DONTNEED on
    an anonymous one), what the kernel holds for the cache before and after it (`arena_resident_bytes`):
    {"committed": [bytes gained, per call], "released": [bytes lost, per call]}."""
    changes: dict[str, list[int]] = {"committed": [], "released": []}
    arena = cache.arena
    owner, (grow, shrink) = ((arena, ("_populate", "_punch")) if hasattr(arena, "allocated_bytes")
                             else (arena._backend, ("map", "unmap")))

    def measured(name: str, key: str, sign: int) -> None:
        real = getattr(owner, name)

        def call(lo: int, hi: int) -> None:
            before = arena_resident_bytes(cache)
            real(lo, hi)
            changes[key].append(sign * (arena_resident_bytes(cache) - before))

        setattr(owner, name, call)

    measured(grow, "committed", 1)
    measured(shrink, "released", -1)
    return changes


def memfd_mapped_bytes(cache) -> int:
    """Bytes of a prefix-caching virtual cache's memfd pages mapped into this process, each page once per address that
    maps it (from /proc/self/smaps: the Rss of the arena's memfd mappings, which RssShmem and so the process's RSS
    count). Beside `arena_resident_bytes` (each page once) it shows how many pages are mapped at two addresses."""
    lo, hi = cache.arena.address, cache.arena.address + cache.arena.size
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=6)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header: addr-addr perms off dev inode
                start, end = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= start and end <= hi and len(head) > 5 and "memfit-shared-arena" in head[5]
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total
