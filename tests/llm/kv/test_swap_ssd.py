"""The SSD tier under the host tier: host chunks are demoted there under pressure and read back bit for bit into
other memory; a failed write keeps the chunk on the host (or the swap is refused: recompute), a flipped byte on
disk fails the checksum and the swap-in reports the loss instead of serving it, a full tier refuses; every tier's
budget equals what it holds."""
import pytest
import torch

from memfit.llm.kv.base import SeqStep
from memfit.llm.kv.swap import SwapSpace
from memfit.llm.kv.swap_ssd import SSDTier
from memfit.memory.budget import MemoryBudget, Tier
from memfit.memory.extent_store import ALIGN, ExtentStore
from memfit.memory.mapping import round_up
from tests.llm.kv.test_swap import CACHES, contexts
from tests.llm.kv.test_virtual import LAYOUT, write

BPT = LAYOUT.bytes_per_token


def setup(kind, tmp_path, host_tokens=24, ssd_bytes=1 << 20, reuse=False, threads=0):
    cache = CACHES[kind](MemoryBudget(2**22, name="kv_budget"))
    host = MemoryBudget(host_tokens * BPT, Tier.HOST, name="swap_space")
    ssd = SSDTier(tmp_path, ssd_bytes)
    swap = SwapSpace(cache, host, reuse=reuse, ssd=ssd, threads=threads)
    for s in (1, 2, 3):
        assert cache.try_allocate(s, 19)
    write(cache, [SeqStep(s, 0, 19) for s in (1, 2, 3)])
    return cache, host, ssd, swap


def ssd_held(ssd: SSDTier) -> int:
    """Bytes of extents in use, from the store's free list (not the tier's counters)."""
    return ssd.store.capacity - sum(n for _, n in ssd.store.free_extents)


@pytest.mark.parametrize("kind", ["per-layer", "paged"])
@pytest.mark.parametrize("threads", [0, 2])
def test_host_pressure_demotes_to_ssd_and_the_swap_in_restores_exactly(kind, threads, tmp_path):
    cache, host, ssd, swap = setup(kind, tmp_path, threads=threads)
    before = {s: contexts(cache, s, 19) for s in (1, 2)}
    assert swap.try_swap_out(1, 19)
    cache.free(1)
    assert swap.try_swap_out(2, 19)  # the host tier holds one sequence: 1 goes down to the SSD tier
    cache.free(2)
    n1 = swap.runs_shape(19)[0]
    assert host.used_bytes == swap.held_bytes() == n1 and ssd.stats.out_bytes == n1
    assert ssd.budget.used_bytes == ssd_held(ssd) == round_up(n1, ALIGN)
    assert cache.try_allocate(4, 30)  # the freed memory is overwritten
    write(cache, [SeqStep(4, 0, 30)])
    for s in (1, 2):
        assert cache.try_allocate(s, 20)
        if threads:
            swap.start_swap_in(s)
            assert swap.finish_swap_in(s) == 19
        else:
            assert swap.swap_in(s) == 19
        assert all(torch.equal(a, b) for a, b in zip(before[s], contexts(cache, s, 19)))
    assert ssd.stats.in_bytes == n1 and ssd.stats.io_errors == 0
    assert host.used_bytes == 0 and ssd.budget.used_bytes == 0 == ssd_held(ssd)
    swap.close()
    assert not ssd.store.path.exists()
    cache.close()


def test_a_failed_write_keeps_the_chunk_on_the_host_and_refuses_the_swap(tmp_path, monkeypatch):
    cache, host, ssd, swap = setup("per-layer", tmp_path)
    assert swap.try_swap_out(1, 19)

    def failing(self, offset, segments, digests=None, staged=None):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(ExtentStore, "write_segments", failing)  # every write of the store goes through it
    assert not swap.try_swap_out(2, 19)  # no room on the host, the SSD write failed: the caller recomputes 2
    assert swap.holds(1) and not swap.holds(2) and ssd.stats.io_errors == 2  # demoting 1, then 2 straight down
    assert host.used_bytes == swap.held_bytes() and ssd.budget.used_bytes == 0 == ssd_held(ssd)
    cache.free(1)
    assert cache.try_allocate(1, 20) and swap.swap_in(1) == 19  # 1 was never lost
    swap.close()
    cache.close()


