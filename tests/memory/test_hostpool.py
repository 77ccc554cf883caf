"""Host buffers and slot pools."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from memfit.memory.hostpool import SlotPool, aligned_buffer, caching_pinned_buffer, next_pow2


def test_aligned_buffer_is_aligned_exact_and_usable():
    hb = aligned_buffer(10_000)
    assert hb.tensor.data_ptr() % 4096 == 0
    assert hb.reserved_bytes == 12_288 and hb.tensor.numel() == 12_288
    hb.tensor.fill_(7)
    assert int(hb.tensor.sum()) == 7 * 12_288


def test_caching_pinned_rounds_only_where_pinned():
    hb = caching_pinned_buffer(3 << 20)
    expected = next_pow2(3 << 20) if torch.cuda.is_available() else 3 << 20
    assert hb.reserved_bytes == expected and hb.tensor.numel() == 3 << 20
    assert next_pow2(5) == 8 and next_pow2(8) == 8


def test_size_classes_pick_the_smallest_fitting_slot():
    pool = SlotPool("p", {8192: 1, 65536: 2})
    a = pool.acquire(5000)
    assert a.numel() == 5000 and a.data_ptr() % 4096 == 0
    b = pool.acquire(5000)  # the small slot is taken: a large one serves
    assert pool.in_use_bytes == 8192 + 65536
    pool.release(a)
    pool.release(b)
    assert pool.in_use_bytes == 0 and pool.peak_in_use_bytes == 8192 + 65536 and pool.peak_in_use_slots == 2
    with pytest.raises(MemoryError, match="largest slot"):
        pool.acquire(100_000)


def test_acquire_waits_for_a_release():
    pool = SlotPool("p", {4096: 1})
    held = pool.acquire(4096)
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(100)))
    t.start()
    time.sleep(0.05)
    assert not got  # still waiting
    pool.release(held)
    t.join(timeout=5)
    assert got and got[0].numel() == 100
