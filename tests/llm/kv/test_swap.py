"""SwapSpace: a sequence's KV goes to the host tier and comes back, bit for bit, into other memory; copies per
swap follow the cache's layout (the virtual cache's contiguous runs vs the paged cache's per-block copies)."""
import pytest
import torch

from memfit.llm.kv.paged import PagedKVCache
from memfit.llm.kv.swap import CostModel, SwapSpace
from memfit.llm.kv.virtual import VirtualKVCache
from memfit.llm.kv.swap_model import OWNER
from memfit.memory.budget import MemoryBudget, Tier
from memfit.memory.extent_map import extent_bytes
from memfit.memory.vmem import CPU_PAGE_SIZE as PAGE
from tests.llm.kv.test_virtual import LAYOUT, kv_for, write
from memfit.memory.host_region import REGION_OWNER, budget_for, table_bytes
from tests.memory.test_host_region import minor_faults, resident_bytes, resident_pages
from memfit.llm.kv.base import KVLayout, SeqStep

CACHES = {
    "per-layer": lambda b: VirtualKVCache(LAYOUT, b, max_seqs=4, prefault=False, eager_pages=0),
    "token-major": lambda b: VirtualKVCache(LAYOUT, b, max_seqs=4, prefault=False, eager_pages=0, token_major=True),
    "head-major": lambda b: VirtualKVCache(LAYOUT, b, max_seqs=4, prefault=False, eager_pages=0, head_major=True),
    "paged": lambda b: PagedKVCache(LAYOUT, b, block_size=4),
    "per-layer-blocks": lambda b: VirtualKVCache(LAYOUT, b, max_seqs=4, prefault=False, eager_pages=0),
}
# Copies one swap of 19 tokens takes: the virtual cache one per segment, the paged cache one per block per layer's
# K|V, and the virtual cache split into 4-token blocks (the per-block baseline in the same cache) as many.
COPIES = {"per-layer": 2 * 2, "token-major": 1, "head-major": 2 * 2 * 2, "paged": 2 * 2 * 5, "per-layer-blocks": 2 * 2 * 5}


def contexts(cache, seq_id: int, n: int) -> list[torch.Tensor]:
    plan = cache.plan_step([SeqStep(seq_id, n, 0)])
    return [t.clone() for layer in range(LAYOUT.num_layers) for t in cache.context(layer, plan, 0)]


@pytest.mark.parametrize("kind", list(CACHES))
def test_swap_round_trip_is_exact_and_moves_the_layouts_runs(kind):
    budget = MemoryBudget(2**22, name="kv_budget")
    cache = CACHES[kind](budget)
    host = MemoryBudget(2**20, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, block_tokens=4 if kind == "per-layer-blocks" else None)
    assert cache.try_allocate(1, 19) and cache.try_allocate(2, 8)
    write(cache, [SeqStep(1, 0, 19), SeqStep(2, 0, 8)])
    before = contexts(cache, 1, 19)
    assert swap.try_swap_out(1, 19)
    cache.free(1)
    nbytes, copies = swap.runs_shape(19)
    assert swap.stats.out_ops == copies == COPIES[kind]
    assert host.used_bytes == swap.stats.resident_bytes == nbytes >= 19 * LAYOUT.bytes_per_token
    # Another sequence takes the freed memory and overwrites it; seq 1 comes back elsewhere.
    assert cache.try_allocate(3, 19)
    write(cache, [SeqStep(3, 0, 19)])
    assert cache.try_allocate(1, 20)
    assert swap.swap_in(1) == 19 and cache.num_tokens(1) == 19
    after = contexts(cache, 1, 19)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert host.used_bytes == 0 and swap.stats.in_bytes == swap.stats.out_bytes == nbytes
    cache.close()


def test_a_full_host_tier_refuses_and_takes_nothing():
    budget = MemoryBudget(2**22, name="kv_budget")
    cache = CACHES["per-layer"](budget)
    host = MemoryBudget(10 * LAYOUT.bytes_per_token, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host)
    assert cache.try_allocate(1, 19)
    write(cache, [SeqStep(1, 0, 19)])
    assert not swap.try_swap_out(1, 19)
    assert host.used_bytes == 0 and not swap.holds(1) and swap.stats.out_ops == 0
    assert swap.try_swap_out(1, 8)  # a shorter run fits
    swap.discard(1)
    assert host.used_bytes == 0
    cache.close()