@pytest.mark.parametrize("threads", [0, 2])
def test_a_flipped_byte_on_disk_fails_the_checksum_and_is_never_served(tmp_path, threads):
    cache, host, ssd, swap = setup("per-layer", tmp_path, threads=threads)
    assert swap.try_swap_out(1, 19)
    cache.free(1)
    assert swap.try_swap_out(2, 19)  # 1 demoted
    extent = swap._copies[1].chunks[0].extent
    with open(ssd.store.path, "r+b") as f:  # flip one byte of 1's extent, on disk
        f.seek(extent.offset + 1234)
        b = f.read(1)
        f.seek(extent.offset + 1234)
        f.write(bytes([b[0] ^ 0x40]))
    assert cache.try_allocate(1, 20)
    if threads:
        swap.start_swap_in(1)
        assert swap.finish_swap_in(1) is None
    else:
        assert swap.swap_in(1) is None  # the scheduler recomputes the sequence
    assert ssd.stats.io_errors == 1 and not swap.holds(1) and cache.num_tokens(1) == 0
    assert ssd.budget.used_bytes == 0 == ssd_held(ssd)
    swap.close()
    cache.close()


def test_a_full_ssd_tier_refuses_and_the_swap_falls_back(tmp_path):
    nbytes = 19 * BPT
    cache, host, ssd, swap = setup("per-layer", tmp_path, ssd_bytes=round_up(nbytes, ALIGN))  # room for one run
    for s in (1, 2):
        assert swap.try_swap_out(s, 19)
        cache.free(s)
    assert not swap.try_swap_out(3, 19)  # 1 on SSD, 2 on the host: both tiers full
    assert swap.holds(1) and swap.holds(2) and not swap.holds(3)
    assert host.used_bytes == swap.held_bytes() and ssd.budget.used_bytes == ssd_held(ssd) <= ssd.budget.limit_bytes
    swap.close()
    cache.close()


def test_kept_copies_go_to_ssd_before_live_ones_and_reuse_reads_them_back(tmp_path):
    cache, host, ssd, swap = setup("token-major", tmp_path, reuse=True)
    assert swap.try_swap_out(1, 19)
    cache.free(1)
    assert cache.try_allocate(1, 30) and swap.swap_in(1) == 19  # kept on the host
    write(cache, [SeqStep(1, 19, 4)])
    before = contexts(cache, 1, 23)
    assert swap.try_swap_out(2, 19)  # host pressure: the kept copy of 1 is demoted, not dropped
    cache.free(2)
    assert swap.stats.kept_evictions == 1 and swap.holds(1) and swap._copies[1].chunks[0].buf is None
    assert swap.try_swap_out(1, 23)  # moves only the 4 new tokens, to the host
    assert swap._copies[1].chunks[-1].nbytes == 4 * BPT
    cache.free(1)
    assert cache.try_allocate(1, 30) and swap.swap_in(1) == 23  # one chunk from SSD, one from the host
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 23)))
    swap.close()
    cache.close()


