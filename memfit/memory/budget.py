"""Memory budgets: one ledger per memory tier, so every allocation of note is counted in one place.

A `MemoryBudget` does not allocate anything itself. Components that hold memory (KV caches, host pools,
offload buffers) `reserve` bytes before they commit physical memory and `release` them after, and the
budget refuses a reservation that would exceed its limit with `MemoryBudgetExceeded`. That is what lets the
scheduler admit, queue or preempt requests *before* the process runs out of memory.
"""
from __future__ import annotations

import math

import re
import threading
from dataclasses import dataclass, field
from enum import Enum

import psutil


class Tier(str, Enum):
    DEVICE = "device"  # accelerator memory (CUDA), or the CPU's RAM when the model runs on the CPU
    HOST = "host"  # host DRAM (pinned or pageable)
    CXL = "cxl"  # CXL-attached memory node (a NUMA node without CPUs)
    SSD = "ssd"  # NVMe / file-backed


class MemoryBudgetExceeded(MemoryError):
    """A reservation would take a budget past its limit. `request_id` names the request it stops, where one
    does (the engine sets it; a server fails that request alone)."""

    def __init__(self, message: str = "", request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """Parse a byte count such as ``4096``, ``"512MiB"``, ``"1.5 GiB"`` or ``"2GB"`` (SI for kB/MB/GB)."""
    if isinstance(text, bool):
        raise ValueError(f"not a byte size: {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = _SIZE_RE.match(text)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"not a byte size: {text!r}; use a number of bytes or a number with a unit "
                "(B, KiB, MiB, GiB, TiB, or kB, MB, GB, TB)"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    if not math.isfinite(value):
        raise ValueError(f"not a byte size: {text!r} is not a finite number")
    nbytes = int(value * _UNITS[unit])
    if nbytes < 0:
        raise ValueError(f"a byte size cannot be negative: {text!r}")
    return nbytes


def parse_swap_space(spec: str | int | float) -> int:
    """A swap tier's size: a byte string ("8GiB", "512MiB"), or a bare number meaning GiB, as vLLM's
    --swap-space (4, "4", 0.5). Raises ValueError for anything else or for zero."""
    if isinstance(spec, bool):
        raise ValueError(f"not a swap size: {spec!r}")
    if isinstance(spec, str) and _SIZE_RE.match(spec) and _SIZE_RE.match(spec).group(2) == "":  # type: ignore[union-attr]
        spec = float(spec)
    if isinstance(spec, float) and not math.isfinite(spec):
        raise ValueError(f"not a swap size: {spec!r} is not a finite number")
    nbytes = int(spec * 1024**3) if isinstance(spec, (int, float)) else parse_bytes(spec)
    if nbytes <= 0:
        raise ValueError(f"a swap space must be positive, got {spec!r}")
    return nbytes


def format_bytes(nbytes: float) -> str:
    """Human-readable binary size, e.g. ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def available_memory(tier: Tier | str = Tier.HOST, device: str | None = None) -> int:
    """Bytes that could be used now on a tier: free CUDA memory for a CUDA device, else available RAM."""
    tier = Tier(tier)
    if tier is Tier.DEVICE and device is not None and str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return int(psutil.virtual_memory().available)


def parse_budget(spec: int | float | str) -> int | float:
    """Parse a budget as the user wrote it: bytes (``"2GiB"``, ``2_000_000``, ``"4096"``) give an int; a
    fraction of the memory available (``0.3``, ``"0.3"``, ``"1.0"``, ``"30%"``) gives a float in (0, 1].

    One rule for every command and API: a number with a decimal point or a percent sign is a fraction, a
    whole number or a number with a unit is bytes. Raises ValueError, saying which forms are accepted."""
    if isinstance(spec, bool):
        raise ValueError(f"not a memory budget: {spec!r}")
    if isinstance(spec, str):
        text = spec.strip()
        if text.endswith("%"):
            try:
                spec = float(text[:-1]) / 100
            except ValueError:
                raise ValueError(f"not a memory budget: {spec!r}; a percentage looks like '30%'") from None
        elif _SIZE_RE.match(text) and _SIZE_RE.match(text).group(2) == "" and ("." in text or "e" in text.lower()):  # type: ignore[union-attr]
            spec = float(text)
    if isinstance(spec, float):
        if not 0 < spec <= 1:
            raise ValueError(
                f"a memory budget fraction must be in (0, 1], got {spec!r}; give bytes with a unit (e.g. '2GiB') "
                "or a fraction of the available memory (e.g. 0.3 or '30%')"
            )
        return spec
    nbytes = parse_bytes(spec)
    if nbytes == 0:
        raise ValueError("a memory budget must be positive; give bytes (e.g. '2GiB') or a fraction in (0, 1]")
    return nbytes


def resolve_budget(spec: int | float | str, tier: Tier | str = Tier.HOST, device: str | None = None) -> int:
    """Turn a budget (see `parse_budget`: bytes, or a fraction of the memory available now) into bytes."""
    value = parse_budget(spec)
    if isinstance(value, float):
        return max(1, int(value * available_memory(tier, device)))
    return value


@dataclass
class MemoryBudget:
    """A byte ledger for one tier. Thread-safe: a background prefault thread may reserve while the
    engine releases.

    `parent`: a budget this one is a share of (e.g. the KV cache's cap inside the engine's whole-process
    ledger). A reservation must fit both, and is recorded in both (in the parent under this budget's `name`),
    so the parent's figures always cover its shares'."""

    limit_bytes: int
    tier: Tier = Tier.DEVICE
    name: str = "budget"
    parent: MemoryBudget | None = None
    _used: int = field(default=0, init=False, repr=False)
    _peak: int = field(default=0, init=False, repr=False)
    _by_owner: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.limit_bytes <= 0:
            raise ValueError(f"{self.name}: limit must be positive, got {self.limit_bytes}")
        self.tier = Tier(self.tier)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def peak_bytes(self) -> int:
        return self._peak

    @property
    def available_bytes(self) -> int:
        return self.limit_bytes - self._used

    def by_owner(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_owner)

    def try_reserve(self, nbytes: int, owner: str = "anon") -> bool:
        """Reserve `nbytes` for `owner` if they fit; return whether they did."""
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative size ({nbytes})")
        with self._lock:
            if self._used + nbytes > self.limit_bytes:
                return False
            if self.parent is not None and not self.parent.try_reserve(nbytes, self.name):
                return False
            self._used += nbytes
            self._peak = max(self._peak, self._used)
            self._by_owner[owner] = self._by_owner.get(owner, 0) + nbytes
            return True

    @property
    def free_bytes(self) -> int:
        """What a reservation could take now: this budget's room, and its parents' room."""
        free = self.available_bytes
        return free if self.parent is None else min(free, self.parent.free_bytes)

    def reserve(self, nbytes: int, owner: str = "anon") -> None:
        """Reserve or raise `MemoryBudgetExceeded` with the figures a user needs."""
        if not self.try_reserve(nbytes, owner):
            short = self if self.available_bytes < nbytes or self.parent is None else self.parent
            raise MemoryBudgetExceeded(
                f"{short.name} ({short.tier.value}): {owner} needs {format_bytes(nbytes)} more but only "
                f"{format_bytes(short.available_bytes)} of {format_bytes(short.limit_bytes)} is free; "
                "raise the budget or lower the load"
            )

    def transfer(self, nbytes: int, src: str, dst: str) -> None:
        """Move `nbytes` of `src`'s reservation to `dst` in one step: the bytes stay reserved throughout, so no other
        owner can take them between (a release then a reserve could lose them); the totals, and the parent's, are
        unchanged. ValueError if `src` holds less."""
        if nbytes < 0:
            raise ValueError(f"cannot transfer a negative size ({nbytes})")
        with self._lock:
            held = self._by_owner.get(src, 0)
            if nbytes > held:
                raise ValueError(f"{self.name}: {src} transfers {nbytes} bytes but holds only {held}")
            self._by_owner[src] = held - nbytes
            self._by_owner[dst] = self._by_owner.get(dst, 0) + nbytes

    def release(self, nbytes: int, owner: str = "anon") -> None:
        if nbytes < 0:
            raise ValueError(f"cannot release a negative size ({nbytes})")
        with self._lock:
            held = self._by_owner.get(owner, 0)
            if nbytes > held:
                raise ValueError(f"{self.name}: {owner} releases {nbytes} bytes but holds only {held}")
            self._by_owner[owner] = held - nbytes
            self._used -= nbytes
            if self.parent is not None:
                self.parent.release(nbytes, self.name)