def test_host_tier_is_a_share_of_the_ledger_when_it_has_a_parent():
    ledger = MemoryBudget(2**22, name="memory_budget")
    cache = CACHES["token-major"](MemoryBudget(2**21, name="kv_budget", parent=ledger))
    swap = SwapSpace(cache, MemoryBudget(2**20, Tier.HOST, name="swap_space", parent=ledger))
    assert cache.try_allocate(1, 19)
    write(cache, [SeqStep(1, 0, 19)])
    assert swap.try_swap_out(1, 19)
    assert ledger.by_owner()["swap_space"] == swap.stats.resident_bytes > 0
    cache.close()


@pytest.mark.parametrize("kind", ["per-layer", "paged"])
def test_with_a_region_swaps_write_into_warm_pages_and_the_budget_matches_the_kernel(kind):
    """The engine's host tier on a CPU: chunks from a HostRegion. A second swap-out of the same size lands in the
    pages the first one committed (no page newly held: mincore), the round trip stays exact, and the tier's budget
    is the chunk's bytes plus the region's other pages as the kernel counts them, plus its tables."""
    cache = CACHES[kind](MemoryBudget(2**22, name="kv_budget"))
    host = MemoryBudget(2**20, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, region=True)
    assert cache.try_allocate(1, 19)
    write(cache, [SeqStep(1, 0, 19)])
    before = contexts(cache, 1, 19)
    meta = swap.region.meta_bytes
    assert host.used_bytes == meta == host.by_owner()[REGION_OWNER] > 0  # the tables, reserved from the start
    for turn in range(2):
        assert swap.try_swap_out(1, 19)
        cache.free(1)
        chunk = swap._copies[1].chunks[0]
        assert swap.region.owns(chunk.buf) and chunk.buf.data_ptr() == swap.region.arena.address
        held = resident_bytes(swap.region)
        assert host.by_owner()[OWNER] == chunk.nbytes and host.used_bytes == meta + held  # its pages, all reserved
        if turn == 0:
            first = held
        assert held == first  # the second swap-out committed nothing new
        assert cache.try_allocate(1, 19) and swap.swap_in(1) == 19
        assert [torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 19))] == [True] * len(before)
        assert host.by_owner()[OWNER] == 0 and host.used_bytes - meta == resident_bytes(swap.region) == first  # warm
    assert swap.trim() == first and host.used_bytes == meta and resident_bytes(swap.region) == 0
    swap.close()
    cache.close()


def test_with_a_region_a_failed_swap_out_holds_nothing(monkeypatch):
    """A copy that raises (an interrupt, a layout error) leaves neither a reservation nor a region buffer behind:
    the budget and the kernel's page map agree, and a trim leaves nothing."""
    import memfit.llm.kv.swap as swap_mod

    cache = CACHES["paged"](MemoryBudget(2**22, name="kv_budget"))
    host = MemoryBudget(2**20, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, region=True)
    assert cache.try_allocate(1, 19)
    write(cache, [SeqStep(1, 0, 19)])

    def interrupted(runs, buf):
        raise KeyboardInterrupt

    monkeypatch.setattr(swap_mod, "_copy_out", interrupted)
    with pytest.raises(KeyboardInterrupt):
        swap.try_swap_out(1, 19)
    assert not swap.region.taken and host.by_owner().get(OWNER, 0) == 0
    meta = swap.region.meta_bytes
    assert host.used_bytes == meta + resident_bytes(swap.region)  # at most warm free pages (and tables), all counted
    swap.trim()
    assert host.used_bytes == meta and resident_bytes(swap.region) == 0
    monkeypatch.undo()
    assert swap.try_swap_out(1, 19)  # and the tier still works
    swap.close()
    cache.close()


BIG = KVLayout(num_layers=2, num_kv_heads=4, head_dim=128, dtype=torch.float32, max_seq_len=256)  # 8 KiB a token