@pytest.mark.parametrize("fail", [False, True])
def test_an_asynchronous_swap_out_spilled_to_ssd_is_written_on_the_pool_or_lost_whole(tmp_path, monkeypatch, fail):
    """A run the host tier cannot hold goes straight to the SSD tier; asynchronously, its extent is taken (and
    counted) at once on the calling thread and written on the swap pool. A failed write gives the extent back and
    holds nothing (the caller recomputes); a landed one reads back exactly."""
    import threading

    cache, host, ssd, swap = setup("per-layer", tmp_path, host_tokens=10, threads=2)  # 19 tokens do not fit
    before = contexts(cache, 1, 19)
    writers, real_write = [], ExtentStore.write_segments

    def write(self, offset, segments, digests=None, staged=None):
        writers.append(threading.current_thread().name)
        if fail:
            raise OSError(5, "Input/output error (injected)")
        real_write(self, offset, segments, digests, staged)

    monkeypatch.setattr(ExtentStore, "write_segments", write)
    n = swap.runs_shape(19)[0]
    assert swap.try_swap_out(1, 19, wait=False) and swap.swapping_out(1)
    assert ssd.budget.used_bytes == ssd_held(ssd) == round_up(n, ALIGN) and host.used_bytes == 0
    landed = swap.finish_swap_out(1)
    cache.free(1)
    assert writers and all(w.startswith("memfit-swap") for w in writers)
    if fail:
        assert not landed and not swap.holds(1) and ssd.stats.io_errors == 1 and swap.stats.io_errors == 0
        assert ssd.budget.used_bytes == 0 == ssd_held(ssd)
    else:
        assert landed and swap.async_swap_outs == 1 and ssd.stats.out_bytes == n
        assert cache.try_allocate(1, 20) and swap.swap_in(1) == 19
        assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 19)))
        assert ssd.budget.used_bytes == 0 == ssd_held(ssd)
    swap.close()
    cache.close()


def proc_io() -> dict[str, int]:
    """This process's I/O counters from the kernel (/proc/self/io): system calls and bytes sent to the disk."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}


def io_between(action) -> dict[str, int]:
    """The kernel's count of what `action` did, less what reading the counters itself costs."""
    a, b = proc_io(), proc_io()
    action()
    c = proc_io()
    return {k: (c[k] - b[k]) - (b[k] - a[k]) for k in ("syscw", "syscr", "write_bytes", "read_bytes")}


@pytest.mark.parametrize("batch", [True, False])
def test_a_sequences_chunks_go_to_ssd_in_one_write_and_come_back_in_one_read(tmp_path, batch):
    """With reuse a sequence's copy grows by a chunk per swap-out; demoted together, its chunks are written with
    one O_DIRECT write and read back with one read (batch=False: one each), counted by the kernel, not by the
    tier, and the KV comes back bit for bit."""
    cache, host, ssd, swap = setup("token-major", tmp_path, host_tokens=40, reuse=True)
    if not (ssd.store.direct and ssd._io is not None):
        pytest.skip("needs O_DIRECT and the C loop (the Python loop writes an extent at a time)")
    ssd.batch = batch
    cache.free(1)
    assert cache.try_allocate(1, 30)
    for n in (10, 20, 30):  # three swap-outs: a chunk each (reuse moves only the tokens added since)
        write(cache, [SeqStep(1, n - 10, 10)])
        before = contexts(cache, 1, n)
        assert swap.try_swap_out(1, n)
        cache.free(1)
        if n < 30:
            assert cache.try_allocate(1, 30) and swap.swap_in(1) == n
    assert len(swap._copies[1].chunks) == 3 and host.used_bytes == 30 * BPT
    padded = sum(round_up(c.nbytes, ALIGN) for c in swap._copies[1].chunks)
    io = io_between(lambda: swap.try_swap_out(2, 19))  # needs the host's room: seq 1 is demoted, all 3 chunks
    assert all(c.buf is None for c in swap._copies[1].chunks)
    assert io["write_bytes"] == padded and io["syscw"] == (1 if batch else 3)
    cache.free(2)
    assert cache.try_allocate(4, 40)  # 1's old memory is overwritten
    write(cache, [SeqStep(4, 0, 40)])
    assert cache.try_allocate(1, 31)
    io = io_between(lambda: swap.swap_in(1))
    assert io["read_bytes"] == padded and io["syscr"] == (1 if batch else 3)
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 30)))
    assert ssd.stats.io_errors == 0 and ssd.stats.in_ops == (1 if batch else 3)
    swap.close()
    cache.close()


