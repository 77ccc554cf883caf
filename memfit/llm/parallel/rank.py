"""This process's part of a tensor-parallel engine, as `LLMEngine.__init__` wires it (docs/parallel.md).

Each call takes the rank's group `tp` (from launch.join; None for a single-process engine, and then the call
does what a plain engine does), so the engine's constructor reads as one path for both:
- `set_threads`: the ranks on one CPU machine share its cores;
- `model_config`, `load`, `parallelize`, `kv_heads`: a rank holds its shard of the model (H/N heads, Hkv/N KV
  heads, I/N MLP columns, V/N vocab rows) and of the KV cache;
- `agree_kv_share`, `mirror_kv`, `make_runner`: rank 0 decides (scheduler, KV manager) and sends each step to
  the workers, which replay its KV decisions in caches of the same size and run their shard.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.llm.engine.config import EngineConfig
from memfit.llm.engine.runner import ModelRunner
from memfit.llm.kv.base import KVCacheManager
from memfit.llm.models.config import ModelConfig
from memfit.llm.models.loader import load_model
from memfit.llm.parallel import shard
from memfit.llm.parallel.group import TPGroup
from memfit.llm.parallel.mirror import DriverRunner, RecordingKV, ShardRunner
from memfit.memory.budget import MemoryBudget, MemoryBudgetExceeded, format_bytes

__all__ = ["agree_kv_share", "kv_heads", "load", "make_runner", "mirror_kv", "model_config", "parallelize",
           "reserve_verification", "set_threads", "verification_bytes"]

VERIFY_OWNER = "spec_verify"  # a worker's share of speculative verification, in its own ledger


def set_threads(config: EngineConfig, tp: TPGroup | None) -> None:
    """torch's intra-op threads: `config.threads`, or on a CPU under TP each rank's share of the cores."""
    if config.threads is None and tp is not None and tp.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.world))  # the ranks share the cores
    if config.threads is not None:
        if config.threads < 1:
            raise ValueError(f"threads must be at least 1, got {config.threads}")
        torch.set_num_threads(config.threads)


def model_config(stored: ModelConfig, tp: TPGroup | None) -> ModelConfig:
    """The model as this rank holds it (its share of the heads, MLP columns and vocab rows under TP)."""
    return stored if tp is None else shard.shard_config(stored, tp.world)


def load(path: str | Path, dtype: torch.dtype, device: torch.device, tp: TPGroup | None) -> tuple[Any, ModelConfig]:
    """(model, its config): the whole model, or this rank's shard of it."""
    if tp is None:
        return load_model(path, dtype=dtype, device=device)
    return shard.load_shard(path, dtype, device, tp.rank, tp.world)


def parallelize(model: Any, tp: TPGroup | None, vocab: int) -> None:
    """Under TP, the shard's layers all-reduce their partial outputs (after `prepare_model` packed them)."""
    if tp is not None:
        shard.parallelize(model, tp, vocab)


def kv_heads(mc: ModelConfig, tp: TPGroup | None) -> int:
    """The KV heads this rank's cache holds."""
    return mc.num_key_value_heads // (tp.world if tp is not None else 1)


def agree_kv_share(nbytes: int, tp: TPGroup | None) -> int:
    """Every rank's cache must make rank 0's decisions: the smallest share for all."""
    return nbytes if tp is None else tp.agree_min(nbytes)


def mirror_kv(kv: KVCacheManager, tp: TPGroup | None) -> KVCacheManager:
    """The KV manager the scheduler and swap tier use: on rank 0 under TP, one that logs its decisions for the
    workers to replay (parallel/mirror.py)."""
    if tp is not None and tp.is_driver:
        return RecordingKV(kv)  # type: ignore[return-value]
    return kv


def make_runner(model: nn.Module, kv: KVCacheManager, shard_kv: KVCacheManager, device: torch.device,
                tp: TPGroup | None, backends: Any) -> Any:
    """The step runner: a plain ModelRunner (with the C++ decode stack where it can run); under TP, rank 0's
    DriverRunner sends each step to the workers (no C++ stack: it cannot all-reduce mid-layer), and a worker's
    ShardRunner runs its shard. `kv` is the manager the scheduler uses, `shard_kv` the cache itself."""
    if tp is None:
        runner = ModelRunner(model, kv, device)  # type: ignore[arg-type]
        runner.stack = backends.decode_stack(model, kv)  # whole decode steps in one C++ call
        return runner
    if tp.is_driver:
        return DriverRunner(ModelRunner(model, shard_kv, device), kv, tp)  # type: ignore[arg-type]
    return ShardRunner(model, shard_kv, device)  # type: ignore[arg-type]


def verification_bytes(shard: ModelConfig, world: int, config: EngineConfig, max_model_len: int,
                       dtype: torch.dtype) -> int:
    """What a worker holds for rank 0's speculative verification passes (parallel/mirror.py: ShardRunner.run_message),
    beyond the step its ledger already reserves: for `config.max_num_seqs` sequences of R rows each (a chain's g + 1,
    a W,D tree's W x D + 1 nodes, the larger where both can run),
    - the logits: its (S, Vp) shard of the head, the `world` (S, Vp) blocks all-gathered and their (S, world x Vp)
      concatenation (group.all_gather_last), all alive at once: S x Vp x (1 + 2 world) in the model's dtype;
    - a tree's masks (engine/spec_tree_forward.py): each sequence's ancestor mask (R x R bool) and its attention mask
      over the context (R x (context + R) bool).
    Rank 0 reserves its own (the draft's buffers, engine/draft.py); its workers never load the draft."""
    batch = config.max_num_seqs
    chain = (config.num_speculative_tokens or 1) + 1
    tree = config.speculative_tree
    nodes = tree[0] * tree[1] + 1 if isinstance(tree, tuple) else 0
    rows = max(chain, nodes)
    logits = batch * rows * shard.vocab_size * (1 + 2 * world) * dtype.itemsize
    masks = batch * (nodes * nodes + nodes * (max_model_len + nodes))
    return logits + masks


def reserve_verification(ledger: MemoryBudget, shard: ModelConfig, config: EngineConfig, max_model_len: int,
                         dtype: torch.dtype, tp: TPGroup | None) -> int:
    """On a worker of a speculative engine, reserve `verification_bytes` in its ledger (before its KV share is
    computed, so the share all ranks agree on leaves room for it); 0 elsewhere. Returns the bytes reserved."""
    if tp is None or tp.is_driver or not config.speculative_model:
        return 0
    nbytes = verification_bytes(shard, tp.world, config, max_model_len, dtype)
    if not ledger.try_reserve(nbytes, VERIFY_OWNER):
        raise MemoryBudgetExceeded(
            f"tensor-parallel rank {tp.rank}: speculative verification needs {format_bytes(nbytes)} (the gathered "
            f"logits{' and the tree masks' if config.speculative_tree else ''} of {config.max_num_seqs} sequences) but "
            f"the memory budget has {format_bytes(ledger.available_bytes)} left after the model; raise --memory-budget "
            "or lower --max-num-seqs / --num-speculative-tokens / --speculative-tree")
    return nbytes
