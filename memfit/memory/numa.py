"""NUMA nodes as the kernel shows them, and memory bound to them through libnuma.

Topology comes from sysfs (`/sys/devices/system/node/node<N>/{cpulist,meminfo}`). A node with memory and
no CPUs is what a CXL memory expander (or an HBM/PMEM tier) looks like to Linux, so it is reported as a
CXL candidate.

Placement is done the way `numa_alloc_onnode` and `numa_alloc_interleaved_subset` do it, but with several
policies inside one allocation: an anonymous `mmap`, then `mbind` on page-aligned ranges *before the first
touch* (a range bound to one node is MPOL_BIND; to several, MPOL_INTERLEAVE, which stripes pages
round-robin over them). Pages commit where their range's policy says when they are first written. The
mapping is unmapped when the last tensor that views it goes (MappingOwner, as the host arenas do).

Where pages really are is read back page by page with `get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`, what
`numastat -p` sums per node; only touched pages are meaningful there (an untouched page reads as the zero
page's node), so callers query after writing.

libnuma (Debian/Ubuntu package libnuma1) is loaded lazily through ctypes; `libnuma()` is None without it and
callers fall back to plain allocations.
"""
from __future__ import annotations

import ctypes
import errno
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from memfit.memory.mapping import MappingOwner, VirtualMemoryError, get_libc, round_up

SYSFS_NODES = Path("/sys/devices/system/node")
LIBNUMA_NAME = "libnuma.so.1"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MPOL_BIND, MPOL_INTERLEAVE = 2, 3
MPOL_F_NODE, MPOL_F_ADDR = 1, 2
_PROT_RW = 0x1 | 0x2
_MAP_PRIVATE_ANON = 0x02 | 0x20


class NumaError(OSError):
    """A NUMA request the machine cannot honour (no such node, mbind refused, ...)."""


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    total_bytes: int
    free_bytes: int

    @property
    def cxl_candidate(self) -> bool:
        """Memory and no CPUs: how a CXL expander appears (also HBM or PMEM in some modes)."""
        return not self.cpus and self.total_bytes > 0


def _parse_cpulist(text: str) -> tuple[int, ...]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _meminfo(path: Path) -> dict[str, int]:
    """`Node N MemTotal:  123 kB` lines -> {"MemTotal": bytes, ...}."""
    out = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 4 and words[2].endswith(":"):
            try:
                out[words[2][:-1]] = int(words[3]) * (1024 if len(words) > 4 and words[4] == "kB" else 1)
            except ValueError:
                continue
    return out


def read_nodes(root: Path = SYSFS_NODES) -> list[NumaNode]:
    """The machine's NUMA nodes from sysfs (a kernel without NUMA: one node 0 holding all memory and CPUs)."""
    nodes = []
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = _parse_cpulist((d / "cpulist").read_text())
        except OSError:
            cpus = ()
        mem = _meminfo(d / "meminfo")
        nodes.append(NumaNode(int(d.name[4:]), cpus, mem.get("MemTotal", 0), mem.get("MemFree", 0)))
    if not nodes:
        pages, free = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        nodes.append(NumaNode(0, tuple(range(os.cpu_count() or 1)), pages * PAGE, free * PAGE))
    return nodes


def cxl_candidates(nodes: Sequence[NumaNode]) -> list[int]:
    return [n.id for n in nodes if n.cxl_candidate]


def current_node(nodes: Sequence[NumaNode]) -> int:
    """The node of the CPU this thread runs on (the first node with CPUs when that cannot be told)."""
    try:
        cpu = get_libc().sched_getcpu()
    except AttributeError:
        cpu = -1
    for n in nodes:
        if cpu in n.cpus:
            return n.id
    return next((n.id for n in nodes if n.cpus), nodes[0].id if nodes else 0)


# ---- libnuma -----------------------------------------------------------------------------------------------
_lib: ctypes.CDLL | None = None
_lib_tried: str | None = None


def libnuma() -> ctypes.CDLL | None:
    """libnuma through ctypes, or None where it is not installed or the kernel has no NUMA support."""
    global _lib, _lib_tried
    if _lib_tried == LIBNUMA_NAME:
        return _lib
    _lib_tried, _lib = LIBNUMA_NAME, None
    try:
        lib = ctypes.CDLL(LIBNUMA_NAME, use_errno=True)
    except OSError:
        return None
    lib.numa_available.restype = ctypes.c_int
    if lib.numa_available() < 0:
        return None
    lib.mbind.restype = ctypes.c_long
    lib.mbind.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.POINTER(ctypes.c_ulong),
                          ctypes.c_ulong, ctypes.c_uint]
    lib.get_mempolicy.restype = ctypes.c_long
    lib.get_mempolicy.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_ulong), ctypes.c_ulong,
                                  ctypes.c_void_p, ctypes.c_ulong]
    _lib = lib
    return lib


def _nodemask(nodes: Sequence[int]) -> tuple[ctypes.Array, int]:
    words = max(nodes) // 64 + 1
    mask = (ctypes.c_ulong * words)()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    return mask, words * 64 + 1  # the kernel reads maxnode - 1 bits