@pytest.mark.parametrize("batch", [True, False])
def test_chunks_demoted_apart_come_back_in_one_call_without_a_read_per_extent(tmp_path, batch):
    """A sequence's chunks demoted at different times lie apart in the file (another sequence's extent between):
    its swap-in still reads them in one call, the extents submitted together (Linux AIO) rather than one pread
    each, counted by the kernel (/proc/self/io: no read system call, and the extents' bytes from the disk);
    batch=False reads them with a pread each. The KV comes back bit for bit."""
    cache, host, ssd, swap = setup("token-major", tmp_path, host_tokens=12, reuse=True)
    if not (ssd.store.direct and ssd._io is not None):
        pytest.skip("needs O_DIRECT and the C loop")
    ssd.batch = batch
    cache.free(1)
    assert cache.try_allocate(1, 30)
    for n in (10, 20, 30):  # each swap-out's 10 new tokens fill the host tier: the chunk before goes to SSD
        write(cache, [SeqStep(1, n - 10, 10)])
        before = contexts(cache, 1, n)
        assert swap.try_swap_out(1, n)
        cache.free(1)
        assert ssd.write_runs([torch.zeros(100, dtype=torch.uint8)]) is not None  # a spacer: the next lands apart
        assert cache.try_allocate(1, 30) and swap.swap_in(1) == n
    assert swap.try_swap_out(1, 30)  # nothing new: the copy is whole, [0, 30), in three chunks
    cache.free(1)
    assert swap.try_swap_out(2, 10)  # the host tier's room goes to 2: 1's last chunk is demoted too
    chunks = swap._copies[1].chunks
    assert len(chunks) == 3 and all(c.buf is None for c in chunks)
    offs = sorted(c.extent.offset for c in chunks)
    assert all(b - a > round_up(10 * BPT, ALIGN) for a, b in zip(offs, offs[1:]))  # apart in the file
    cache.free(2)
    assert cache.try_allocate(4, 40)
    write(cache, [SeqStep(4, 0, 40)])
    assert cache.try_allocate(1, 31)
    io = io_between(lambda: swap.swap_in(1))
    assert io["read_bytes"] == 3 * round_up(10 * BPT, ALIGN) and io["syscr"] == (0 if batch else 3)
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 30)))
    assert ssd.stats.io_errors == 0
    swap.close()
    cache.close()


@pytest.mark.parametrize("by_address", [True, False])
@pytest.mark.parametrize("kind", ["per-layer", "paged"])
def test_the_ssd_tier_takes_cpu_kv_by_address_and_makes_no_view_of_it(kind, by_address, tmp_path, monkeypatch):
    """A swap straight to the SSD tier and back names the CPU cache's runs by address (SwapRuns.addresses: the C
    loop wants pointers only), not by a torch view each (by_address=False: a view each, the comparison the
    benchmarks make); the KV comes back bit for bit either way."""
    from memfit.llm.kv.swap_layout import SwapRuns

    cache, host, ssd, swap = setup(kind, tmp_path, host_tokens=10)  # 19 tokens do not fit the host tier
    ssd.by_address = by_address
    before = contexts(cache, 1, 19)
    views, real_view = [0], SwapRuns.view

    def counting(self, *args, **kwargs):
        views[0] += 1
        return real_view(self, *args, **kwargs)

    monkeypatch.setattr(SwapRuns, "view", counting)
    assert swap.try_swap_out(1, 19) and ssd.stats.out_bytes == swap.runs_shape(19)[0]
    cache.free(1)
    assert cache.try_allocate(4, 30)
    write(cache, [SeqStep(4, 0, 30)])
    assert cache.try_allocate(1, 20) and swap.swap_in(1) == 19
    assert (views[0] == 0) == by_address
    monkeypatch.setattr(SwapRuns, "view", real_view)
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 19)))
    swap.close()
    cache.close()


