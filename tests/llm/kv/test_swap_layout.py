"""Copies per swap (kv/swap_layout.py): on the paged cache the per-block baseline copies every block of every pool,
block groups copy each physically contiguous run of a sequence's blocks once; the virtual cache copies all its
segments' runs of a chunk at once. Copies are counted where they happen (every torch `copy_` during the swap),
and the runs are counted from the block table by the test itself."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.kv.base import SeqStep
from memfit.llm.kv.paged import PagedKVCache
from memfit.llm.kv.swap import MERGE_AT, MERGE_AT_STACKED, SwapSpace
from memfit.memory.budget import MemoryBudget, Tier
from tests.llm.kv.test_swap import contexts
from tests.llm.kv.test_virtual import LAYOUT, write

POOLS = 2 * LAYOUT.num_layers  # one K and one V pool per layer


def count_copies(monkeypatch) -> list[int]:
    """Every Tensor.copy_ from now on, counted (the swap's copies, whatever the allocator thinks it did)."""
    seen = [0]
    copy = torch.Tensor.copy_

    def counting(self, *args, **kwargs):
        seen[0] += 1
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counting)
    return seen


def count_row_moves(monkeypatch) -> list[int]:
    """Rows copied by address from now on (RowBlock.copy_to: each row of a `copy_rows` call, however it copies
    them, and any ctypes.memmove)."""
    import ctypes

    import memfit.llm.kv.swap_layout as layout_mod

    seen = [0]
    move, rows = ctypes.memmove, layout_mod.copy_rows

    def counting_move(*args):
        seen[0] += 1
        return move(*args)

    def counting_rows(dst, dst_stride, src, src_stride, n, row_bytes):
        before = seen[0]
        rows(dst, dst_stride, src, src_stride, n, row_bytes)
        seen[0] = before + n  # (a fallback's memmoves are these rows, not more)

    monkeypatch.setattr(ctypes, "memmove", counting_move)
    monkeypatch.setattr(layout_mod, "copy_rows", counting_rows)
    return seen


def contiguous_runs(table: list[int]) -> int:
    return 1 + sum(b != a + 1 for a, b in zip(table, table[1:])) if table else 0


def grow_interleaved(cache: PagedKVCache, seqs: list[int], upto: int) -> None:
    """Sequences decoding side by side, 4 tokens (one block) at a time: the churn that scatters blocks."""
    for s in seqs:
        assert cache.try_allocate(s, 8)
    for n in range(12, upto + 1, 4):
        for s in seqs:
            assert cache.try_grow(s, n)
    write(cache, [SeqStep(s, 0, upto) for s in seqs])


@pytest.mark.parametrize("head_major", [True, False])
@pytest.mark.parametrize("groups", [False, True])
def test_a_swap_copies_each_block_or_each_contiguous_run_once_and_restores_exactly(monkeypatch, groups, head_major):
    cache = PagedKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), block_size=4, block_groups=groups,
                         head_major=head_major)
    swap = SwapSpace(cache, MemoryBudget(2**20, Tier.HOST, name="swap_space"))
    grow_interleaved(cache, [1, 2, 3], 60)
    table = cache.block_table(2)
    before = contexts(cache, 2, 60)
    copies = count_copies(monkeypatch)
    assert swap.try_swap_out(2, 60)
    out = copies[0]
    cache.free(2)
    assert cache.try_allocate(4, 30)  # other memory is taken meanwhile
    write(cache, [SeqStep(4, 0, 30)])
    assert cache.try_allocate(2, 61)
    table_in = cache.block_table(2)
    copies[0] = 0
    assert swap.swap_in(2) == 60
    back = copies[0]
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 2, 60)))
    blocks = len(table)
    if not groups:  # vLLM's per-block swap: one copy per block per pool, both ways
        assert out == POOLS * blocks and back == POOLS * blocks
    else:
        runs_out, runs_in = contiguous_runs(table), contiguous_runs(cache.block_table(2)[:blocks])
        assert out == POOLS * runs_out and back == POOLS * runs_in
        assert runs_out < blocks // 2 and runs_in <= 2  # the point: far fewer, larger copies
    assert swap.stats.out_ops == out and swap.stats.in_ops == back  # the stats count what happened
    assert len(table_in) == cache.blocks_for(61)
    cache.close()


