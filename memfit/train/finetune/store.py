"""Where the trained state lives: per swap group, the fp32 master weights, Adam's two moments and the
16-bit compute copy, in one of three tiers; the fp32 gradients in host memory, flat or streamed
(grad_store.py).

- `none`: plain tensors on the compute device;
- `host`: buffers from the design's host allocator (pinned on CUDA); fetched to the device per group;
- `ssd`: swap space from the design (extents or files) and, in host memory, the design's two swap pools:
  compute copies are read into the parameter pool, master and moments into the optimizer pool; a design
  whose `host_param_copy` is true (zero-infinity, as ZeRO-3 below max_in_cpu) instead keeps the compute
  copies in one flat host buffer, read in place and refreshed by the optimizer step, never on the SSD.

Bytes per parameter in the tier: 4 (master) + 4 + 4 (moments) + 2 (compute copy; none when computing in
fp32, where the master itself is used); plus the fp32 gradients in host memory: 4 per parameter in one flat
whole-model buffer, as ZeRO-3's offloaded `grad_partitions_flat_buffer`, so the overflow check and the
optimizer read it in place; or, streamed (gradients.py), one buffer laid out for the groups live at once,
each group updated by AdamW as soon as the backward completes its gradient (`grad_done`).
The optimizer step (AdamW over the groups, in their tier) is store_update.py's.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from memfit.memory.aio import wait
from memfit.memory.hostpool import IO_ALIGN, SlotPool
from memfit.memory.mapping import round_up
from memfit.train.finetune.designs import HostMemoryDesign
from memfit.train.finetune.grad_store import GradientsMixin
from memfit.train.finetune.gradients import StreamedLayout
from memfit.train.finetune.placement import Placement
from memfit.train.finetune.store_update import UpdateMixin
from memfit.train.finetune.units import Group
from memfit.train.finetune.vocab import SpanReads

TIERS = ("none", "host", "ssd")
KINDS = ("master", "exp_avg", "exp_avg_sq")


class GroupStore(UpdateMixin, GradientsMixin, SpanReads):
    def __init__(self, groups: list[Group], tier: str, design: HostMemoryDesign, compute_dtype: torch.dtype,
                 device: torch.device, ssd_dir: Path | None = None, in_flight: int = 4,
                 placement: Placement | None = None, streamed: StreamedLayout | None = None) -> None:
        if tier not in TIERS:
            raise ValueError(f"unknown --offload {tier!r}; choose none, host or ssd")
        if placement is not None and (tier == "ssd" or (tier == "none" and device.type != "cpu")):
            raise ValueError("--placement places state held in host memory: use --offload host, or --offload "
                             "none on a CPU device")
        self.placement = placement
        self.groups, self.tier, self.design = groups, tier, design
        self.dtype, self.device = compute_dtype, device
        self.itemsize = torch.empty((), dtype=compute_dtype).element_size()
        self.separate_copy = compute_dtype != torch.float32  # fp32 compute reads the master directly
        self.pools: dict[str, int] = {}  # pool name -> bytes it holds in host memory
        total = sum(g.numel for g in groups)
        self.offsets = [0]
        for g in groups:
            self.offsets.append(self.offsets[-1] + g.numel)
        self._fresh: torch.Tensor | None = None  # zero-infinity's first step: the sub-group's fresh moments
        self._fresh_used = 0  # elements of `_fresh` the current sub-group has taken
        self._init_gradients(streamed)
        self.param_pool: SlotPool | None = None
        self.block_pool: SlotPool | None = None
        self.opt_pool: SlotPool | None = None
        self.space = None
        self._tensors: list[dict[str, torch.Tensor]] = []
        self._param_copy: torch.Tensor | None = None  # (total,) compute dtype: the flat host copy, if any
        # SSD pieces written and not yet waited for (update_depth > 1): (futures, (pool, slot) to release)
        self._writes: deque[tuple[list, list[tuple[SlotPool, torch.Tensor]]]] = deque()
        self._early: dict[int, tuple[dict[str, torch.Tensor], list]] = {}  # gi -> its first piece, being read
        if tier == "ssd":
            if ssd_dir is None:
                raise ValueError("--offload ssd needs --ssd-dir DIR (a directory on an SSD with room for the state)")
            if design.host_param_copy(groups):
                # filled by write_group at initialisation (every page written, so resident)
                hb = design.host_buffer(total * self.itemsize)
                self._param_copy = hb.tensor[: total * self.itemsize].view(self.dtype)
                self.pools["parameter copy (flat)"] = hb.reserved_bytes
            sizes = {}
            for g in groups:
                for kind in KINDS:
                    sizes[f"{g.name}.{kind}"] = g.numel * 4
                if self.separate_copy and self._param_copy is None:
                    sizes[f"{g.name}.param"] = g.numel * self.itemsize
            self.space = design.swap_space(Path(ssd_dir), sizes)
            self.param_pool = design.param_pool(groups, self.itemsize, in_flight)
            blocks = design.block_classes(groups, self.itemsize)  # vocab.py's row blocks of the (V, C) matrices
            self.block_pool = SlotPool("param block slots", blocks) if blocks else None
            self.piece = design.optimizer_piece(groups)
            self.opt_pool = design.optimizer_pool(groups, self.itemsize if self.separate_copy else 0)
            self.pools["param swap pool"] = self.param_pool.reserved_bytes + (
                self.block_pool.reserved_bytes if blocks else 0)
            self.pools["optimizer swap pool"] = self.opt_pool.reserved_bytes
        else:
            held = 0
            for g in groups:
                t: dict[str, torch.Tensor] = {}
                for kind in KINDS + (("param",) if self.separate_copy else ()):
                    dt = self.dtype if kind == "param" else torch.float32
                    nbytes = g.numel * torch.empty((), dtype=dt).element_size()
                    if placement is not None:
                        t[kind] = placement.tensor((kind, len(self._tensors)), g.numel, dt)
                        t[kind].zero_()
                        held += nbytes
                    elif tier == "none":
                        t[kind] = torch.zeros(g.numel, dtype=dt, device=device)
                        held += nbytes
                    else:
                        hb = design.host_buffer(nbytes)
                        t[kind] = hb.tensor[:nbytes].view(dt)
                        t[kind].zero_()
                        held += hb.reserved_bytes
                self._tensors.append(t)
            self.pools["model states"] = held

    # -- reading and writing whole groups (initialisation, checkpoints) -----------------------------------
    def write_group(self, gi: int, master: torch.Tensor, exp_avg: torch.Tensor | None = None,
                    exp_avg_sq: torch.Tensor | None = None) -> None:
        """Set group gi's fp32 master (and moments, zero when None) and refresh its compute copy."""
        values = {"master": master, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

        def put(kind: str, start: int, out: torch.Tensor) -> None:
            v = values[kind]
            out.copy_(v.reshape(-1)[start : start + out.numel()]) if v is not None else out.zero_()

        self._set_group(gi, put)

    def fill_group(self, gi: int, fill: Callable[[torch.Tensor], None]) -> None:
        """Set group gi's fp32 master from `fill`, called in order with flat fp32 views to write the next values
        into (on the SSD tier a piece at a time, in the optimizer slot it is written from); moments zero."""
        self._set_group(gi, lambda kind, start, out: fill(out) if kind == "master" else out.zero_())

    def _set_group(self, gi: int, put: Callable[[str, int, torch.Tensor], None]) -> None:
        """put(kind, start, out) writes `kind`'s values from element `start` into flat fp32 `out`: the whole
        group in host tiers, a piece at a time (optimizer slots) on the SSD; then the compute copy follows."""
        if self.tier != "ssd":
            t = self._tensors[gi]
            for kind in KINDS:
                put(kind, 0, t[kind])
            if self.separate_copy:
                t["param"].copy_(t["master"])
            return
        self.settle_writes()
        for start, n in self._pieces(gi):
            bufs = {kind: self._slot(self.opt_pool, self.piece * 4) for kind in KINDS}
            for kind in KINDS:
                put(kind, start, bufs[kind][: n * 4].view(torch.float32))
            self._write_piece(gi, start, n, bufs)

    def read_group(self, gi: int) -> dict[str, torch.Tensor]:
        """Copies of group gi's master and moments (flat fp32, on the CPU)."""
        g = self.groups[gi]
        self.settle_writes()
        if self.tier != "ssd":
            return {k: self._tensors[gi][k].detach().to("cpu", copy=True) for k in KINDS}
        out = {k: torch.empty(g.numel, dtype=torch.float32) for k in KINDS}
        for start, n in self._pieces(gi):
            bufs = self._read_piece(gi, start, n)
            for k in KINDS:
                out[k][start : start + n].copy_(bufs[k][: n * 4].view(torch.float32))
                self.opt_pool.release(bufs[k])
        return out

    # -- the compute copy --------------------------------------------------------------------------------
    def fetch(self, gi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(flat compute-dtype weights of group gi on the device, the pool slot to release or None)."""
        g = self.groups[gi]
        if self.tier != "ssd":
            src = self._tensors[gi]["param" if self.separate_copy else "master"]
            return src.to(self.device, non_blocking=True), None
        if self._param_copy is not None:  # read in place; a device copy when computing elsewhere
            flat = self._param_copy[self.offsets[gi] : self.offsets[gi + 1]]
            return (flat if self.device.type == "cpu" else flat.to(self.device, non_blocking=True)), None
        kind = "param" if self.separate_copy else "master"
        pool = self.param_pool
        assert pool is not None
        buf = self._slot(pool, g.numel * self.itemsize)
        wait(self.space.read(f"{g.name}.{kind}", buf))
        flat = buf[: g.numel * self.itemsize].view(self.dtype)
        if self.device.type != "cpu":  # copied to the device: the host slot is free again at once
            flat = flat.to(self.device)
            pool.release(buf)
            return flat, None
        return flat, buf

    def release(self, slot: torch.Tensor | None) -> None:
        if slot is not None:
            self.param_pool.release(slot)

    # -- SSD pieces: the optimizer swaps a group in pieces of at most the design's piece size ------------
    def _pieces(self, gi: int) -> list[tuple[int, int]]:
        numel = self.groups[gi].numel
        return [(s, min(self.piece, numel - s)) for s in range(0, numel, self.piece)]

    def _read_piece(self, gi: int, start: int, n: int) -> dict[str, torch.Tensor]:
        bufs, futures = self._start_read_piece(gi, start, n)
        wait(futures)
        return bufs

    def _start_read_piece(self, gi: int, start: int, n: int) -> tuple[dict[str, torch.Tensor], list]:
        """Queue the reads of a piece's master and moments into whole-piece slots: (slots, futures)."""
        name = self.groups[gi].name
        bufs = {k: self._slot(self.opt_pool, self.piece * 4) for k in KINDS}
        return bufs, [f for k in KINDS for f in self.space.read(f"{name}.{k}", bufs[k], n * 4, start * 4)]

    def _write_piece(self, gi: int, start: int, n: int, bufs: dict[str, torch.Tensor],
                     spent: torch.Tensor | None = None) -> None:
        """Write master and moments of a piece (and its compute copy), then release the slots."""
        self._writes.append(self._submit_write_piece(gi, start, n, bufs, spent))
        self._retire_write()

    def _submit_write_piece(self, gi: int, start: int, n: int, bufs: dict[str, torch.Tensor],
                            spent: torch.Tensor | None = None) -> tuple[list, list[tuple[SlotPool, torch.Tensor]]]:
        """Queue the writes of a piece's master and moments and of its compute copy: (futures, the slots to
        release once they are done). The copy is made in a copy slot of the optimizer pool when it has them
        (update_depth > 1: the write may still fly while the backward reuses the gradient's bytes); else in
        `spent`, the piece's gradient bytes (n fp32, O_DIRECT-aligned), used and free; else in a parameter slot
        (not under streamed updates: the prefetcher may hold those)."""
        name = self.groups[gi].name
        writes = [f for k in KINDS for f in self.space.write(f"{name}.{k}", bufs[k], n * 4, start * 4)]
        held = [(self.opt_pool, b) for b in bufs.values()]
        if self._param_copy is not None:
            at = self.offsets[gi] + start
            self._param_copy[at : at + n].copy_(bufs["master"][: n * 4].view(torch.float32))
        elif self.separate_copy:
            if self.design.update_depth > 1:
                out = self._slot(self.opt_pool, self.piece * self.itemsize)
                held.append((self.opt_pool, out))
            elif spent is not None:
                out = spent.view(torch.uint8)
            else:
                out = self._slot(self.param_pool, n * self.itemsize)
                held.append((self.param_pool, out))
            out[: n * self.itemsize].view(self.dtype).copy_(bufs["master"][: n * 4].view(torch.float32))
            writes += self.space.write(f"{name}.param", out, n * self.itemsize, start * self.itemsize)
        return writes, held

    def _retire_write(self) -> None:
        """Wait for the oldest queued piece write and release its slots."""
        futures, held = self._writes.popleft()
        wait(futures)
        for pool, slot in held:
            pool.release(slot)

    def settle_writes(self) -> None:
        """Wait for every queued piece write (before anything reads the swap space again: the next step's
        fetches, checkpoints)."""
        while self._writes:
            self._retire_write()
        self._drop_early()

    @staticmethod
    def _slot(pool: SlotPool, nbytes: int) -> torch.Tensor:
        return pool.acquire(round_up(nbytes, IO_ALIGN))

    def io_stats(self) -> dict:
        if self.space is None:
            return {}
        stats = self.space.engine.stats.to_json()
        return dict(stats, files=self.space.files, direct_io=bool(self.space.direct))

    def close(self) -> None:
        if self.space is not None:
            try:
                self.settle_writes()
            except Exception:  # noqa: BLE001 (closing after an error: the error that stopped the run is the one to report)
                self._writes.clear()
                self._early.clear()
            self.space.close()
            self.space.engine.close()
            self.design.engine = None


def placed_items(groups: list[Group], compute_dtype: torch.dtype) -> list[tuple[tuple[str, int], int]]:
    """(key, bytes) of every host tensor a placed store holds: the flat gradient buffer ("grad", -1), and per
    group its master, moments and (16-bit compute) copy."""
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    items = [(("grad", -1), sum(g.numel for g in groups) * 4)]
    for gi, g in enumerate(groups):
        items += [((kind, gi), g.numel * 4) for kind in KINDS]
        if compute_dtype != torch.float32:
            items.append((("param", gi), g.numel * itemsize))
    return items


def bytes_per_param(compute_dtype: torch.dtype) -> int:
    """Bytes the tier holds per parameter (master + moments + 16-bit copy) plus the host gradient."""
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    return 12 + (itemsize if compute_dtype != torch.float32 else 0) + 4