def test_runs_by_address_are_cut_where_an_extent_ends_as_views_are():
    """`_split` hands each SSD extent its share of the runs: a ByteSpan crossing an extent's end is cut into two
    spans at the same addresses a view would be sliced at, in order, every byte once."""
    import ctypes

    from memfit.llm.kv.swap_ssd import _split
    from memfit.memory.byte_span import ByteSpan

    mem = bytearray(range(200))
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    cuts = [(0, 30), (30, 110), (110, 111), (111, 200)]
    sizes = [50, 1, 100, 49]  # extents ending inside the runs, one of a single byte
    views = _split([memoryview(mem)[a:b] for a, b in cuts], sizes)
    spans = _split([ByteSpan(base + a, b - a) for a, b in cuts], sizes)
    as_ranges = [[(s.address - base, s.address - base + s.nbytes) for s in seg] for seg in spans]
    assert [[bytes(v) for v in seg] for seg in views] == [[bytes(mem[a:b]) for a, b in seg] for seg in as_ranges]
    assert [sum(s.nbytes for s in seg) for seg in spans] == sizes
    assert as_ranges == [[(0, 30), (30, 50)], [(50, 51)], [(51, 110), (110, 111), (111, 151)], [(151, 200)]]


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("kind", ["per-layer", "head-major", "paged"])
def test_a_host_chunk_reaching_past_the_valid_tokens_goes_to_ssd_as_its_valid_rows(kind, live, tmp_path):
    """A copy truncated inside a host chunk (a new turn's prompt diverged there) is demoted with the rows of its
    valid tokens alone: an SSD chunk is read back whole, into memory given for `valid` tokens, so the stale rows past
    `valid` must not go down with it. Live or kept, the copy keeps its 7 valid tokens, the file holds 7 tokens' KV
    (the paged cache: its 2 blocks of 4), and they come back exactly into memory for 8."""
    cache, host, ssd, swap = setup(kind, tmp_path, reuse=True)  # the host tier holds 24 tokens
    before = contexts(cache, 1, 7)
    assert swap.try_swap_out(1, 19, keep=True)  # a finished turn's KV, kept: one host chunk [0, 19)
    cache.free(1)
    if live:
        assert swap.adopt(1, 7) == 7  # the next turn shares 7 tokens: live, valid 7, the chunk still [0, 19)
    else:
        swap.truncate(1, 7)
    copy = swap._copies[1]
    assert copy.valid == 7 and copy.chunks[0].hi == 19 and copy.chunks[0].buf is not None
    assert swap.try_swap_out(2, 19)  # host pressure: 1 is the only candidate to demote
    cache.free(2)
    copy = swap._copies[1]
    assert copy.valid == 7 and copy.live == live and [(c.lo, c.hi, c.buf is None) for c in copy.chunks] == [(0, 7, True)]
    # what the file holds, and the host, by the layouts' own arithmetic (the paged cache's: whole blocks of 4)
    on_ssd, on_host = (8, 20) if kind == "paged" else (7, 19)  # 1's valid tokens; 2's copy alone
    assert ssd_held(ssd) == ssd.budget.used_bytes == round_up(on_ssd * BPT, ALIGN)
    assert host.used_bytes == swap.held_bytes() == swap.stats.resident_bytes == on_host * BPT
    if not live:
        assert swap.adopt(1, 12) == 7
    assert cache.try_allocate(4, 30)  # the freed memory is overwritten
    write(cache, [SeqStep(4, 0, 30)])
    assert cache.try_allocate(1, 8) and swap.swap_in(1) == 7
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 7)))
    swap.close()
    cache.close()


