"""The SSD tier's O_DIRECT staging buffers in the whole-process ledger (engine/swap_tiers.py, engine/ledger.py):
reserved before the KV share, never exceeded by the buffers actually mapped, given back when O_DIRECT is not in
use, and refused clearly when the budget cannot hold them."""
from __future__ import annotations

import errno
import mmap as real_mmap
import os
import time

import pytest
import torch

import memfit.memory.direct_staging as direct_staging
import memfit.memory.extent_store as extent_store
from memfit.llm.engine.api import LLM
from memfit.llm.engine.config import EngineConfig
from memfit.llm.engine.ledger import reserve_ssd_staging
from memfit.llm.engine.swap_tiers import SSD_STAGING_OWNER
from memfit.llm.kernels.staged_io import aio_ring_bytes
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded, Tier
from memfit.memory.extent_store import STAGE
from tests.llm.engine.test_engine import tiny  # noqa: F401 - the fixture
from tests.llm.engine.test_preemption import PARAMS, PROMPTS

THREADS = 2


def aio_mappings() -> list[int]:
    """The sizes of this process's AIO completion rings, from the kernel's map of it ("/[aio] (deleted)")."""
    sizes = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("/[aio] (deleted)"):
            lo, hi = line.split()[0].split("-")
            sizes.append(int(hi, 16) - int(lo, 16))
    return sizes


class CountingMmap:
    """Stands in for the `mmap` module inside direct_staging (the store's staging pool): counts the STAGE-byte
    anonymous maps it makes."""

    def __init__(self) -> None:
        self.staging_maps = 0

    def mmap(self, fileno: int, length: int, *args, **kwargs):  # noqa: ANN201 - as mmap.mmap
        if fileno == -1 and length == STAGE:
            self.staging_maps += 1
        return real_mmap.mmap(fileno, length, *args, **kwargs)


