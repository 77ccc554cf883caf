"""Memory tiers: tensors allocated on chosen NUMA nodes (local DRAM, CXL expanders, a remote socket).

`TierSystem.open(backend)` picks how tiers become memory:

- `libnuma`: real placement (memfit.memory.numa: mmap + mbind before first touch); the report reads back
  each page's node with get_mempolicy;
- `plain`: ordinary aligned host allocations, no policy (the kernel's first touch decides);
- `simulated`: CXL nodes that exist only in software: the memory is plain (local), the bytes are booked to
  virtual nodes, and times come from memfit.memory.cxl_model, labelled *modelled*.

`allocate(shape, dtype, tier)` takes one `Tier` (its nodes: one = bound there, several = striped over them)
or a list of (bytes, Tier) segments laid out back to back in one allocation. Requests the machine cannot
honour (libnuma missing, a node that does not exist, a local budget larger than the local node) do not
stop a run: they fall back to `plain` with a warning that says why, kept in `warnings` for the report.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memfit.memory import numa
from memfit.memory.budget import format_bytes
from memfit.memory.hostpool import aligned_buffer
from memfit.memory.mapping import round_up

log = logging.getLogger(__name__)
BACKENDS = ("auto", "libnuma", "plain", "simulated")


@dataclass(frozen=True)
class Tier:
    name: str  # "local", "cxl" (a CPU-less node), "remote" (another socket's DRAM)
    nodes: tuple[int, ...]  # bound to one; striped page by page over several


Segments = Sequence[tuple[int, Tier]]


@dataclass
class _Record:
    label: str
    nbytes: int
    planned: dict[int, int]  # node -> bytes the policy put there
    addr: int | None
    ref: weakref.ref | None


@dataclass
class TierSystem:
    backend: str  # libnuma | plain | simulated (after any fall-back)
    local: Tier
    slow: Tier | None  # where latency-tolerant bytes go: CXL candidates, else a remote node; None: no such node
    node_bytes: dict[int, int]  # node -> MemTotal (simulated nodes: unbounded, -1)
    simulated_nodes: tuple[int, ...] = ()
    warnings: list[str] = field(default_factory=list)
    pin: bool = False
    _records: list[_Record] = field(default_factory=list)

    @classmethod
    def open(cls, backend: str = "auto", local_node: int | None = None, slow_nodes: Sequence[int] | None = None,
             simulated_cxl: int = 1, local_budget: int | None = None, sysfs: Path = numa.SYSFS_NODES,
             pin: bool = False, simulated_local_bytes: int | None = None) -> TierSystem:
        """`simulated_local_bytes`: the simulated machine's local-node size (default: the real node's), for
        modelling placements larger than this machine (plans only: nothing that size is allocated)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown tier backend {backend!r}; choose {', '.join(BACKENDS)}")
        if simulated_cxl < 1:
            raise ValueError(f"simulated CXL nodes must be at least 1 (got {simulated_cxl})")
        nodes = numa.read_nodes(sysfs)
        by_id = {n.id: n for n in nodes}
        warnings: list[str] = []
        lib = numa.libnuma() if backend in ("auto", "libnuma") else None
        if backend in ("auto", "libnuma") and lib is None:
            warnings.append(f"libnuma ({numa.LIBNUMA_NAME}) is not installed or the kernel has no NUMA support: "
                            "placing with plain allocations (install the libnuma1 package for real placement)")
            backend = "plain"
        elif backend == "auto":
            backend = "libnuma"
        local = numa.current_node(nodes) if local_node is None else local_node
        missing = [n for n in [local, *(slow_nodes or [])] if n not in by_id]
        if missing:
            warnings.append(f"NUMA node(s) {', '.join(map(str, missing))} do not exist (this machine has "
                            f"{', '.join(str(n.id) for n in nodes)}): placing with plain allocations")
            backend, local, slow_nodes = "plain", numa.current_node(nodes), None
        if backend == "libnuma":
            refused = _mbind_refused(local)
            if refused:
                warnings.append(f"mbind is refused here ({refused}; a container's seccomp profile can do "
                                "this): placing with plain allocations")
                backend = "plain"
        total = by_id[local].total_bytes
        if backend == "simulated" and simulated_local_bytes is not None:
            total = simulated_local_bytes
        if local_budget is not None and total and local_budget > total:
            warnings.append(f"local budget {format_bytes(local_budget)} is larger than node {local} "
                            f"({format_bytes(total)}): placing with plain allocations")
            backend = "plain"
        node_bytes = {n.id: n.total_bytes for n in nodes}
        sim: tuple[int, ...] = ()
        if backend == "simulated":
            node_bytes[local] = total
            first = max(node_bytes) + 1
            sim = tuple(range(first, first + simulated_cxl))
            node_bytes.update({s: -1 for s in sim})
            slow: Tier | None = Tier("cxl", sim)
        elif slow_nodes:
            kind = "cxl" if all(by_id[n].cxl_candidate for n in slow_nodes) else "remote"
            slow = Tier(kind, tuple(sorted(set(slow_nodes))))
        else:
            cxl = [n for n in numa.cxl_candidates(nodes) if n != local]
            remote = [n.id for n in nodes if n.id != local and n.total_bytes > 0]
            slow = Tier("cxl", tuple(cxl)) if cxl else Tier("remote", tuple(remote)) if remote else None
        for w in warnings:
            log.warning("%s", w)
        return cls(backend, Tier("local", (local,)), slow, node_bytes, sim, warnings, pin)

    @property
    def modelled(self) -> bool:
        return self.backend == "simulated"

    def allocate(self, shape: Sequence[int] | int, dtype: torch.dtype, tier: Tier | Segments,
                 label: str = "", record: bool = True) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `dtype` whose bytes lie on `tier` (or on each segment's tier
        in turn: every segment but the last a whole number of pages). `record`: list it in `report()` (not
        for short-lived tensors, whose records would pile up)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        segments = [(nbytes, tier)] if isinstance(tier, Tier) else [(int(n), t) for n, t in tier if n > 0]
        if sum(n for n, _ in segments) != nbytes:
            raise ValueError(f"segments hold {sum(n for n, _ in segments)} bytes, the tensor {nbytes}")
        planned: dict[int, int] = {}
        for n, t in segments:
            for node in t.nodes:
                planned[node] = planned.get(node, 0) + n // len(t.nodes)
        addr = None
        if self.backend == "libnuma" and nbytes:
            flat, addr = numa.map_on_nodes([(n, t.nodes) for n, t in segments], pin=self.pin)
        else:
            flat = aligned_buffer(nbytes, pin=self.pin).tensor[:nbytes]
            if numa.libnuma() is not None and nbytes:
                addr = flat.data_ptr()
        out = flat.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
        if record:
            self._records.append(_Record(label, nbytes, planned, addr, weakref.ref(out) if addr else None))
        return out

    def report(self) -> dict:
        """Per label: bytes, bytes per node the policy planned, and (real backends, live tensors) bytes per
        node read back from the pages with get_mempolicy."""
        groups: dict[str, dict] = {}
        for r in self._records:
            g = groups.setdefault(r.label, {"bytes": 0, "planned": {}, "measured": {}, "measured_bytes": 0})
            g["bytes"] += r.nbytes
            for node, n in r.planned.items():
                g["planned"][node] = g["planned"].get(node, 0) + n
            if r.addr is not None and r.ref is not None and r.ref() is not None and self.backend != "simulated":
                for node, n in numa.pages_by_node(r.addr, r.nbytes).items():
                    g["measured"][node] = g["measured"].get(node, 0) + n
                g["measured_bytes"] += r.nbytes
        for g in groups.values():
            g["planned"] = {str(k): v for k, v in sorted(g["planned"].items())}
            g["measured"] = {str(k): v for k, v in sorted(g["measured"].items())}
        return groups

    def describe(self) -> dict:
        return {"backend": self.backend, "modelled": self.modelled, "local_node": self.local.nodes[0],
                "slow_tier": None if self.slow is None else {"kind": self.slow.name, "nodes": list(self.slow.nodes)},
                "simulated_nodes": list(self.simulated_nodes), "warnings": list(self.warnings),
                "node_bytes": {str(k): v for k, v in self.node_bytes.items()}}