def test_a_kept_copy_keeps_its_ssd_prefix_and_the_valid_part_of_a_host_chunk_past_valid(tmp_path):
    """A kept copy of [0, 10) on the SSD tier and [10, 19) on the host, truncated to 15: under host pressure the
    host chunk goes down as [10, 15), after the SSD prefix; valid stays 15, and the 15 tokens restore exactly."""
    cache, host, ssd, swap = setup("per-layer", tmp_path, reuse=True)
    assert swap.try_swap_out(1, 10)
    cache.free(1)
    assert cache.try_allocate(1, 30) and swap.swap_in(1) == 10  # kept on the host after its swap-in
    assert swap.book.demote(1) and swap._copies[1].chunks[0].buf is None  # [0, 10) to the SSD tier
    write(cache, [SeqStep(1, 10, 9)])
    before = contexts(cache, 1, 15)
    assert swap.try_swap_out(1, 19, keep=True)  # [10, 19) on the host
    cache.free(1)
    swap.truncate(1, 15)
    assert swap.try_swap_out(2, 19)  # host pressure: 1's host chunk goes down with its 5 valid tokens
    cache.free(2)
    copy = swap._copies[1]
    assert copy.valid == 15 and [(c.lo, c.hi, c.buf is None) for c in copy.chunks] == [(0, 10, True), (10, 15, True)]
    assert ssd_held(ssd) == round_up(10 * BPT, ALIGN) + round_up(5 * BPT, ALIGN)
    assert cache.try_allocate(4, 30)
    write(cache, [SeqStep(4, 0, 30)])
    assert swap.adopt(1, 17) == 15 and cache.try_allocate(1, 16) and swap.swap_in(1) == 15
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 15)))
    assert host.used_bytes == swap.held_bytes() == swap.stats.resident_bytes
    swap.close()
    cache.close()


@pytest.mark.parametrize("kind", ["per-layer", "paged"])
def test_a_chunk_a_later_one_rewrote_goes_down_up_to_the_later_ones_start(kind, tmp_path):
    """A turn adopts 8 tokens of a kept [0, 19) chunk and runs to 12: its swap-out adds [8, 12), and the first chunk's
    rows from 8 on are stale. Demoted, the first goes down as [0, 8) (the file holds 12 tokens, not 19 + 4 or
    12 + 4), and a later truncation to 10, inside the second, still keeps [0, 8) and restores it exactly."""
    cache, host, ssd, swap = setup(kind, tmp_path, host_tokens=64, reuse=True)
    before = contexts(cache, 1, 8)
    assert swap.try_swap_out(1, 19, keep=True)
    cache.free(1)
    assert swap.adopt(1, 8) == 8 and cache.try_allocate(1, 30) and swap.swap_in(1) == 8
    write(cache, [SeqStep(1, 8, 4)])
    assert swap.try_swap_out(1, 12, keep=True)
    cache.free(1)
    assert [(c.lo, c.hi) for c in swap._copies[1].chunks] == [(0, 19), (8, 12)]
    assert swap.book.demote(1)
    assert [(c.lo, c.hi, c.buf is None) for c in swap._copies[1].chunks] == [(0, 8, True), (8, 12, True)]
    assert ssd_held(ssd) == round_up(8 * BPT, ALIGN) + round_up(4 * BPT, ALIGN)  # (blocks of 4: whole ones here)
    swap.truncate(1, 10)  # the SSD chunk [8, 12) is read whole: it goes, [0, 8) stays
    assert swap.valid_tokens(1) == 8 and ssd_held(ssd) == round_up(8 * BPT, ALIGN)
    assert cache.try_allocate(4, 30)
    write(cache, [SeqStep(4, 0, 30)])
    assert swap.adopt(1, 10) == 8 and cache.try_allocate(1, 9) and swap.swap_in(1) == 8
    assert all(torch.equal(a, b) for a, b in zip(before, contexts(cache, 1, 8)))
    swap.close()
    cache.close()


@pytest.mark.parametrize("batch", [False, True])
def test_a_refused_write_of_several_chunks_leaves_nothing_counted(tmp_path, batch):
    """All or nothing: chunks that do not all fit are refused, and the ones written before the refusal are given
    back, in the store's free list, the tier's budget and its resident count alike."""
    ssd = SSDTier(tmp_path, 2 * ALIGN, batch=batch)
    small, large = torch.ones(ALIGN, dtype=torch.uint8), torch.ones(2 * ALIGN, dtype=torch.uint8)
    assert ssd.write_chunks([small, large]) is None
    assert ssd_held(ssd) == ssd.budget.used_bytes == ssd.stats.resident_bytes == 0
    assert ssd.write_chunks([small, [small[: ALIGN // 2], small[ALIGN // 2 :]]]) is not None  # a chunk as its runs
    assert ssd_held(ssd) == ssd.budget.used_bytes == ssd.stats.resident_bytes == 2 * ALIGN
    ssd.close()
