"""A worker rank's life: build its shard of the engine, then run rank 0's steps until told to stop.

The worker builds the same `LLMEngine` as rank 0 (the class is passed in, so this module does not import the
engine that imports it): its own shard of the weights, its own KV cache of Hkv/N heads and its own memory ledger.
Its scheduler stays idle; rank 0's decides.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from memfit.llm.parallel.group import current, init_group, rank_device
from memfit.llm.parallel.mirror import StepMessage, replay

log = logging.getLogger(__name__)


def serve_steps(engine_class: Callable[..., Any], config: Any) -> None:
    """Build this rank's engine (the group is joined already) and run steps until rank 0 sends None."""
    group = current()
    assert group is not None and group.rank > 0
    engine = engine_class(config)
    try:
        while True:
            msg = group.recv()
            if msg is None:
                break
            assert isinstance(msg, StepMessage)
            replay(engine.kv, msg.ops, group.rank)
            if msg.seqs or msg.chunks is not None or msg.trees is not None:
                engine.runner.run_message(msg)
    finally:
        engine.close()
        group.closed = True
        # Tear the process group down before the interpreter does: left to exit, gloo's threads were sometimes
        # destroyed still joinable ("terminate called without an active exception", SIGABRT) and torchrun then
        # failed the whole job after rank 0 had finished (tests/llm/parallel/test_launch.py, ~1 run in 4).
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawned_worker(engine_class: Callable[..., Any], config: Any, rank: int, world: int, init_method: str,
                   started: Any = None) -> None:
    """The target of rank 0's spawned processes; `started` (an Event) tells rank 0 it got this far."""
    if started is not None:
        started.set()
    try:
        init_group(rank, world, rank_device(config.device, rank), init_method)
        serve_steps(engine_class, config)
    except Exception as exc:  # noqa: BLE001: the message is the worker's last word; rank 0 sees the exit code
        print(f"memfit tensor-parallel rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
