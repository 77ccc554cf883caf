"""The group's collectives and messages on one rank, on each backend the engine picks: gloo on the CPU, NCCL on
CUDA (skipped without a GPU; at N = 1, the only size a one-GPU machine can check)."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.parallel.group import free_port, init_group


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_one_rank_group_on_each_backend(device):
    group = init_group(0, 1, torch.device(device, 0) if device == "cuda" else torch.device("cpu"),
                       f"tcp://127.0.0.1:{free_port()}")
    try:
        import torch.distributed as dist

        assert dist.get_backend() == ("nccl" if device == "cuda" else "gloo")
        x = torch.arange(6, dtype=torch.float32, device=group.device).view(2, 3)
        assert torch.equal(group.all_reduce(x.clone()), x)  # a sum over one rank
        assert torch.equal(group.all_gather_last(x), x)  # (S, Vp) x 1 rank -> (S, Vp)
        assert group.agree_min(1234) == 1234
        group.send({"step": 1})  # rank 0 broadcasts to itself: the message path runs end to end
        assert group.dead_workers() == []
    finally:
        group.shutdown()
    assert not dist.is_initialized()