def write_big(cache, seq_id: int, n: int) -> list[torch.Tensor]:
    """Write K/V values unique to (sequence, position, head, dim, layer) for positions 0..n-1; the (n, Hkv, D) Ks."""
    plan = cache.plan_step([SeqStep(seq_id, 0, n)])
    ks = []
    for layer in range(BIG.num_layers):
        k = torch.arange(n * 4 * 128, dtype=torch.float32).view(n, 4, 128) + seq_id * 1e6 + layer * 0.5
        cache.write(layer, plan, k, -k)
        ks.append(k)
    return ks


def read_big(cache, seq_id: int, n: int) -> list[torch.Tensor]:
    plan = cache.plan_step([SeqStep(seq_id, n, 0)])
    return [cache.context(layer, plan, 0)[0].clone() for layer in range(BIG.num_layers)]


@pytest.mark.parametrize("kind", ["virtual", "paged"])
def test_with_a_region_at_its_high_water_mark_a_swap_out_reuses_the_warm_pages_without_faulting(kind):
    """Issue 15: the tier's budget holds exactly its region's tables and warm pages (a sequence swapped out and back
    in left them), and the same sequence is swapped out again. The chunk is carved from those pages: none is given
    back and faulted in again (the process's minor faults around the swap-out, the kernel's page map before and
    after), and neither the budget nor the pages the kernel holds ever pass the limit."""
    cache = (VirtualKVCache(BIG, MemoryBudget(2**24, name="kv_budget"), max_seqs=2, prefault=False, eager_pages=0)
             if kind == "virtual" else PagedKVCache(BIG, MemoryBudget(2**24, name="kv_budget"), block_size=16))
    n = 256
    chunk = extent_bytes(n * BIG.bytes_per_token)  # 2 MiB: 512 pages
    limit = budget_for(chunk)  # the tier's tables (sized from its limit) and the chunk, exactly
    host = MemoryBudget(limit, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, region=True)
    assert swap.region.meta_bytes + chunk == limit
    assert cache.try_allocate(1, n)
    before = write_big(cache, 1, n)
    assert swap.try_swap_out(1, n)
    cache.free(1)
    assert cache.try_allocate(1, n) and swap.swap_in(1) == n
    assert host.used_bytes == limit and resident_bytes(swap.region) == chunk  # full: tables and warm pages
    pages = resident_pages(swap.region)
    faults = minor_faults()
    assert swap.try_swap_out(1, n)
    faults = minor_faults() - faults
    assert faults < chunk // PAGE // 8, f"{faults} minor faults for a swap-out of {chunk // PAGE} warm pages"
    assert resident_pages(swap.region) == pages and host.peak_bytes == host.used_bytes == limit
    assert host.by_owner()[OWNER] == swap.held_bytes() == n * BIG.bytes_per_token
    cache.free(1)
    assert cache.try_allocate(1, n) and swap.swap_in(1) == n  # and the chunk holds the sequence's KV, exactly
    assert all(torch.equal(a, b) for a, b in zip(before, read_big(cache, 1, n)))
    swap.close()
    cache.close()


def test_a_region_too_small_for_its_tables_and_one_chunk_is_refused_and_the_size_it_names_is_enough():
    import re

    cache = CACHES["paged"](MemoryBudget(2**22, name="kv_budget"))
    with pytest.raises(ValueError, match="--swap-space at least") as err:
        SwapSpace(cache, MemoryBudget(table_bytes(16 * PAGE), Tier.HOST, name="swap_space"), region=True)
    need = int(re.search(r"\((\d+) bytes\)", str(err.value)).group(1))
    with pytest.raises(ValueError, match="--swap-space at least"):
        SwapSpace(cache, MemoryBudget(need - 1, Tier.HOST, name="swap_space"), region=True)
    host = MemoryBudget(need, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, region=True)  # the size named: the tables and one chunk (a block of 4 tokens) fit
    assert cache.try_allocate(1, 4)
    write(cache, [SeqStep(1, 0, 4)])
    assert swap.try_swap_out(1, 4) and swap.region.owns(swap._copies[1].chunks[0].buf)
    assert host.used_bytes <= host.limit_bytes
    swap.close()
    SwapSpace(cache, MemoryBudget(table_bytes(16 * PAGE), Tier.HOST, name="swap_space"))  # no region: no tables
    cache.close()