def test_block_groups_swap_through_the_ssd_tier_reads_back_into_fewer_runs(tmp_path, monkeypatch):
    from memfit.llm.kv.swap_ssd import SSDTier

    cache = PagedKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), block_size=4, block_groups=True)
    ssd = SSDTier(tmp_path, 1 << 20)
    swap = SwapSpace(cache, MemoryBudget(4096, Tier.HOST, name="swap_space"), ssd=ssd)  # too small: straight to SSD
    grow_interleaved(cache, [1, 2], 60)
    before = contexts(cache, 1, 60)
    assert swap.try_swap_out(1, 60)
    cache.free(1)
    assert ssd.stats.out_ops == 1 and swap.stats.out_ops == 0
    assert cache.try_allocate(1, 60)
    assert swap.swap_in(1) == 60
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 60)))
    assert ssd.stats.in_ops == 1 and ssd.budget.used_bytes == 0
    swap.close()
    cache.close()


def test_auto_models_a_block_group_sequences_swap_by_its_runs_and_they_are_the_copies_made(monkeypatch):
    """A sequence allocated alone lies in one run per pool: the `auto` mode's modelled swap (swap_shape) counts
    those copies, not one per block, and a swap-out and swap-in make exactly that many `copy_` calls. With a
    per-copy cost where per-block swapping loses to recomputing, auto now swaps the grouped sequence."""
    from memfit.llm.kv.swap import CostModel

    cache = PagedKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), block_size=4, block_groups=True)
    cost = CostModel(params=10**5, layers=LAYOUT.num_layers, q_width=64)
    swap = SwapSpace(cache, MemoryBudget(2**20, Tier.HOST, name="swap_space"), cost)
    n = 60
    assert cache.try_allocate(1, n)
    write(cache, [SeqStep(1, 0, n)])
    blocks = len(cache.block_table(1))
    assert contiguous_runs(cache.block_table(1)) == 1
    nbytes, copies = swap.swap_shape(1, n)
    per_block_bytes, per_block_copies = swap.runs_shape(n)
    assert nbytes == per_block_bytes and copies == POOLS < per_block_copies == POOLS * blocks
    assert cost.swap_s(nbytes, copies) < cost.swap_s(per_block_bytes, per_block_copies)
    # a per-copy cost between the two: per-block swapping costs more than recomputing, the grouped one less
    recompute = cost.recompute_s(n)
    cost.op_s = (recompute / 2 - nbytes / cost.bytes_per_s) / ((copies + per_block_copies) / 2)
    assert swap.prefers_swap(n, seq_id=1) and not swap.prefers_swap(n)
    seen = count_copies(monkeypatch)
    assert swap.try_swap_out(1, n)
    out = seen[0]
    cache.free(1)
    assert cache.try_allocate(1, n) and contiguous_runs(cache.block_table(1)) == 1
    seen[0] = 0
    assert swap.swap_in(1) == n
    assert out == copies == seen[0]  # the model's count is what each direction actually copied
    monkeypatch.undo()
    cache.close()


@pytest.mark.parametrize("opts", [{}, {"head_major": True}, {"token_major": True}], ids=["per-layer", "head-major",
                                                                                      "token-major"])
