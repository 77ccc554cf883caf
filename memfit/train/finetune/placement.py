"""Tier-aware placement of the fine-tuner's host-memory state (Liaw and Chen, arXiv 2507.03305).

Every host tensor the trainer holds belongs to a group, ranked by how much the step's time depends on the
latency of the memory it sits in:

| priority | group | why |
|---|---|---|
| 1 latency-critical | optimizer moments | read and written by the CPU optimizer every step |
| 2 latency-critical | master gradients | read by the overflow check and the optimizer |
| 3 latency-critical | master weights | read and written by the optimizer |
| 4 latency-tolerant | compute weights | streamed to the compute layer by layer (a bulk copy, prefetched) |
| 5 latency-tolerant | activation checkpoints | written once, read once per step (`--grad-checkpointing host`) |
| 6 latency-tolerant | compute gradients | not held in host memory here: accumulated into the master gradients |

Policies:
- `local-only`: everything on the local node (DRAM-only: the reference);
- `interleave`: every tensor striped page by page over the local and the slow nodes (naive interleaving, as
  `numactl --interleave` gives a whole process);
- `latency-first`: groups in priority order onto the local node while the local budget lasts (a tensor that
  straddles the budget is split at a page: its head local, its tail on the slow tier); the rest striped
  over the slow nodes (every CXL device, so their bandwidths add up).

Placement changes where bytes live, never what is computed: the losses are those of `local-only`, bit for bit.
"""
from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memfit.memory.budget import parse_bytes
from memfit.memory.cxl_model import default_model
from memfit.memory.numa import PAGE
from memfit.memory.tiers import Tier, TierSystem, numastat

log = logging.getLogger(__name__)
POLICIES = ("local-only", "interleave", "latency-first")
GROUPS = ("optimizer moments", "master gradients", "master weights", "compute weights", "activation checkpoints",
          "compute gradients")
KIND_GROUP = {"exp_avg": "optimizer moments", "exp_avg_sq": "optimizer moments", "grad": "master gradients",
              "master": "master weights", "param": "compute weights"}
# Memory traffic of one AdamW update per element and tensor (bytes): moments and master read and written,
# the gradient read, the compute copy written.
UPDATE_TRAFFIC = {"exp_avg": 8, "exp_avg_sq": 8, "master": 8, "grad": 4}


class PlacementError(ValueError):
    """A placement setting that cannot be used; the message says which and why."""


@dataclass
class PlacementConfig:
    policy: str = "local-only"
    local_budget: str | int | None = None  # bytes, "8GiB", or "50%" of the placed state
    backend: str = "auto"  # auto | libnuma | plain | simulated
    local_node: int | None = None
    slow_nodes: Sequence[int] | None = None
    simulated_cxl: int = 1
    simulated_local_bytes: int | None = None  # the simulated local node's size (default: the real node's)

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise PlacementError(f"--placement must be one of {', '.join(POLICIES)} (got {self.policy!r})")
        if self.policy != "latency-first" and self.local_budget is not None:
            raise PlacementError(f"--local-budget applies to --placement latency-first only (not {self.policy})")
        if self.policy == "latency-first" and self.local_budget is None:
            raise PlacementError("--placement latency-first needs --local-budget (bytes, e.g. 8GiB, or a share "
                                 "of the state, e.g. 50%)")


def parse_budget(text: str | int, state_bytes: int) -> int:
    """`--local-budget`: a byte count ("8GiB", 1073741824) or a percentage of the placed state ("50%")."""
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            pct = float(text.strip()[:-1])
        except ValueError:
            raise PlacementError(f"--local-budget: not a percentage: {text!r}") from None
        if not 0 <= pct <= 100:
            raise PlacementError(f"--local-budget: a percentage must be within 0-100% (got {text})")
        return int(state_bytes * pct / 100)
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise PlacementError(f"--local-budget: {exc}") from None


Key = tuple[str, int]  # (kind, group index); the gradient buffer is ("grad", -1)


