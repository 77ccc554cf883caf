"""A worker's ledger under tensor parallelism holds its share of speculative verification (rank.reserve_verification):
the gathered logits' term is what PyTorch's allocator holds for a vocab-parallel head's pass on a real (one-rank,
gloo) group; the reservation is made on workers of speculative engines only, and refused with the figures a user
needs where it does not fit."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memfit.llm.engine.config import EngineConfig
from memfit.llm.models.config import ModelConfig
from memfit.llm.parallel.group import free_port, init_group
from memfit.llm.parallel.rank import VERIFY_OWNER, reserve_verification, verification_bytes
from memfit.llm.parallel.shard import GatheredLogits, shard_config
from memfit.memory.allocator import AllocatorMeter
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded


def _cfg() -> ModelConfig:
    from memfit.llm.models.loader import resolve_model_path

    return ModelConfig.from_dir(resolve_model_path("memfit-tiny"))


def test_the_logits_term_is_what_a_gathered_head_allocates():
    """One rank's (S, Vp) head output, the gathered blocks and their concatenation: S x Vp x (1 + 2 world)."""
    cfg = _cfg()
    rows, vp = 5, cfg.vocab_size  # a chain of g = 4 for one sequence, world 1
    group = init_group(0, 1, torch.device("cpu"), f"tcp://127.0.0.1:{free_port()}")
    try:
        head = GatheredLogits(nn.Linear(cfg.hidden_size, vp, bias=False), cfg.vocab_size, group)
        hidden = torch.randn(rows, cfg.hidden_size)
        with torch.inference_mode():
            head(hidden)  # warm
            with AllocatorMeter() as meter:
                head(hidden)
    finally:
        group.shutdown()
    config = EngineConfig(model="memfit-tiny", speculative_model="memfit-tiny-draft", num_speculative_tokens=rows - 1,
                          max_num_seqs=1)
    assert verification_bytes(cfg, 1, config, 256, torch.float32) == meter.peak_bytes == rows * vp * 3 * 4


def test_workers_of_speculative_engines_reserve_it():
    cfg = shard_config(_cfg(), 2)
    tree = EngineConfig(model="memfit-tiny", speculative_model="memfit-tiny-draft", speculative_tree=(3, 2),
                        max_num_seqs=4)
    worker = SimpleNamespace(world=2, rank=1, is_driver=False)
    ledger = MemoryBudget(64 << 20)
    got = reserve_verification(ledger, cfg, tree, 512, torch.float32, worker)
    nodes = 3 * 2 + 1
    # 4 sequences of 7 nodes: logits (28 rows x this rank's Vp x 5 blocks x 4 B) and each tree's masks
    assert got == 4 * 7 * cfg.vocab_size * 5 * 4 + 4 * (nodes * nodes + nodes * (512 + nodes))
    assert ledger.by_owner()[VERIFY_OWNER] == got
    driver = SimpleNamespace(world=2, rank=0, is_driver=True)
    plain = EngineConfig(model="memfit-tiny", max_num_seqs=4)
    assert reserve_verification(MemoryBudget(1 << 20), cfg, tree, 512, torch.float32, driver) == 0  # draft.py's
    assert reserve_verification(MemoryBudget(1 << 20), cfg, plain, 512, torch.float32, worker) == 0
    assert reserve_verification(MemoryBudget(1 << 20), cfg, tree, 512, torch.float32, None) == 0
    with pytest.raises(MemoryBudgetExceeded, match="rank 1: speculative verification needs"):
        reserve_verification(MemoryBudget(got - 1), cfg, tree, 512, torch.float32, worker)
