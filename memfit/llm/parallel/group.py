"""The tensor-parallel process group: who the ranks are, how they start, how they talk, and how a dead one is noticed.

Two ways to start N ranks, both ending in one `TPGroup` per process:
- `LLMEngine(tensor_parallel_size=N)` in a plain process: that process is rank 0; it spawns N-1 workers
  (torch.multiprocessing, start method "spawn": a fork would copy a half-initialised torch) that meet it on a
  free loopback port;
- under `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR set, one or several nodes): every process runs the same
  script; rank 0 becomes the engine, the others run the worker loop inside `LLMEngine.__init__` and exit when
  rank 0 shuts down.

Two process groups:
- data: the model's collectives (all-reduce after o_proj / down_proj, the embedding's all-reduce, the logits'
  all-gather). NCCL on CUDA, gloo on the CPU, chosen at run time; a bounded timeout, so a peer that stops
  answering fails the step instead of hanging it.
- control (always gloo, on the CPU): rank 0 broadcasts each step's plan (a pickled `StepMessage`) to the workers.
  Workers wait on it for as long as the engine idles (a server may sit idle for hours), so its timeout is long;
  a rank 0 that dies closes the sockets and the workers' wait fails at once.

A worker that dies (killed, out of memory) is noticed by rank 0 through the child's sentinel before each step and
after any failed collective: `RankFailed` says which rank and how it ended.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DATA_TIMEOUT_S = float(os.environ.get("MEMFIT_TP_TIMEOUT_S", "120"))  # a collective that waits longer fails
CONTROL_TIMEOUT_S = 7 * 24 * 3600.0  # workers wait this long for rank 0's next step (an idle server)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot go on with a missing shard."""

    fatal = True  # the server stops taking requests (server/async_engine.py)


@dataclass
class TPGroup:
    rank: int
    world: int
    device: torch.device
    data: Any = None  # the data process group (None: the default group)
    control: Any = None  # the gloo group rank 0's step messages travel on
    procs: list = field(default_factory=list)  # rank 0 in spawn mode: the workers' Process objects
    closed: bool = False

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ---- collectives the sharded model calls ------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (row-parallel outputs, the vocab-parallel embedding)."""
        dist.all_reduce(t, group=self.data)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """(S, Vp) per rank -> (S, world * Vp), the ranks' blocks side by side in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.data)
        return torch.cat(parts, dim=-1)

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's `value` (on the control group: CPU ints whatever the device)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    # ---- rank 0's step messages ----------------------------------------------------------------------
    def send(self, message: object) -> None:
        """Rank 0: hand `message` to every worker (None tells them to stop). Waits at most DATA_TIMEOUT_S for
        them to take it: a worker that stopped answering fails the step instead of hanging it."""
        self.check_alive()
        payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)  # (nbytes,)
        try:
            for t in (torch.tensor([payload.numel()], dtype=torch.int64), payload):
                work = dist.broadcast(t, src=0, group=self.control, async_op=True)
                work.wait(timeout=datetime.timedelta(seconds=DATA_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 (gloo raises RuntimeError or DistBackendError)
            raise self.failure(exc) from exc

    def recv(self) -> object:
        """A worker: the next message from rank 0 (waits as long as the engine idles)."""
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.control)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(payload, src=0, group=self.control)
        return pickle.loads(payload.numpy().tobytes())  # noqa: S301: from rank 0 of this engine, over loopback/cluster

    # ---- failures --------------------------------------------------------------------------------------
    def dead_workers(self) -> list[str]:
        return [f"rank {i + 1} (pid {p.pid}) exited with code {p.exitcode}"
                for i, p in enumerate(self.procs) if p.exitcode is not None]

    def check_alive(self) -> None:
        dead = self.dead_workers()
        if dead:
            raise RankFailed(f"tensor-parallel worker {', '.join(dead)}; the engine holds only its own shard "
                             "of the model and cannot continue: restart it")

    def failure(self, exc: BaseException) -> RankFailed:
        """The error to raise for a failed collective: which rank died, when rank 0 can tell."""
        dead = self.dead_workers()
        what = f"worker {', '.join(dead)}" if dead else f"step failed: a rank stopped answering (timeout {DATA_TIMEOUT_S:g} s)"
        detail = (str(exc).splitlines() or [""])[0][:160]
        return RankFailed(f"tensor-parallel {what} [{type(exc).__name__}: {detail}]; the engine cannot continue "
                          "with a missing shard: restart it")

    def shutdown(self) -> None:
        """Rank 0: tell the workers to stop, wait for them, tear the groups down. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.is_driver and not self.dead_workers():
            try:
                self.send(None)
            except RankFailed as exc:
                log.warning("%s", exc)
        for p in self.procs:
            p.join(timeout=30)
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()
        _set_current(None)


_CURRENT: TPGroup | None = None  # the group this process belongs to, once joined


def _set_current(group: TPGroup | None) -> None:
    global _CURRENT
    _CURRENT = group


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def free_port() -> int:
    """A free TCP port on the loopback interface (bound and released; the ranks rendezvous on it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str, local_rank: int) -> torch.device:
    """Each rank's device: cuda:<local rank> for an auto/cuda engine on a GPU machine, else the CPU."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if device == "auto":
        return torch.device("cpu")
    return torch.device(device)


def init_group(rank: int, world: int, device: torch.device, init_method: str) -> TPGroup:
    """Join the data and control groups (blocking until all `world` ranks have)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=DATA_TIMEOUT_S))
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
    group = TPGroup(rank, world, device, data=None, control=control)
    _set_current(group)
    return group


def current() -> TPGroup | None:
    """The group this process has joined, if any."""
    return _CURRENT