class Placement:
    """The plan for every persistent host tensor, made before any is allocated, and the allocator for them."""

    def __init__(self, cfg: PlacementConfig, items: list[tuple[Key, int]], pin: bool = False) -> None:
        """`items`: (key, bytes) of every persistent tensor to place (any order: ranked here)."""
        cfg.validate()
        self.cfg = cfg
        self.state_bytes = sum(n for _, n in items)
        self.budget = None if cfg.local_budget is None else parse_budget(cfg.local_budget, self.state_bytes)
        self.system = TierSystem.open(cfg.backend, cfg.local_node, cfg.slow_nodes, cfg.simulated_cxl,
                                      self.budget, pin=pin, simulated_local_bytes=cfg.simulated_local_bytes)
        self.warnings = list(self.system.warnings)
        local, slow = self.system.local, self.system.slow
        if cfg.policy != "local-only" and slow is None:
            self._warn(f"--placement {cfg.policy}: this machine has no CXL or remote NUMA node besides node "
                       f"{local.nodes[0]}, so every group stays local (--tier-backend simulated models CXL tiers)")
        order = sorted(items, key=lambda kv: (GROUPS.index(KIND_GROUP[kv[0][0]]), kv[0][1], kv[0][0]))
        self.plan: dict[Key, list[tuple[int, Tier]]] = {}
        left = self.budget if self.budget is not None else 0
        for key, n in order:
            self.plan[key] = self._place(n, left)
            left -= sum(b for b, t in self.plan[key] if t is local)
        self._transient_left = left  # what latency-first leaves local for the step's checkpoints
        self._left_now, self._slow_now, self._ckpt_now = left, 0, {}
        self.checkpoint_slow_bytes = 0  # most checkpoint bytes on the slow tier in one step
        self.checkpoint_peak: dict[int, int] = {}  # node -> checkpoint bytes of the step that held the most

    def _warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)

    def _place(self, n: int, left: int) -> list[tuple[int, Tier]]:
        local, slow, policy = self.system.local, self.system.slow, self.cfg.policy
        if policy == "local-only" or slow is None:
            return [(n, local)]
        if policy == "interleave":
            return [(n, Tier("interleave", local.nodes + slow.nodes))]
        if left >= n:
            return [(n, local)]
        head = max(left, 0) // PAGE * PAGE
        return [(head, local), (n - head, slow)] if head else [(n, slow)]

    def tensor(self, key: Key, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The planned tensor for `key` (uninitialised)."""
        return self.system.allocate(numel, dtype, self.plan[key], KIND_GROUP[key[0]])

    def new_step(self) -> None:
        self._left_now, self._slow_now, self._ckpt_now = self._transient_left, 0, {}

    def checkpoint(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A host activation checkpoint, placed by the policy with what the budget has left this step."""
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        segs = self._place(nbytes, self._left_now)
        self._left_now -= sum(b for b, t in segs if t is self.system.local)
        self._slow_now += sum(b for b, t in segs if t is not self.system.local)
        self.checkpoint_slow_bytes = max(self.checkpoint_slow_bytes, self._slow_now)
        for b, t in segs:
            for node in t.nodes:
                self._ckpt_now[node] = self._ckpt_now.get(node, 0) + b // len(t.nodes)
        if sum(self._ckpt_now.values()) > sum(self.checkpoint_peak.values()):
            self.checkpoint_peak = dict(self._ckpt_now)
        return self.system.allocate(shape, dtype, segs, "activation checkpoints", record=False)

    # -- the report ----------------------------------------------------------------------------------------
    def report(self) -> dict:
        groups = self.system.report()
        if self.checkpoint_peak:
            groups["activation checkpoints"] = {
                "bytes": sum(self.checkpoint_peak.values()), "measured": {}, "measured_bytes": 0,
                "planned": {str(k): v for k, v in sorted(self.checkpoint_peak.items())},
                "note": "the step that held the most; freed as the backward uses them, so where they were is the plan's"}
        groups.setdefault("compute gradients", {"bytes": 0, "planned": {}, "measured": {}, "measured_bytes": 0,
                                                "note": "not held in host memory: accumulated into the master "
                                                        "gradients as each layer's backward ends"})
        real = self.system.backend != "simulated"
        out = dict(self.system.describe(), policy=self.cfg.policy, state_bytes=self.state_bytes,
                   local_budget_bytes=self.budget, warnings=self.warnings,
                   source="get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR) on touched pages" if real and any(
                       g["measured"] for g in groups.values()) else
                   ("policy (simulated nodes)" if not real else "policy (no libnuma to read pages back)"),
                   groups=groups)
        out["numastat"] = numastat(groups, "measured" if real else "planned")
        return out

    def modelled_optimizer_seconds(self, numels: Sequence[int], compute_itemsize: int) -> dict[str, float]:
        """The fitted CXL cost model's optimizer-step time for this plan and for local-only, on the measured
        hardware (memfit.memory.cxl_model): {"policy": s, "local_only": s, "ratio": policy / local-only}."""
        model = default_model()
        names = {self.system.local.nodes[0]: "local"}
        if self.system.slow is not None:
            names.update({n: f"cxl:{i}" for i, n in enumerate(self.system.slow.nodes)})
        working = float(sum(numels))
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        policy = local_only = 0.0
        for gi, n in enumerate(numels):
            traffic: dict[str, float] = {}
            kinds = dict(UPDATE_TRAFFIC, param=compute_itemsize) if ("param", gi) in self.plan else UPDATE_TRAFFIC
            for kind, per_element in kinds.items():
                stored = compute_itemsize if kind == "param" else 4
                key = ("grad", -1) if kind == "grad" else (kind, gi)
                lo = offsets[gi] * 4 if kind == "grad" else 0
                for node, b in _bytes_on_nodes(self.plan[key], lo, lo + n * stored).items():
                    name = names.get(node, "cxl")
                    traffic[name] = traffic.get(name, 0.0) + b * per_element / stored
            policy += model.traffic_seconds(n, traffic, working)
            local_only += model.traffic_seconds(n, {"local": sum(traffic.values())}, working)
        return {"policy": policy, "local_only": local_only, "ratio": policy / local_only if local_only else 1.0}


def modelled_times(placement: Placement, numels: Sequence[int], compute_itemsize: int, optimizer_seconds: float,
                   step_seconds: float, compute_reads: int) -> dict:
    """What the fitted cost model says this run's times would be with its slow tier on the CXL hardware the
    model was fitted to. The memory of a simulated run is physically local, so its measured times are
    local-only's on this machine; the model supplies the slowdown:

    - optimizer step: measured x modelled(policy) / modelled(local-only), for this plan and state size;
    - end to end: the step's other time as measured, plus that optimizer step, plus the latency-tolerant
      bytes on the slow tier (compute weights read `compute_reads` times a step, checkpoints written and read
      once) streamed at this machine's optimizer bandwidth scaled by the fitted CXL/local ratio.
    """
    model = default_model()
    opt = placement.modelled_optimizer_seconds(numels, compute_itemsize)
    local = placement.system.local
    weights_slow = sum(slow_bytes(segs, local) for (kind, _), segs in placement.plan.items()
                       if kind == ("param" if compute_itemsize else "master"))
    streamed = weights_slow * compute_reads + 2 * placement.checkpoint_slow_bytes
    traffic = sum(numels) * (sum(UPDATE_TRAFFIC.values()) + compute_itemsize)
    devices = len(placement.system.slow.nodes) if placement.system.slow is not None else 1
    return {"modelled": True, "cost_model": model.to_json(),
            "optimizer_step_seconds_on_fitted_hardware": {"policy": opt["policy"], "local_only": opt["local_only"]},
            "optimizer_slowdown": opt["ratio"], "slow_tier_stream_bytes_per_step": streamed,
            "optimizer_traffic_bytes": traffic, "slow_devices": devices,
            **scale_times(opt["ratio"], streamed, traffic, optimizer_seconds, step_seconds, devices)}


def placement_report(placement: Placement | None, numels: Sequence[int], compute_itemsize: int, recompute: bool,
                     seconds: list[float], opt_seconds: list[float]) -> dict | None:
    """A run's `placement` result: where each group landed; on simulated tiers also what the fitted model says
    the times would be (modelled_times), from the run's step and optimizer times after the first step."""
    if placement is None:
        return None
    out = placement.report()
    if placement.system.modelled and seconds and opt_seconds:
        timed = seconds[1:] or seconds  # the first step pays the pages' first touch
        opt = opt_seconds[1:] or opt_seconds
        reads = 2 if recompute else 1  # forward, and again for the backward's recompute
        out["modelled_times"] = modelled_times(placement, numels, compute_itemsize, statistics.median(opt),
                                               statistics.median(timed), reads)
    return out


def scale_times(slowdown: float, streamed: float, traffic: float, optimizer_seconds: float, step_seconds: float,
                slow_devices: int = 1) -> dict[str, float]:
    """Local-only times measured on this machine -> modelled times of a placement (see modelled_times): the
    optimizer step slowed by the model's ratio; the step plus the slow tier's share of streaming, at this
    machine's optimizer bandwidth (traffic / seconds) times the fitted CXL/local ratio per slow device."""
    model = default_model()
    local_bw = traffic / optimizer_seconds if optimizer_seconds > 0 else float("inf")
    slow_bw = local_bw * slow_devices * model.cxl.bandwidth_bytes_per_s / model.local.bandwidth_bytes_per_s
    extra = max(streamed / slow_bw - streamed / local_bw, 0.0) if streamed else 0.0
    optimizer = optimizer_seconds * slowdown
    return {"optimizer_step_seconds": optimizer, "step_seconds": step_seconds - optimizer_seconds + optimizer + extra}


def _bytes_on_nodes(segments: list[tuple[int, Tier]], lo: int, hi: int) -> dict[int, float]:
    """Bytes of [lo, hi) of an allocation laid out as `segments`, per node (striped segments split evenly)."""
    out: dict[int, float] = {}
    start = 0
    for n, tier in segments:
        a, b = max(lo, start), min(hi, start + n)
        if b > a:
            for node in tier.nodes:
                out[node] = out.get(node, 0.0) + (b - a) / len(tier.nodes)
        start += n
    return out


def slow_bytes(segments: list[tuple[int, Tier]], local: Tier) -> float:
    """Bytes of an allocation off the local node (a striped segment's share on its other nodes)."""
    return sum(n * sum(1 for x in t.nodes if x not in local.nodes) / len(t.nodes) for n, t in segments)