def test_a_virtual_swap_moves_all_its_segments_in_one_copy_per_chunk(monkeypatch, opts):
    """The virtual cache's runs of a swap (one per segment) lie at one stride in its slot, so on the CPU one copy of
    a (segments, bytes) view moves them all (swap_layout.stacked): a swap-out, a reuse swap-out of new tokens, a
    merging one (one copy per held chunk it merges, one for the new rows), and a swap-in (one per held chunk). The
    stats still count runs, one a segment; the contents come back exactly."""
    from memfit.llm.kv.virtual import VirtualKVCache

    cache = VirtualKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), max_seqs=4, prefault=False, eager_pages=0,
                           **opts)
    swap = SwapSpace(cache, MemoryBudget(2**20, Tier.HOST, name="swap_space"), reuse=True)
    swap.merge_at = MERGE_AT  # merges at 2, as on a layout that does not stack (the default here waits for 8)
    swap.by_address = False  # the views' path (the default copies a swap-out's rows by address: the test below)
    segs = swap.run_map.segments
    assert cache.try_allocate(1, 60)
    write(cache, [SeqStep(1, 0, 19)])
    total = 19
    copies = count_copies(monkeypatch)
    for new in (0, 5, 7, 3, 6):
        if new:
            write(cache, [SeqStep(1, total, new)])
            total += new
        before = contexts(cache, 1, total)
        held = list(swap._copies[1].chunks) if swap.holds(1) else []
        merges, out_ops = swap.stats.merges, swap.stats.out_ops
        copies[0] = 0
        assert swap.try_swap_out(1, total)
        merged = swap.stats.merges - merges
        assert copies[0] == 1 + (len(held) if merged else 0)
        assert swap.stats.out_ops - out_ops == segs
        cache.free(1)
        assert cache.try_allocate(1, 60)
        chunks, in_ops = len(swap._copies[1].chunks), swap.stats.in_ops
        copies[0] = 0
        assert swap.swap_in(1) == total
        assert copies[0] == chunks <= 2 and swap.stats.in_ops - in_ops == segs * chunks
        assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, total)))
    assert swap.stats.merges >= 1  # a merging swap-out was among them
    monkeypatch.undo()
    swap.close()
    cache.close()


@pytest.mark.parametrize("opts", [{}, {"head_major": True}, {"token_major": True}], ids=["per-layer", "head-major",
                                                                                      "token-major"])
def test_a_virtual_swap_in_of_a_truncated_copy_writes_only_its_valid_rows(opts):
    """A held chunk truncated to 10 valid tokens (a next turn diverged there) restores rows 0..9 and leaves the
    rest of the slot alone: the one-copy path clips the chunk at `valid`, or it would write stale rows, and past a
    shorter allocation."""
    from memfit.llm.kv.virtual import VirtualKVCache

    cache = VirtualKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), max_seqs=2, prefault=False, eager_pages=0,
                           **opts)
    swap = SwapSpace(cache, MemoryBudget(2**21, Tier.HOST, name="swap_space"), reuse=True)
    assert cache.try_allocate(1, 40)
    write(cache, [SeqStep(1, 0, 40)])
    first = contexts(cache, 1, 10)
    assert swap.try_swap_out(1, 40)
    cache.free(1)
    swap.truncate(1, 10)
    assert cache.try_allocate(1, 30)
    plan = cache.plan_step([SeqStep(1, 0, 30)])
    for layer in range(LAYOUT.num_layers):  # a sentinel in every row the swap-in must not touch
        s = torch.full((30, LAYOUT.num_kv_heads, LAYOUT.head_dim), 7.0, dtype=LAYOUT.dtype)
        cache.write(layer, plan, s, s)
    assert swap.swap_in(1) == 10
    assert all(torch.equal(a, b) for a, b in zip(first, contexts(cache, 1, 10)))
    plan = cache.plan_step([SeqStep(1, 30, 0)])
    for layer in range(LAYOUT.num_layers):
        k, v = cache.context(layer, plan, 0)  # (30, Hkv, D)
        assert bool((k[10:] == 7.0).all()) and bool((v[10:] == 7.0).all())
    swap.close()
    cache.close()


@pytest.mark.parametrize("opts", [{}, {"head_major": True}, {"token_major": True}], ids=["per-layer", "head-major",
                                                                                      "token-major"])
