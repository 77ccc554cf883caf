"""context_batch padded to a multiple of pad_to: few distinct attention shapes, same valid contents."""
import pytest
import torch

from memfit.llm.kv import create_kv_cache
from memfit.llm.kv.base import SeqStep
from memfit.memory.budget import MemoryBudget
from tests.llm.kv.test_virtual import LAYOUT, kv_for, write


@pytest.mark.parametrize("kind", ["virtual", "paged"])
def test_padded_context_keeps_contents_and_caps_at_max_len(kind):
    opts = {"block_size": 4} if kind == "paged" else {"max_seqs": 4}
    cache = create_kv_cache(kind, LAYOUT, MemoryBudget(2**22), **opts)
    for sid, n in ((1, 13), (2, 20)):
        assert cache.try_allocate(sid, n)
        write(cache, [SeqStep(sid, 0, n)])
    steps = [SeqStep(1, 13, 0), SeqStep(2, 20, 0)]  # read-only plans
    plain = cache.plan_step(steps)
    padded = cache.plan_step(steps, pad_to=16)
    for layer in range(LAYOUT.num_layers):
        k0, v0 = cache.context_batch(layer, plain)
        k1, v1 = cache.context_batch(layer, padded)
        assert k0.shape[1] == 20 and k1.shape[1] == 32  # 20 rounded up to a multiple of 16
        for i, (sid, n) in enumerate(((1, 13), (2, 20))):
            expect_k, expect_v = kv_for(sid, 0, n, layer)
            assert torch.equal(k1[i, :n], expect_k) and torch.equal(v1[i, :n], expect_v)
        assert torch.isfinite(k1).all() and torch.isfinite(v1).all()  # padding must not poison masked softmax
    capped = cache.plan_step(steps, pad_to=1000)
    assert cache.context_batch(0, capped)[0].shape[1] == LAYOUT.max_seq_len
    cache.close()