def heavy_ssd_llm(path, tmp_path, threads: int = THREADS) -> LLM:
    """A KV budget for 2.5 sequences and a host tier for ~30 tokens: swapped KV goes down to the SSD tier."""
    probe = LLM(str(path), dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    return LLM(str(path), dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
               preemption_mode="swap", swap_threads=threads,
               swap_space=f"{probe.engine.layout.bytes_per_token * 30}B", swap_ssd_path=str(tmp_path),
               swap_ssd_space="16MiB")


def test_the_staging_buffers_mapped_under_heavy_ssd_swapping_never_exceed_the_ledger_reservation(
        tiny, tmp_path, monkeypatch):  # noqa: F811
    counter = CountingMmap()
    monkeypatch.setattr(direct_staging, "mmap", counter)
    llm = heavy_ssd_llm(tiny[2], tmp_path)
    engine = llm.engine
    store = engine.swap.ssd.store
    if not store.direct:
        pytest.skip(f"O_DIRECT not in use here ({store.direct_fallback})")
    reserved = engine.ledger.by_owner().get(SSD_STAGING_OWNER, 0)
    assert reserved == (THREADS + 1) * (STAGE + aio_ring_bytes()) and store.staging_bytes == (THREADS + 1) * STAGE
    before = sorted(aio_mappings())  # rings of threads this engine does not own (earlier tests' live threads)
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
    rings = sorted(aio_mappings())  # the swap threads' AIO contexts live as long as the threads: mapped now
    for size in before:
        if size in rings:  # (a thread of before's may have exited meanwhile)
            rings.remove(size)
    ssd = {t["tier"]: t for t in engine.stats()["swap"]["tiers"]}["ssd"]
    assert ssd["out_ops"] > 3 and ssd["in_ops"] > 3  # heavy SSD traffic, on the engine thread and the pool
    assert engine.swap.async_swap_ins + engine.swap.async_swap_outs > 0
    assert 1 <= counter.staging_maps and counter.staging_maps * STAGE + sum(rings) <= reserved
    assert len(rings) <= THREADS + 1
    assert engine.ledger.by_owner()[SSD_STAGING_OWNER] == reserved  # held while O_DIRECT is in use
    engine.close()


def test_more_threads_than_buffers_wait_for_one_instead_of_mapping_more(tmp_path, monkeypatch):
    """Eight threads writing at once through a store of two buffers: no more than two are ever mapped."""
    import threading

    counter = CountingMmap()
    monkeypatch.setattr(direct_staging, "mmap", counter)
    store = extent_store.ExtentStore(tmp_path, 64 * STAGE, max_stages=2)
    if not store.direct:
        pytest.skip(f"O_DIRECT not in use here ({store.direct_fallback})")
    data = [torch.full((STAGE + 777,), i, dtype=torch.uint8) for i in range(8)]
    offs = [store.alloc(d.numel()) for d in data]
    threads = [threading.Thread(target=store.write, args=(o, [memoryview(d.numpy())])) for o, d in zip(offs, data)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o, d in zip(offs, data):
        back = torch.empty_like(d)
        store.readinto(o, [memoryview(back.numpy())])
        assert torch.equal(back, d)
    assert counter.staging_maps <= 2 and store.staging_bytes == 2 * STAGE
    store.close()


def test_the_reservation_is_given_back_when_the_first_o_direct_write_is_refused(tiny, tmp_path):  # noqa: F811
    llm = heavy_ssd_llm(tiny[2], tmp_path)
    engine = llm.engine
    ssd = engine.swap.ssd
    if not ssd.store.direct:
        pytest.skip("O_DIRECT not in use here")

    class Refusing:  # the file system accepted the flag at open and refuses the I/O (as some do)
        def write(self, *args):
            raise OSError(errno.EINVAL, "Invalid argument (injected)")

        read = write_segments = read_segments = write  # the tier calls the segment forms

    ssd._io = Refusing()
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
    assert not ssd.store.direct and ssd.stats.out_bytes > 0  # buffered I/O from the first write on
    assert engine.ledger.by_owner().get(SSD_STAGING_OWNER, 0) == 0 and ssd.store.staging_bytes == 0
    engine.close()


def test_the_reservation_is_given_back_when_o_direct_is_refused_at_open(tiny, tmp_path, monkeypatch):  # noqa: F811
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument (injected)")
        return real_open(path, flags, *args)

    monkeypatch.setattr(extent_store.os, "open", no_direct)
    engine = heavy_ssd_llm(tiny[2], tmp_path).engine
    assert not engine.swap.ssd.store.direct
    assert engine.ledger.by_owner().get(SSD_STAGING_OWNER, 0) == 0
    engine.close()


def test_a_budget_without_room_for_the_staging_buffers_is_refused_clearly(tmp_path):
    cpu = torch.device("cpu")
    config = EngineConfig(preemption_mode="swap", swap_threads=2, swap_ssd_path=str(tmp_path))
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here: nothing to reserve")
    per_thread = STAGE + aio_ring_bytes()
    ledger = MemoryBudget(3 * per_thread - 1, Tier.DEVICE, name="memory_budget")
    with pytest.raises(MemoryBudgetExceeded, match="staging buffers .*--swap-threads 2"):
        reserve_ssd_staging(config, ledger, cpu)
    assert ledger.used_bytes == 0
    ledger = MemoryBudget(3 * per_thread, Tier.DEVICE, name="memory_budget")
    assert reserve_ssd_staging(config, ledger, cpu) == 3 * per_thread == ledger.by_owner()[SSD_STAGING_OWNER]
    # no SSD tier: nothing reserved (and recompute only refuses an SSD tier at start: test_swap_flags_...)
    assert reserve_ssd_staging(EngineConfig(preemption_mode="swap"), ledger, cpu) == 0
    assert reserve_ssd_staging(EngineConfig(), ledger, cpu) == 0


def test_swap_ssd_prewrite_from_the_command_line_leaves_no_unwritten_extent(tiny, tmp_path, capsys):  # noqa: F811
    import argparse

    from memfit.llm.engine.config import add_engine_args
    from tests.memory.test_extent_store import _unwritten_bytes

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--preemption-mode", "swap", "--ssd-swap", f"{tmp_path}:8MiB", "--swap-ssd-prewrite"])
    config = EngineConfig.from_args(args)
    assert config.swap_ssd_prewrite and not EngineConfig.from_args(p.parse_args([])).swap_ssd_prewrite
    llm = LLM(str(tiny[2]), dtype="float32", kv_budget="4MiB", preemption_mode="swap", swap_ssd_path=str(tmp_path),
              swap_ssd_space="8MiB", swap_ssd_prewrite=True)
    assert _unwritten_bytes(llm.engine.swap.ssd.store.path) in (0, None)  # None: FIEMAP not answered here
    assert "100% written" in capsys.readouterr().err
    llm.engine.close()


def test_the_host_tier_keeps_its_pages_warm_only_where_its_budget_is_set_aside_and_gives_them_back_when_idle(
        tiny):  # noqa: F811
    """--swap-space sets the tier's bytes aside in the ledger: its region keeps freed pages for the next swap-out,
    and the engine gives them back once idle for kv_reclaim_idle_s. Without it the KV cache draws on the same room,
    so freed pages go back at once (kernel's page map: mincore)."""
    from tests.memory.test_host_region import resident_bytes

    _, _, path = tiny
    probe = LLM(str(path), dtype="float32", kv_budget="64MiB")
    one_seq = probe.engine.kv.bytes_needed(80)
    probe.engine.close()
    for swap_space in ("16MiB", None):
        llm = LLM(str(path), dtype="float32", kv_budget=int(one_seq * 2.5), kv_eager_pages=0, kv_prefault=False,
                  preemption_mode="swap", swap_space=swap_space, swap_threads=0, kv_reclaim_idle_s=60,
                  memory_budget="8GiB")
        llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
        swap = llm.engine.swap
        assert swap.stats.out_ops > 0 and swap.budget.by_owner().get("swap", 0) == 0
        warm, meta = resident_bytes(swap.region), swap.region.meta_bytes
        assert swap.budget.used_bytes == meta + warm  # every page the kernel holds for the region is in the budget
        if swap_space is None:
            assert swap.region.keep_bytes == 0 and warm == 0
        else:
            assert warm > 0
            llm.engine.maintain(now=time.monotonic() + 1)  # not idle long enough: kept
            assert resident_bytes(swap.region) == warm
            llm.engine.maintain(now=time.monotonic() + 100)
            assert resident_bytes(swap.region) == 0 and swap.budget.used_bytes == meta  # its tables stay
        llm.engine.close()


def test_a_swap_space_too_small_for_the_region_tables_and_one_chunk_is_refused_at_start(tiny):  # noqa: F811
    """Issue 15: the host tier's region keeps its page map and extent tables in the tier's budget; a --swap-space
    that cannot hold them and one chunk could never swap, and is refused at start, naming the size that would do."""
    for kv_cache in ("virtual", "paged"):
        with pytest.raises(ValueError, match=r"--swap-space\) cannot hold .* give --swap-space at least"):
            LLM(str(tiny[2]), dtype="float32", kv_budget="4MiB", preemption_mode="swap", swap_space="4KiB",
                memory_budget="8GiB", kv_cache=kv_cache)