def bind(lib: ctypes.CDLL, addr: int, nbytes: int, nodes: Sequence[int]) -> None:
    """mbind [addr, addr + nbytes) (page-aligned) to one node (MPOL_BIND) or striped over several
    (MPOL_INTERLEAVE). Must run before the range is touched: already committed pages are not moved."""
    mode = MPOL_BIND if len(nodes) == 1 else MPOL_INTERLEAVE  # [n, n]: interleave over {n} (tests use it)
    nodes = sorted(set(nodes))
    if nbytes <= 0 or not nodes:
        return
    mask, maxnode = _nodemask(nodes)
    if lib.mbind(addr, nbytes, mode, mask, maxnode, 0) != 0:
        err = ctypes.get_errno()
        raise NumaError(err, f"mbind of {nbytes} bytes to node(s) {list(nodes)} failed "
                             f"({errno.errorcode.get(err, err)}: {os.strerror(err)})")


def map_on_nodes(segments: Sequence[tuple[int, Sequence[int]]], lib: ctypes.CDLL | None = None,
                 pin: bool = False) -> tuple[torch.Tensor, int]:
    """One anonymous mapping whose consecutive ranges follow `segments` [(bytes, nodes), ...]; each range but
    the last is a whole number of pages. Returns ((total,) uint8 tensor, address); nothing is touched.
    `pin`: page-lock the mapping for CUDA in place (cudaHostRegister), as memfit.memory.hostpool does."""
    lib = lib or libnuma()
    if lib is None:
        raise NumaError(errno.ENOSYS, f"{LIBNUMA_NAME} is not available")
    total = sum(n for n, _ in segments)
    size = round_up(max(total, 1), PAGE)
    c = get_libc()
    addr = c.mmap(None, size, _PROT_RW, _MAP_PRIVATE_ANON, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise VirtualMemoryError(f"mmap of {size} bytes failed ({errno.errorcode.get(err, err)})")
    addr = int(addr)
    try:
        off = 0
        for i, (n, nodes) in enumerate(segments):
            span = size - off if i == len(segments) - 1 else n
            if span % PAGE and i != len(segments) - 1:
                raise ValueError(f"segment {i} of {n} bytes is not a whole number of {PAGE}-byte pages")
            bind(lib, addr + off, span, nodes)
            off += n
        if pin:
            err = torch.cuda.cudart().cudaHostRegister(addr, size, 0)
            if int(err) != 0:
                raise MemoryError(f"cudaHostRegister of {size} bytes failed ({err})")
    except BaseException:
        c.munmap(addr, size)
        raise

    def release() -> None:
        if pin:
            torch.cuda.cudart().cudaHostUnregister(addr)
        get_libc().munmap(addr, size)

    owner = MappingOwner(release)
    buf = (ctypes.c_uint8 * size).from_address(addr)
    buf._memfit_owner = owner  # type: ignore[attr-defined]  # tensor -> buf -> owner: unmapped with the last view
    return torch.frombuffer(buf, dtype=torch.uint8)[:total], addr


def pages_by_node(addr: int, nbytes: int, max_samples: int = 1024, lib: ctypes.CDLL | None = None) -> dict[int, int]:
    """Bytes of [addr, addr + nbytes) per node, from get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR) on its pages
    (at most `max_samples` pages, evenly spaced, each standing for its share of the range). Touched pages
    only: an untouched one reports where the kernel would fault it in."""
    lib = lib or libnuma()
    if lib is None or nbytes <= 0:
        return {}
    first = addr // PAGE * PAGE
    pages = (addr + nbytes - first + PAGE - 1) // PAGE
    step = max(1, pages // max_samples)
    picks = range(0, pages, step)
    counts: Counter[int] = Counter()
    node = ctypes.c_int(-1)
    for p in picks:
        if lib.get_mempolicy(ctypes.byref(node), None, 0, first + p * PAGE, MPOL_F_NODE | MPOL_F_ADDR) != 0:
            err = ctypes.get_errno()
            raise NumaError(err, f"get_mempolicy failed ({errno.errorcode.get(err, err)})")
        counts[node.value] += 1
    n = sum(counts.values())
    return {k: round(nbytes * v / n) for k, v in sorted(counts.items())}


def policy_of(addr: int, lib: ctypes.CDLL | None = None) -> tuple[int, list[int]]:
    """(mode, nodes) of the policy governing the page at addr (get_mempolicy with MPOL_F_ADDR)."""
    lib = lib or libnuma()
    if lib is None:
        raise NumaError(errno.ENOSYS, f"{LIBNUMA_NAME} is not available")
    mode = ctypes.c_int(-1)
    mask, maxnode = _nodemask([1023])
    if lib.get_mempolicy(ctypes.byref(mode), mask, maxnode, addr, MPOL_F_ADDR) != 0:
        err = ctypes.get_errno()
        raise NumaError(err, f"get_mempolicy failed ({errno.errorcode.get(err, err)})")
    nodes = [w * 64 + b for w in range(len(mask)) for b in range(64) if mask[w] >> b & 1]
    return mode.value, nodes