def test_a_stacked_swap_out_copies_its_rows_by_address_and_they_come_back_exactly(monkeypatch, opts):
    """By default a CPU virtual cache's swaps copy their segments' rows by address (`stacked_rows`: a row a
    segment and held chunk, in one C call, no torch copy); a chunk above BY_ADDRESS_MAX with several threads goes through torch's
    copy. The bytes held are those of the stacked view either way: every swap-in restores the KV exactly."""
    import memfit.llm.kv.swap as swap_mod
    from memfit.llm.kv.virtual import VirtualKVCache

    cache = VirtualKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), max_seqs=2, prefault=False, eager_pages=0,
                           **opts)
    swap = SwapSpace(cache, MemoryBudget(2**21, Tier.HOST, name="swap_space"), reuse=True)
    segs = swap.run_map.segments
    moves = count_row_moves(monkeypatch)
    copies = count_copies(monkeypatch)
    assert cache.try_allocate(1, 60)
    write(cache, [SeqStep(1, 0, 21)])
    total = 21
    for new, small in ((0, True), (9, True), (6, False)):
        if new:
            write(cache, [SeqStep(1, total, new)])
            total += new
        if not small:  # this chunk counts as large, on 2 threads: torch's copy, which can split it
            monkeypatch.setattr(swap_mod, "BY_ADDRESS_MAX", 0)
            monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        before = contexts(cache, 1, total)
        copies[0] = moves[0] = 0
        assert swap.try_swap_out(1, total)
        assert (copies[0], moves[0]) == ((0, segs) if small else (1, 0))
        cache.free(1)
        assert cache.try_allocate(1, 60)
        chunks = len(swap._copies[1].chunks)
        copies[0] = moves[0] = 0
        assert swap.swap_in(1) == total
        assert (copies[0], moves[0]) == ((0, segs * chunks) if small else (chunks, 0))
        assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, total)))
    swap.close()
    cache.close()


@pytest.mark.parametrize("one_call", [True, False], ids=["c-call", "memmove-fallback"])
@pytest.mark.parametrize("case", ["on the pool", "too many rows"])
def test_rows_on_the_pool_and_many_rows_go_by_address_only_in_one_c_call(monkeypatch, case, one_call):
    """Swaps on the pool and swaps of more than BY_ADDRESS_ROWS rows copy their rows by address where that is one C
    call (kernels/copy_rows.py: one GIL release, as torch's copy); where it would be a memmove a row (each a GIL
    hand-over, a Python call each) they keep the view and torch's copy. The KV comes back exactly either way."""
    import memfit.llm.kernels.copy_rows as rows_mod
    import memfit.llm.kv.swap as swap_mod
    from memfit.llm.kv.virtual import VirtualKVCache

    if one_call and not rows_mod.in_one_call():
        pytest.skip("memfit's I/O kernels cannot run here")
    if not one_call:
        monkeypatch.setattr(rows_mod, "_fn", None)
        monkeypatch.setattr(rows_mod, "_tried", True)
        monkeypatch.setattr(swap_mod, "in_one_call", lambda: False)
    cache = VirtualKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), max_seqs=2, prefault=False, eager_pages=0)
    pool = case == "on the pool"
    swap = SwapSpace(cache, MemoryBudget(2**21, Tier.HOST, name="swap_space"), reuse=True, threads=1 if pool else 0)
    segs = swap.run_map.segments
    if not pool:
        monkeypatch.setattr(swap_mod, "BY_ADDRESS_ROWS", segs - 1)
    moves = count_row_moves(monkeypatch)
    copies = count_copies(monkeypatch)
    assert cache.try_allocate(1, 60)
    write(cache, [SeqStep(1, 0, 21)])
    before = contexts(cache, 1, 21)
    copies[0] = 0
    assert swap.try_swap_out(1, 21, wait=not pool)
    assert swap.swapping_out(1) == pool  # (on the pool: the copy runs there)
    if pool:
        assert swap.finish_swap_out(1) and swap.async_swap_outs == 1
    cache.free(1)
    assert cache.try_allocate(1, 60)
    if pool:
        swap.start_swap_in(1)
        assert swap.finish_swap_in(1) == 21 and swap.async_swap_ins == 1
    else:
        assert swap.swap_in(1) == 21
    # one C call each way moving every segment's row, or one torch copy each way and no row by address
    assert (copies[0], moves[0]) == ((0, 2 * segs) if one_call else (2, 0))
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 21)))
    swap.close()
    cache.close()