def test_a_ledger_without_room_for_the_region_tables_swaps_with_buffers_of_its_own(caplog):
    """No --swap-space on a CPU: the tier's share (4 GiB by default) draws on the whole --memory-budget, which may
    not have the 1.6 MiB the region's tables take. The engine still starts (as before the tables were counted):
    the tier runs without a region, says so, and swaps within the ledger (its used bytes against its limit)."""
    cache = CACHES["token-major"](MemoryBudget(2**22, name="kv_budget"))
    ledger = MemoryBudget(table_bytes(4 << 30) // 2, Tier.HOST, name="ledger")  # less than the tables need
    host = MemoryBudget(4 << 30, Tier.HOST, name="swap_space", parent=ledger)
    with caplog.at_level("WARNING", logger="memfit.llm.kv.swap"):
        swap = SwapSpace(cache, host, region=True)
    assert swap.region is None and "buffers of their own" in caplog.text
    assert cache.try_allocate(1, 4)
    write(cache, [SeqStep(1, 0, 4)])
    assert swap.try_swap_out(1, 4) and 0 < ledger.used_bytes <= ledger.limit_bytes
    swap.close()
    cache.close()


def test_cost_model_prefers_swap_for_long_sequences_and_recompute_when_copies_are_slow():
    fast_copy = CostModel(params=10**9, layers=32, q_width=4096, flops_per_s=1e12, bytes_per_s=2e10)
    assert fast_copy.swap_s(4096 * 128 * 1024, 64) < fast_copy.recompute_s(4096)
    slow_copy = CostModel(params=10**6, layers=2, q_width=64, flops_per_s=1e12, bytes_per_s=1e6)
    assert slow_copy.swap_s(100 * 2048, 4) > slow_copy.recompute_s(100)
    slow_copy.observe_copy(10**9, 0.1)  # measured 10 GB/s: the estimate moves toward it
    assert slow_copy.bytes_per_s > 1e8


@pytest.mark.parametrize("kind", ["per-layer", "paged"])
def test_asynchronous_swap_in_lands_exactly_and_a_discard_waits_for_it(kind):
    cache = CACHES[kind](MemoryBudget(2**22, name="kv_budget"))
    host = MemoryBudget(2**20, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, threads=2)
    assert cache.try_allocate(1, 19) and cache.try_allocate(2, 19)
    write(cache, [SeqStep(1, 0, 19), SeqStep(2, 0, 19)])
    before = {s: contexts(cache, s, 19) for s in (1, 2)}
    for s in (1, 2):
        assert swap.try_swap_out(s, 19)
        cache.free(s)
        assert cache.try_allocate(s, 20)
        swap.start_swap_in(s)
        assert swap.in_flight(s)
    assert swap.finish_swap_in(1) == 19 and not swap.in_flight(1)
    assert all(torch.equal(a, b) for a, b in zip(before[1], contexts(cache, 1, 19)))
    swap.discard(2)  # aborted mid-flight: the copies land before the host copy is dropped
    assert not swap.in_flight(2) and host.used_bytes == 0 and swap.async_swap_ins == 1
    swap.close()
    cache.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["token-major", "paged", "paged-groups"])
