"""The optimizer step of a `GroupStore` (store.py): AdamW over each group's fp32 master and moments in the
store's tier, reading the group's fp32 gradient in place (flat) or as the backward completes it (streamed,
grad_store.py), a piece at a time on the SSD tier (master and moments swapped in through the optimizer pool,
written back with the group's refreshed compute copy).

A mixin, as grad_store.GradientsMixin: the streamed gradients call `update_group` at every group, and the
update reads and writes through the store's SSD pieces (`_pieces`, `_read_piece`, `_write_piece`).
"""
from __future__ import annotations

import time

import torch

from memfit.memory.aio import wait
from memfit.train.finetune.gradients import PieceGrad
from memfit.train.finetune.optim import AdamW


class UpdateMixin:
    """Needs, from the store: groups, tier, design, grads, streamed, piece, pools, _tensors, separate_copy and
    the SSD pieces (`_pieces`, `_read_piece`, `_write_piece`); keeps `_fresh` and `_fresh_used` (zero-infinity's
    first-step moments)."""

    # -- the optimizer step ------------------------------------------------------------------------------
    def optimizer_step(self, adam: AdamW, step: int, grad_scale: float) -> None:
        """AdamW on every group, reading its gradient slice in place (divided by `grad_scale`); its time goes to
        update_seconds (the flat step's whole update, its settle at the end included)."""
        t0, settled = time.perf_counter(), self.update_settle_seconds
        self._fresh = None
        if self.tier == "ssd" and step == 1 and self.design.fresh_first_moments:
            # (2, piece) fp32 zeros: the moments of one sub-group, taken before any group is updated
            self._fresh = torch.zeros(2, self.piece, dtype=torch.float32)
            self._fresh_used = 0
            self.pools["first-step Adam moments (transient)"] = self._fresh.numel() * 4
        last = len(self.groups) - 1
        for gi in range(last + 1):
            self.update_group(gi, adam, step, grad_scale, next_gi=gi + 1 if gi < last else None)
        self._fresh = None
        if self.tier == "ssd":
            self.settle_updates()  # pipelined: the last group's writes still in flight
        self.update_seconds += time.perf_counter() - t0 - (self.update_settle_seconds - settled)  # counted once

    def prepare_update(self, gi: int) -> None:
        """Group gi's update comes next (streamed, once the backward completes its gradient): start reading its
        first piece of master and moments now, so the read overlaps that backward. Pipelined designs
        (update_depth > 1) on the SSD tier only, one group ahead, taking a set the update would take anyway."""
        if self.tier != "ssd" or self.design.update_depth < 2 or self._early:
            return
        t0 = time.perf_counter()
        self._read_first_ahead(gi)  # may wait for the last group's writes first: update time, outside its update
        self._count_outside(time.perf_counter() - t0)

    def _read_first_ahead(self, gi: int, reading: int = 0) -> None:
        """Start reading group gi's first piece into `_early`, in a set taken as any read takes one: the oldest
        writes retired while `reading` reads in flight and the writes fill every set (none left: no read)."""
        depth = self.design.update_depth
        while self._writes and reading + len(self._writes) >= depth:
            self._retire_write()
        if reading + len(self._writes) < depth:
            self._early[gi] = self._start_read_piece(gi, *self._pieces(gi)[0])

    def _drop_early(self) -> None:
        for bufs, futures in self._early.values():
            wait(futures)
            for b in bufs.values():
                self.opt_pool.release(b)
        self._early.clear()

    def update_group(self, gi: int, adam: AdamW, step: int, grad_scale: float, source: PieceGrad | None = None,
                     next_gi: int | None = None) -> None:
        """AdamW on group gi (its master and moments swapped in piece by piece on the SSD tier). A blockwise
        group's gradient is made piece by piece by `source` into its one-piece slice (None: zero). `next_gi`: the
        group the flat optimizer step updates next; pipelined, its first piece is read once this group's reads
        are all issued (as DeepSpeed's pipeline_read reads the next sub-group's state during this one's update)."""
        grad = self.grads[gi]
        blockwise = self.streamed is not None and gi in self.streamed.blockwise

        def piece_grad(start: int, n: int) -> torch.Tensor:
            if not blockwise:
                return grad[start : start + n]
            g = grad[:n]
            source.fill(start, n, g) if source is not None else g.zero_()
            return g

        if self.tier != "ssd":
            t = self._tensors[gi]
            # blockwise: piece by piece (AdamW is elementwise: the same bits as one call on the group)
            for start, n in (self._pieces(gi) if blockwise else [(0, self.groups[gi].numel)]):
                sl = slice(start, start + n)
                adam.update(t["master"][sl], t["exp_avg"][sl], t["exp_avg_sq"][sl], piece_grad(start, n), step,
                            grad_scale)
            if self.separate_copy:
                t["param"].copy_(t["master"])
            return
        fresh = self._fresh
        # Pipelined by the design's update_depth D (sets of optimizer slots in flight): piece i + D - 2 is read
        # and earlier pieces' writes fly while AdamW runs on piece i; a set is reused once its write is done.
        # D = 1: read, update, write and wait, piece by piece. The arithmetic is the same either way.
        depth = self.design.update_depth
        pieces = self._pieces(gi)
        reads: dict[int, tuple[dict[str, torch.Tensor], list]] = {}  # piece -> (its slots, read futures)
        early = self._early.pop(gi, None)
        self._drop_early()  # another group's (not expected: the backward completes groups in prepare's order)
        if early is not None:
            reads[0] = early
        ahead = len(reads)  # the next piece to read
        for i, (start, n) in enumerate(pieces):
            while ahead < len(pieces) and ahead <= i + max(depth - 2, 0):
                while len(reads) + len(self._writes) >= depth:  # every set taken: the oldest write first
                    self._retire_write()
                reads[ahead] = self._start_read_piece(gi, *pieces[ahead])
                ahead += 1
            if depth > 1 and next_gi is not None and ahead == len(pieces) and not self._early:
                self._read_first_ahead(next_gi, len(reads))
            g = piece_grad(start, n)
            bufs, futures = reads.pop(i)
            wait(futures)
            v = {k: b[: n * 4].view(torch.float32) for k, b in bufs.items()}
            if fresh is not None:  # zero either way at step 1: the arithmetic is the same
                if self._fresh_used + n > self.piece:  # the next sub-group starts from zeros again
                    fresh.zero_()
                    self._fresh_used = 0
                used = self._fresh_used
                v["exp_avg"], v["exp_avg_sq"] = fresh[0, used : used + n], fresh[1, used : used + n]
                self._fresh_used += n
            adam.update(v["master"], v["exp_avg"], v["exp_avg_sq"], g, step, grad_scale)
            if fresh is not None:  # swapped out through the pool, as DeepSpeed writes its state
                for k in ("exp_avg", "exp_avg_sq"):
                    bufs[k][: n * 4].view(torch.float32).copy_(v[k])
            # streamed: the piece's gradient is spent, and its bytes are aligned (gradients.ALIGN)
            spent = g if self.streamed is not None else None
            self._writes.append(self._submit_write_piece(gi, start, n, bufs, spent))
        if depth == 1:
            self.settle_writes()