def test_a_stacking_layout_holds_chunks_unmerged_until_merge_at_stacked(monkeypatch):
    """Where a chunk moves in one copy (a virtual cache on the CPU), reuse swap-outs of new tokens copy only those
    tokens, turn after turn, until MERGE_AT_STACKED chunks are held, and the next swap-out merges them into one; a
    swap-in makes one copy per chunk. With per-block runs (block_tokens) the same turns merge at MERGE_AT, as
    before. The KV comes back exactly every turn."""
    from memfit.llm.kv.virtual import VirtualKVCache

    for block_tokens, at in ((None, MERGE_AT_STACKED), (4, MERGE_AT)):
        cache = VirtualKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), max_seqs=2, prefault=False,
                               eager_pages=0)
        swap = SwapSpace(cache, MemoryBudget(2**21, Tier.HOST, name="swap_space"), reuse=True, block_tokens=block_tokens)
        swap.by_address = False  # torch copies, so a swap-in's copies count its chunks (rows by address: below)
        assert swap.merging_at() == at
        total = 8
        assert cache.try_allocate(1, 64)
        write(cache, [SeqStep(1, 0, total)])
        copies = count_copies(monkeypatch)
        turns = MERGE_AT_STACKED + 1
        for turn in range(turns):
            before = contexts(cache, 1, total)
            out_bytes = swap.stats.out_bytes
            assert swap.try_swap_out(1, total)
            held = len(swap._copies[1].chunks)
            if swap.stats.merges == 0:  # only the new tokens moved, into a chunk of their own
                assert held == turn + 1 and swap.stats.out_bytes - out_bytes == swap.runs_shape(total, total - 4 if turn else 0)[0]
            cache.free(1)
            assert cache.try_allocate(1, 64)
            copies[0] = 0
            assert swap.swap_in(1) == total
            if block_tokens is None:
                assert copies[0] == held  # one copy per held chunk
            assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, total)))
            write(cache, [SeqStep(1, total, 4)])
            total += 4
            if at == MERGE_AT_STACKED and turn == turns - 1:  # the swap-out that found `at` chunks held merged them
                assert swap.stats.merges == 1 and held == 1 and swap._copies[1].chunks[0].lo == 0
        # merged at every `at`-th swap-out from the (at + 1)-th on: once at the stacking layout's last turn
        assert swap.stats.merges == (turns - 1) // at
        monkeypatch.undo()
        swap.close()
        cache.close()


def test_auto_models_a_cpu_virtual_swap_as_one_copy():
    """The `auto` mode charges its per-copy cost once for a CPU virtual cache's swap (its runs move in one copy),
    and per run with stacking off: at a per-copy cost between the two, only the first swaps."""
    from memfit.llm.kv.swap import CostModel
    from memfit.llm.kv.virtual import VirtualKVCache

    cache = VirtualKVCache(LAYOUT, MemoryBudget(2**22, name="kv_budget"), max_seqs=2, prefault=False, eager_pages=0)
    cost = CostModel(params=10**5, layers=LAYOUT.num_layers, q_width=64)
    swap = SwapSpace(cache, MemoryBudget(2**20, Tier.HOST, name="swap_space"), cost)
    n = 60
    assert cache.try_allocate(1, n)
    nbytes, runs = swap.swap_shape(1, n)
    assert runs == POOLS > 1
    recompute = cost.recompute_s(n)
    cost.op_s = (recompute / 2 - nbytes / cost.bytes_per_s) / ((1 + runs) / 2)  # one copy < it < a copy per run
    assert swap.run_map.stacks and swap.prefers_swap(n, seq_id=1) and swap.prefers_swap(n)
    swap.run_map.stacking = False
    assert not swap.prefers_swap(n, seq_id=1) and not swap.prefers_swap(n)
    cache.close()


