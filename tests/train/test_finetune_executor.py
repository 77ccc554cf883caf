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


def test_embedding_backward_adds_autograds_gradient_without_the_dense_matrix(tmp_path, monkeypatch):
    """Unit 0's backward (no autograd, no fetch): the embedding group's fp32 gradient gains exactly what adding
    autograd's dense (V, C) bf16 gradient would give (recomputed here from the same output gradient), while
    PyTorch's allocator (its own events) never holds a quarter of that dense matrix; and the step fetches the
    embedding once, for the forward only."""
    import torch.nn.functional as F

    from memfit.train.finetune import executor as ex
    from memfit.train.finetune.store import GroupStore
    from tests.train.test_finetune import cfg, make_tiny, run

    model = make_tiny(tmp_path / "m")
    seen = {}
    real_backward, real_fetch = ex.StepExecutor._embedding_backward, GroupStore.fetch
    fetched: list[int] = []

    def spy(self, batch, grad, tied_rows=None):
        shape = dict(self.groups[0].params)["model.embed_tokens.weight"]
        before = self.store.grad(0).clone()
        with AllocatorMeter() as meter:
            real_backward(self, batch, grad, tied_rows)
        w = torch.zeros(shape, dtype=grad.dtype, requires_grad=True)
        F.embedding(batch.ids.reshape(-1), w).backward(grad)
        want = before.view(shape).clone()
        _add_into(want.view(-1), w.grad.reshape(-1))  # what the autograd path added
        seen.update(equal=torch.equal(self.store.grad(0).view(shape), want), peak=meter.peak_bytes,
                    dense=w.grad.numel() * w.grad.element_size())

    def count(self, gi):
        fetched.append(gi)
        return real_fetch(self, gi)

    from memfit.train.finetune.designs import MemAscend

    monkeypatch.setattr(MemAscend, "blockwise_gradients", False)  # the path that adds into the buffer
    monkeypatch.setattr(MemAscend, "vocab_blocks", False)  # whole groups fetched (blocks: test_finetune_vocab.py)
    monkeypatch.setattr(ex.StepExecutor, "_embedding_backward", spy)
    monkeypatch.setattr(GroupStore, "fetch", count)
    result = run(cfg(model, tmp_path, steps=1, offload="ssd", host_memory="memascend", dtype="bfloat16"))
    assert len(result.losses) == 1
    assert seen["equal"]
    assert seen["peak"] < seen["dense"] / 4, seen  # 4096 x 64 bf16 = 512 KiB dense; the rows of ~100 tokens
    n_groups = 4  # embed, 2 layers, head
    assert fetched.count(0) == 1 and len(fetched) == n_groups + (n_groups - 2)  # layers twice, embed and head once
