"""Merged host chunks (kv/swap_pairs.py): after many reuse turns a swap-in still makes a few copies, not one per
turn, and the KV it restores is bit for bit what was written, in every layout, synchronous or on the pool, with
diverging turns (truncation) and with the SSD tier below; every byte held is in the host budget."""
import pytest
import torch

from memfit.llm.kv.base import SeqStep
from memfit.llm.kv.swap import MERGE_AT, SwapSpace
from memfit.llm.kv.swap_ssd import SSDTier
from memfit.memory.budget import MemoryBudget, Tier
from tests.llm.kv.test_swap import CACHES
from tests.llm.kv.test_virtual import LAYOUT

TURNS = 12
NEW = 3  # tokens each turn adds: not a multiple of the paged cache's blocks of 4, so blocks are partly valid


class Truth:
    """Random K/V rows per layer, written into the cache and remembered: what a swap-in must restore."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (LAYOUT.max_seq_len, LAYOUT.num_kv_heads, LAYOUT.head_dim)
        self.g, self.k, self.v = g, [torch.randn(shape, generator=g) for _ in range(LAYOUT.num_layers)], \
            [torch.randn(shape, generator=g) for _ in range(LAYOUT.num_layers)]

    def write(self, cache, seq_id: int, start: int, n: int, fresh: bool = False) -> None:
        if fresh:  # a diverging turn: other values at these positions
            for t in (*self.k, *self.v):
                t[start : start + n] = torch.randn(t[start : start + n].shape, generator=self.g)
        plan = cache.plan_step([SeqStep(seq_id, start, n)])
        for layer in range(LAYOUT.num_layers):
            cache.write(layer, plan, self.k[layer][start : start + n], self.v[layer][start : start + n])

    def matches(self, cache, seq_id: int, n: int) -> bool:
        plan = cache.plan_step([SeqStep(seq_id, n, 0)])
        return all(torch.equal(k, self.k[layer][:n]) and torch.equal(v, self.v[layer][:n])
                   for layer in range(LAYOUT.num_layers) for k, v in [cache.context(layer, plan, 0)])


def reuse_turns(kind: str, merge_at: int, threads: int = 0, ssd: SSDTier | None = None, host_bytes: int = 2**21):
    """A sequence preempted and resumed TURNS times, NEW tokens a turn (a divergence at turn 6), its memory
    overwritten by another sequence each time. Returns the host copies each swap-in made, having checked the
    restored KV and the budget at every turn."""
    cache = CACHES[kind](MemoryBudget(2**22, name="kv_budget"))
    host = MemoryBudget(host_bytes, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, reuse=True, threads=threads, ssd=ssd)
    swap.merge_at = merge_at
    truth, other = Truth(0), Truth(1)
    n, copies = 5, []
    assert cache.try_allocate(1, n)
    truth.write(cache, 1, 0, n)
    for turn in range(TURNS):
        assert swap.try_swap_out(1, n, wait=not threads)
        if swap.swapping_out(1):
            assert swap.finish_swap_out(1)
        cache.free(1)
        assert cache.try_allocate(2, LAYOUT.max_seq_len)  # takes the freed memory and overwrites it
        other.write(cache, 2, 0, LAYOUT.max_seq_len)
        cache.free(2)
        if ssd is not None and turn % 4 == 3:  # the held chunks go to the SSD tier; later ones stay on the host
            assert swap.book.demote(1)  # (a chunk reaching past `valid` after the divergence: its valid rows alone)
            copy = swap._copies[1]
            assert all(c.buf is None and c.hi <= copy.valid for c in copy.chunks)
        assert cache.try_allocate(1, n + NEW)
        ops = swap.stats.in_ops
        if threads:
            swap.start_swap_in(1)
            assert swap.finish_swap_in(1) == n
        else:
            assert swap.swap_in(1) == n
        copies.append(swap.stats.in_ops - ops)
        assert truth.matches(cache, 1, n), f"turn {turn}: restored KV differs"
        assert host.used_bytes == swap.held_bytes() == swap.stats.resident_bytes <= host.limit_bytes
        if turn == 6:  # the next turn's prompt diverges 4 tokens back: the copy is valid up to there
            n -= 4
            swap.truncate(1, n)
            truth.write(cache, 1, n, NEW, fresh=True)
        else:
            truth.write(cache, 1, n, NEW)
        n += NEW
    swap.close()
    assert host.used_bytes == 0 == swap.stats.resident_bytes
    cache.close()
    return copies, swap.stats


@pytest.mark.parametrize("kind", ["token-major", "per-layer", "head-major"])
def test_a_swap_in_after_many_reuse_turns_makes_at_most_merge_at_copies_per_segment(kind):
    segments = CACHES[kind](MemoryBudget(2**22)).num_segments
    copies, stats = reuse_turns(kind, MERGE_AT)
    assert max(copies) <= MERGE_AT * segments, copies  # one copy per turn would be TURNS x segments
    assert stats.merges >= 2


@pytest.mark.parametrize("kind", ["token-major", "per-layer", "head-major", "paged"])
@pytest.mark.parametrize("threads", [0, 1])
@pytest.mark.parametrize("merge_at", [1, MERGE_AT + 1, 0])
def test_restored_kv_is_bit_identical_after_many_merged_turns(kind, threads, merge_at):
    reuse_turns(kind, merge_at, threads)  # checks the KV and the budget at every turn


@pytest.mark.parametrize("kind", ["per-layer", "paged"])
def test_merged_chunks_demote_to_the_ssd_tier_and_restore_exactly(kind, tmp_path):
    ssd = SSDTier(tmp_path, 1 << 21)
    _, stats = reuse_turns(kind, 2, ssd=ssd)
    assert stats.merges > 0 and ssd.stats.in_ops > 0 and ssd.budget.used_bytes == 0


def test_no_merge_when_the_tier_has_no_room_for_the_merged_buffer():
    per_turn = (TURNS * NEW + 5) * LAYOUT.bytes_per_token  # the whole history fits once, not twice
    copies, stats = reuse_turns("token-major", MERGE_AT, host_bytes=per_turn + 4 * LAYOUT.bytes_per_token)
    assert stats.merges < TURNS // MERGE_AT  # merges that did not fit were skipped; the KV still came back