def _mbind_refused(node: int) -> str | None:
    """Why binding one page to `node` fails, or None when it works (libnuma can load where the syscall is
    filtered)."""
    try:
        numa.map_on_nodes([(numa.PAGE, [node])])
    except (numa.NumaError, MemoryError) as exc:
        return str(exc)
    return None


def numastat(groups: dict[str, dict], key: str = "measured") -> str:
    """A `numastat -p`-style table: one row per group, MiB per node, and the total."""
    nodes = sorted({int(n) for g in groups.values() for n in (g[key] or g["planned"])})
    head = f"{'group':<28}" + "".join(f"{'node ' + str(n):>12}" for n in nodes) + f"{'total':>12}"
    lines = [head, "-" * len(head)]
    for name, g in groups.items():
        per = g[key] or g["planned"]
        lines.append(f"{name:<28}" + "".join(f"{per.get(str(n), 0) / 2**20:>12.2f}" for n in nodes)
                     + f"{g['bytes'] / 2**20:>12.2f}")
    return "\n".join(lines)


def page_align(nbytes: int) -> int:
    return round_up(nbytes, numa.PAGE)


_DEFAULT: TierSystem | None = None


def allocate(shape: Sequence[int] | int, dtype: torch.dtype, tier: Tier | Segments,
             system: TierSystem | None = None, label: str = "") -> torch.Tensor:
    """`system.allocate(...)`; without a system, one opened with the `auto` backend (libnuma where present)."""
    global _DEFAULT
    if system is None:
        if _DEFAULT is None:
            _DEFAULT = TierSystem.open("auto")
        system = _DEFAULT
    return system.allocate(shape, dtype, tier, label)
