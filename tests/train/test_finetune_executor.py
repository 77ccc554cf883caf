"""The executor's gradient accumulation: the same bits as `add_`, without `add_`'s whole-size float32 cast of
a 16-bit gradient (PyTorch's allocator events, AllocatorMeter)."""
from __future__ import annotations

import torch

from memfit.memory.allocator import AllocatorMeter
from memfit.train.finetune.executor import ADD_BLOCK, _add_into


def test_blocked_accumulation_equals_add_and_holds_one_block():
    n = 3 * ADD_BLOCK + 12345  # a 16-bit gradient of ~3.1M elements
    src = torch.randn(n).bfloat16()
    base = torch.randn(n)
    want, got = base.clone(), base.clone()
    with AllocatorMeter() as whole:
        want.add_(src)
    with AllocatorMeter() as blocked:
        _add_into(got, src)
    assert torch.equal(got, want)
    assert whole.peak_bytes >= 4 * n  # add_ casts the whole bf16 input to a float32 temporary
    assert blocked.peak_bytes <= 4 * ADD_BLOCK + 4096  # one block's cast at a time