@pytest.mark.parametrize("kind", ["per-layer", "head-major", "token-major", "paged", "paged-groups"])
@pytest.mark.parametrize("block_tokens", [None, 3, 16])
def test_shape_is_the_count_and_byte_sum_of_the_pieces_and_the_buffer_a_swap_fills(kind, block_tokens):
    """`shape` (what a swap-out reserves and the stats count) is computed by arithmetic; here it is held against the
    pieces enumerated one by one (`pieces`, `piece_bytes`) for every range of a sequence, and against the bytes a
    swap-out of that range actually writes into its host buffer."""
    from memfit.llm.kv.swap_layout import SwapRuns
    from memfit.llm.kv.virtual import VirtualKVCache

    budget = MemoryBudget(2**22, name="kv_budget")
    if kind.startswith("paged"):
        cache = PagedKVCache(LAYOUT, budget, block_size=4, block_groups=kind == "paged-groups")
    else:
        opts = {"head_major": kind == "head-major", "token_major": kind == "token-major"}
        cache = VirtualKVCache(LAYOUT, budget, max_seqs=2, prefault=False, eager_pages=0, **opts)
    lay = SwapRuns(cache, block_tokens if not kind.startswith("paged") else None)
    granule = lay.granule
    for lo in range(0, 40, granule):
        for hi in range(0, 42):
            pieces = lay.pieces(lo, hi)
            assert lay.shape(hi, lo) == (sum(lay.piece_bytes(p) for p in pieces), len(pieces)), (lo, hi)
    assert cache.try_allocate(1, 41)
    write(cache, [SeqStep(1, 0, 41)])
    swap = SwapSpace(cache, MemoryBudget(2**22, Tier.HOST, name="swap_space"), block_tokens=lay.block_tokens)
    assert swap.try_swap_out(1, 41)
    held = swap._copies[1].chunks[0].buf
    assert held.numel() == lay.shape(41)[0] == swap.stats.out_bytes and swap.stats.out_ops >= 1
    swap.close()
    cache.close()


@pytest.mark.parametrize("kind", ["per-layer", "head-major", "token-major", "paged", "paged-head-major", "paged-groups"])
@pytest.mark.parametrize("block_tokens", [None, 3])
def test_addresses_name_the_very_memory_of_the_runs_in_their_order(kind, block_tokens):
    """`addresses` (what the SSD tier's C loop is given) is computed by arithmetic; here each ByteSpan is held
    against the tensor `runs` makes for it (its data_ptr and byte count), over several ranges of a sequence whose
    blocks are scattered by a neighbour, and its bytes against the run's own."""
    import ctypes

    from memfit.llm.kv.base import KVCacheError
    from memfit.llm.kv.swap_layout import SwapRuns
    from memfit.llm.kv.virtual import VirtualKVCache

    budget = MemoryBudget(2**22, name="kv_budget")
    if kind.startswith("paged"):
        if block_tokens is not None:
            pytest.skip("block_tokens cuts the virtual cache's runs only")
        cache = PagedKVCache(LAYOUT, budget, block_size=4, block_groups=kind == "paged-groups",
                             head_major=kind == "paged-head-major")
        grow_interleaved(cache, [1, 2], 40)
    else:
        opts = {"head_major": kind == "head-major", "token_major": kind == "token-major"}
        cache = VirtualKVCache(LAYOUT, budget, max_seqs=3, prefault=False, eager_pages=0, **opts)
        for s in (2, 1):  # sequence 1 in the second slot: its addresses do not start at the arena's
            assert cache.try_allocate(s, 40)
        write(cache, [SeqStep(s, 0, 40) for s in (1, 2)])
    lay = SwapRuns(cache, block_tokens if not kind.startswith("paged") else None)
    for lo, hi in [(0, 40), (lay.granule, 37), (8, 9), (12, 12)]:
        runs, spans = lay.runs(1, hi, lo), lay.addresses(1, hi, lo)
        assert [(r.data_ptr(), r.numel()) for r in runs] == [tuple(s) for s in spans], (lo, hi)
        for r, s in zip(runs, spans):
            assert bytes((ctypes.c_ubyte * s.nbytes).from_address(s.address)) == r.numpy().tobytes()
    cache.close()
    with pytest.raises(KVCacheError, match="closed"):
        lay.addresses(1, 8)
