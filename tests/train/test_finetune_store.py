"""The store's flat host copy of the compute-dtype parameters (zero-infinity on the SSD tier, as ZeRO-3 below
max_in_cpu): the copy is really used (no parameter bytes on the SSD), and its bytes are resident, measured by
the kernel (mincore over its pages, and the process RSS) rather than by the store's own ledger."""
from __future__ import annotations

import ctypes
import mmap

import pytest
import torch

from memfit.llm.models import ModelConfig
from memfit.memory.measure import rss_bytes
from memfit.train.finetune.designs import ZeroInfinity
from memfit.train.finetune.store import GroupStore
from memfit.train.finetune.units import make_groups, skeleton
from tests.train.test_finetune import cfg, make_tiny, run

PAGE = mmap.PAGESIZE


def resident(t: torch.Tensor) -> int:
    """Bytes of t's pages the kernel holds in memory (mincore)."""
    start = t.data_ptr() // PAGE * PAGE
    end = -(-(t.data_ptr() + t.numel() * t.element_size()) // PAGE) * PAGE
    vec = (ctypes.c_ubyte * ((end - start) // PAGE))()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) == 0
    return sum(v & 1 for v in vec) * PAGE


def zero_infinity_store(tmp_path, monkeypatch) -> tuple[list, int, GroupStore]:
    """A one-layer model's groups, their element count and a zero-infinity SSD store over them."""
    monkeypatch.setattr(ZeroInfinity, "PARAM_BUFFER_SIZE", 1 << 16)  # a small parameter pool: not under test
    shape = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    groups = make_groups(skeleton(shape))
    store = GroupStore(groups, "ssd", ZeroInfinity(), torch.bfloat16, torch.device("cpu"), tmp_path, in_flight=4)
    return groups, sum(g.numel for g in groups), store


def test_zero_infinity_reads_parameters_from_the_host_copy_not_the_ssd(tmp_path):
    tiny = make_tiny(tmp_path / "model")
    r = run(cfg(tiny, tmp_path, offload="ssd", host_memory="zero-infinity", steps=2))
    groups = make_groups(skeleton(ModelConfig.from_dir(tiny)))
    n = sum(g.numel for g in groups)
    # Only fp32 master and moments cross the SSD: read and written each step (12n), plus the initial write.
    # The bf16 copies are neither read (forward, backward) nor written (after the optimizer step).
    reads, writes = 2 * 12 * n, 3 * 12 * n
    assert reads <= r.ssd["bytes_read"] <= reads * 1.05
    assert writes <= r.ssd["bytes_written"] <= writes * 1.05
    assert r.host_memory["pools"]["parameter copy (flat)"] == 2 * n == r.host_memory["planned"]["parameter copy (flat)"]
    memascend = run(cfg(tiny, tmp_path / "ma", offload="ssd", host_memory="memascend", steps=2))
    assert "parameter copy (flat)" not in memascend.host_memory["pools"]
    # memascend's head reads its matrix in row blocks with an online log-sum-exp (vocab.py): other rounding
    assert memascend.losses == pytest.approx(r.losses, rel=1e-5)
    # sub_group_size tuned down: the same arithmetic and SSD traffic through smaller optimizer slots
    tuned = run(cfg(tiny, tmp_path / "zt", offload="ssd", host_memory="zero-infinity-tuned", steps=2))
    assert tuned.losses == r.losses
    assert tuned.ssd["bytes_read"] == r.ssd["bytes_read"] and tuned.ssd["bytes_written"] == r.ssd["bytes_written"]
    slots = {k: v for k, v in tuned.host_memory["pools"].items() if "optimizer" in k or "moments" in k}
    assert slots and all(v < r.host_memory["pools"][k] for k, v in slots.items()), (slots, r.host_memory["pools"])


def test_host_copy_is_resident_once_written(tmp_path, monkeypatch):
    groups, n, store = zero_infinity_store(tmp_path, monkeypatch)
    try:
        copy = store._param_copy
        assert copy is not None and copy.numel() == n
        assert store.pools["parameter copy (flat)"] == 2 * n
        before_pages, before_rss = resident(copy), rss_bytes()
        assert before_pages < 0.1 * 2 * n  # allocated, not yet touched
        for gi, g in enumerate(groups):
            store.write_group(gi, torch.full((g.numel,), 0.5))
        assert resident(copy) >= 2 * n - PAGE
        assert rss_bytes() - before_rss >= 0.9 * 2 * n  # the process grew by the copy
        assert bool((copy == 0.5).all())
        weights, slot = store.fetch(1)
        assert slot is None and weights.data_ptr() == copy[store.offsets[1]].data_ptr()  # read in place
    finally:
        store.close()


def test_zero_infinity_first_step_takes_fresh_moments_of_a_sub_group(tmp_path, monkeypatch):
    """DeepSpeed's cpu_adam creates both moments of the whole sub-group (the model, below 1e9 elements) on
    its first step; the design does too: the process peak (VmHWM) rises by them at step 1, not at step 2."""
    from memfit.memory.measure import peak_rss_bytes, reset_peak_rss
    from memfit.train.finetune.optim import AdamW

    groups, n, store = zero_infinity_store(tmp_path, monkeypatch)
    try:
        for gi, g in enumerate(groups):
            store.write_group(gi, torch.full((g.numel,), 0.5))
        store.grad_buffer.fill_(1e-3)
        rises = []
        for step in (1, 2):
            if not reset_peak_rss():
                import pytest

                pytest.skip("this kernel cannot reset the peak RSS")
            before = rss_bytes()
            store.optimizer_step(AdamW(lr=1e-3), step, 1.0)
            rises.append(peak_rss_bytes() - before)
        moments = 8 * store.piece
        assert store.piece >= n and store.pools["first-step Adam moments (transient)"] == moments
        assert rises[0] >= 0.9 * moments and rises[1] < 0.3 * moments
        # the fresh moments reached the SSD: step 2 read them back and updated them
        m = store.read_group(1)["exp_avg"]
        assert torch.allclose(m, torch.full_like(m, 0.9 * 0.1 * 1e-3 + 0.1 * 1e-3), rtol=1e-5)  # m2 = 0.9 m1 + 0.1 g
    finally:
        store.close()