def test_swap_round_trip_on_cuda_through_pinned_host_memory(kind):
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_seq_len=64,
                      device=torch.device("cuda"))
    budget = MemoryBudget(1 << 30, name="kv_budget")
    cache = (VirtualKVCache(layout, budget, max_seqs=4, prefault=False, eager_pages=0, token_major=True)
             if kind == "token-major" else PagedKVCache(layout, budget, block_size=4, num_blocks=64,
                                                        block_groups=kind == "paged-groups"))
    swap = SwapSpace(cache, MemoryBudget(1 << 24, Tier.HOST, name="swap_space"), threads=1)
    assert swap.pin
    assert cache.try_allocate(1, 19)
    plan = cache.plan_step([SeqStep(1, 0, 19)])
    for layer in range(2):
        k = torch.randn(19, 2, 64, device="cuda")
        cache.write(layer, plan, k, -k)
    before = [t.clone() for layer in range(2) for t in cache.context(layer, cache.plan_step([SeqStep(1, 19, 0)]), 0)]
    assert swap.try_swap_out(1, 19)
    assert swap._copies[1].chunks[0].buf.is_pinned()
    cache.free(1)
    assert cache.try_allocate(2, 30) and cache.try_allocate(1, 20)
    swap.start_swap_in(1)
    assert swap.finish_swap_in(1) == 19
    after = [t for layer in range(2) for t in cache.context(layer, cache.plan_step([SeqStep(1, 19, 0)]), 0)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    swap.close()
    cache.close()


@pytest.mark.parametrize("kind", ["per-layer", "paged"])
def test_mark_restored_takes_only_what_the_capacity_holds(kind):
    from memfit.llm.kv.base import KVCacheError

    cache = CACHES[kind](MemoryBudget(2**22, name="kv_budget"))
    assert cache.try_allocate(1, 8)
    cap = cache.capacity(1)
    cache.mark_restored(1, 8)
    assert cache.num_tokens(1) == 8
    with pytest.raises(KVCacheError, match="holds"):
        cache.mark_restored(1, cap + 1)
    assert cache.num_tokens(1) == 8  # refused: nothing changed


def moved_bytes(monkeypatch) -> list[int]:
    """Bytes each swap-out copies, counted from the sizes of the runs handed to the copy (not the swap's counters)."""
    import memfit.llm.kv.swap as swap_mod

    moved, real = [], swap_mod._copy_out

    def counting(runs, buf):
        moved.append(sum(r.numel() * r.element_size() for r in runs))
        return real(runs, buf)

    monkeypatch.setattr(swap_mod, "_copy_out", counting)
    return moved


@pytest.mark.parametrize("kind", ["per-layer", "token-major", "head-major", "paged"])
def test_reuse_a_second_swap_out_moves_only_the_new_tokens_and_restores_exactly(kind, monkeypatch):
    cache = CACHES[kind](MemoryBudget(2**22, name="kv_budget"))
    host = MemoryBudget(2**20, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, reuse=True)
    moved = moved_bytes(monkeypatch)
    bpt = LAYOUT.bytes_per_token
    assert cache.try_allocate(1, 19)
    write(cache, [SeqStep(1, 0, 19)])
    assert swap.try_swap_out(1, 19)
    cache.free(1)
    assert cache.try_allocate(2, 30)  # another sequence overwrites the freed memory
    write(cache, [SeqStep(2, 0, 30)])
    assert cache.try_allocate(1, 40) and swap.swap_in(1) == 19
    assert swap.holds(1) and host.used_bytes == moved[0]  # the host copy is kept after the swap-in
    write(cache, [SeqStep(1, 19, 8)])  # the sequence runs on: 8 new tokens
    before = contexts(cache, 1, 27)
    assert swap.try_swap_out(1, 27)
    cache.free(1)
    if kind == "paged":  # the partly filled block of the first swap-out is copied again, whole blocks
        bs = cache.block_size
        assert moved == [cache.blocks_for(19) * bs * bpt, (cache.blocks_for(27) - 19 // bs) * bs * bpt]
    else:
        assert moved == [19 * bpt, 8 * bpt]
    assert host.used_bytes == swap.held_bytes() == sum(moved) == swap.stats.resident_bytes
    assert cache.try_allocate(1, 40) and swap.swap_in(1) == 27
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 27)))
    # A new turn diverging at position 10: the copy is valid up to there, and the next swap-out moves 10..14 only.
    swap.truncate(1, 10)
    write(cache, [SeqStep(1, 10, 5)])
    del moved[:]
    assert swap.try_swap_out(1, 15)
    if kind != "paged":
        assert moved == [5 * bpt]
    cache.free(1)
    assert cache.try_allocate(1, 40) and swap.swap_in(1) == 15
    plan = cache.plan_step([SeqStep(1, 15, 0)])
    for layer in range(LAYOUT.num_layers):
        k, v = cache.context(layer, plan, 0)
        want = torch.cat([kv_for(1, 0, 10, layer)[0], kv_for(1, 10, 5, layer)[0]])
        assert torch.equal(k, want) and torch.equal(v, -want)
    swap.discard(1)
    assert host.used_bytes == 0 == swap.stats.resident_bytes
    cache.close()


