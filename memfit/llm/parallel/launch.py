"""Starting the ranks of a tensor-parallel engine: `join` is the one call `LLMEngine.__init__` makes.

See group.py for the two ways ranks start (spawned by rank 0, or torchrun) and how they talk.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from memfit.llm.parallel import group as tp
from memfit.llm.parallel.group import RankFailed, TPGroup, init_group, rank_device, under_torchrun
from memfit.llm.parallel.shard import check_divisible
from memfit.llm.parallel.worker import serve_steps, spawned_worker


def join(config: Any, engine_class: Callable[..., Any]) -> TPGroup | None:
    """The tensor-parallel group of an engine being built with `config` (None when tensor_parallel_size is 1).

    In a spawned worker the group exists already. Under torchrun, ranks above 0 never return: they build their
    shard of the engine, serve rank 0's steps and exit. Otherwise this process is rank 0 and spawns the rest."""
    world = config.tensor_parallel_size
    if world == 1:
        return None
    if tp.current() is not None:
        return tp.current()
    check_divisible(config.model, world)  # before any process starts: a clear error, not N stack traces
    if under_torchrun():
        env_world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if env_world != world:
            raise ValueError(f"torchrun started {env_world} processes but tensor_parallel_size is {world}: "
                             "they must be equal (--nproc-per-node x --nnodes = --tensor-parallel-size)")
        device = rank_device(config.device, int(os.environ.get("LOCAL_RANK", rank)))
        group = init_group(rank, world, device, "env://")
        if rank == 0:
            return group
        serve_steps(engine_class, config)
        raise SystemExit(0)
    return _spawn(config, engine_class, world)


def _spawn(config: Any, engine_class: Callable[..., Any], world: int) -> TPGroup:
    import torch.multiprocessing as mp

    init_method = f"tcp://127.0.0.1:{tp.free_port()}"
    ctx = mp.get_context("spawn")
    procs, started = [], []
    for rank in range(1, world):
        ready = ctx.Event()  # set once the child runs memfit's code (it has survived re-importing __main__)
        # daemon: a worker never outlives the engine's process, even one that exits without close()
        p = ctx.Process(target=spawned_worker, args=(engine_class, config, rank, world, init_method, ready),
                        name=f"memfit-tp{rank}", daemon=True)
        p.start()
        procs.append(p)
        started.append(ready)
    try:
        _wait_started(procs, started)
        group = init_group(0, world, rank_device(config.device, 0), init_method)
    except Exception as exc:
        for p in procs:
            p.kill()
        if isinstance(exc, RankFailed):
            raise
        raise RankFailed(f"the tensor-parallel workers did not join ({exc}); see their errors above") from exc
    group.procs = procs
    return group


def _wait_started(procs: list, started: list) -> None:
    """Wait until every child has started, failing at once (not after the rendezvous timeout) if one exits."""
    while not all(e.wait(timeout=0.05) for e in started):
        for rank, p in enumerate(procs, start=1):
            if p.exitcode is not None:
                raise RankFailed(
                    f"tensor-parallel worker rank {rank} exited with code {p.exitcode} before it started. Workers are "
                    "spawned, which imports the main script again: a script that builds an engine with "
                    "tensor_parallel_size > 1 must do it under `if __name__ == \"__main__\":`")