def test_kept_copies_are_evicted_least_recently_used_first_and_live_ones_never():
    cache = CACHES["per-layer"](MemoryBudget(2**22, name="kv_budget"))
    bpt = LAYOUT.bytes_per_token
    host = MemoryBudget(40 * bpt, Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, reuse=True)
    for s in (1, 2, 3):
        assert cache.try_allocate(s, 12)
        write(cache, [SeqStep(s, 0, 12)])
    for s in (1, 2):  # out and back in: kept copies, 1 the least recently used
        assert swap.try_swap_out(s, 12)
        cache.free(s)
        assert cache.try_allocate(s, 12) and swap.swap_in(s) == 12
    assert swap.try_swap_out(3, 12)  # a live copy: 36 of 40 tokens' worth held
    assert host.used_bytes == 36 * bpt
    assert swap.try_swap_out(1, 12) and swap.stats.kept_evictions == 0  # 1's kept copy serves: nothing moves
    cache.free(1)
    assert cache.try_allocate(4, 12)
    write(cache, [SeqStep(4, 0, 12)])
    assert swap.try_swap_out(4, 12)  # room made by dropping 2's kept copy (1 and 3 are live)
    assert swap.stats.kept_evictions == 1 and not swap.holds(2) and swap.holds(1) and swap.holds(3)
    assert host.used_bytes == swap.held_bytes() == 36 * bpt
    assert cache.try_allocate(5, 12)
    write(cache, [SeqStep(5, 0, 12)])
    assert not swap.try_swap_out(5, 12)  # only live copies left: refused, nothing dropped
    assert swap.holds(1) and swap.holds(3) and swap.holds(4) and host.peak_bytes <= host.limit_bytes
    swap.close()
    assert host.used_bytes == 0
    cache.close()


def thread_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


@pytest.mark.parametrize("warm", [True, False])
def test_warm_ahead_faults_in_the_next_chunk_off_the_swap_out(warm):
    """Issue 15: in a serving run most of a swap-out's time was faulting in the cold region pages its copy wrote.
    With `warm_ahead` (the engine's setting) the region commits, after each swap-out, the pages of the next chunk
    up to the largest taken so far: a second sequence's swap-out of that size then faults no page in the swap-out
    (the process's minor faults) and commits none (the kernel's page map), its KV comes back exactly, and the
    tier's budget stays the kernel's pages plus the chunks' bytes. Without it (`warm` False) that swap-out faults
    its pages in."""
    cache = VirtualKVCache(BIG, MemoryBudget(2**24, name="kv_budget"), max_seqs=2, prefault=False, eager_pages=0)
    n = 256
    chunk = extent_bytes(n * BIG.bytes_per_token)  # 2 MiB: 512 pages
    host = MemoryBudget(4 * chunk + table_bytes(4 * chunk), Tier.HOST, name="swap_space")
    swap = SwapSpace(cache, host, region=True, reuse=True, warm_ahead=warm)
    assert cache.try_allocate(1, n) and cache.try_allocate(2, n)
    before = write_big(cache, 1, n), write_big(cache, 2, n)
    assert swap.try_swap_out(1, n, keep=True)  # kept: its chunk stays out, so the next one lands past it
    swap.region.wait_warm()
    pages = resident_pages(swap.region)
    assert len(pages) == (2 if warm else 1) * chunk // PAGE
    assert host.used_bytes == swap.region.meta_bytes + resident_bytes(swap.region)  # warm pages in the budget
    faults = thread_faults()
    assert swap.try_swap_out(2, n)
    faults = thread_faults() - faults  # this thread's: the region's own thread warms the chunk after meanwhile
    if warm:
        assert faults < chunk // PAGE // 8, f"{faults} minor faults for a swap-out into {chunk // PAGE} warm pages"
    else:
        assert faults >= chunk // PAGE // 2
    assert swap._copies[2].chunks[0].buf.data_ptr() == swap.region.arena.address + chunk  # past seq 1's, in order
    swap.region.wait_warm()
    assert len(resident_pages(swap.region)) == (3 if warm else 2) * chunk // PAGE  # the next chunk's, warm again
    assert host.used_bytes <= host.limit_bytes and host.peak_bytes <= host.limit_bytes
    assert host.used_bytes == swap.region.meta_bytes + resident_bytes(swap.region)
    for seq in (1, 2):
        cache.free(seq)
    assert swap.adopt(1, n) == n  # the kept copy becomes live again
    for seq in (1, 2):
        assert cache.try_allocate(seq, n) and swap.swap_in(seq) == n
        assert all(torch.equal(a, b) for a, b in zip(before[seq - 1], read_big(cache, seq, n)))
    swap.close()
    cache.close()
