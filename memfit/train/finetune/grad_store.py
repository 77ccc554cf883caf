"""The fp32 weight gradients of a `GroupStore` (store.py): where they live in host memory, and, streamed, the
update of each group as soon as the backward completes its gradient.

- flat: one buffer for every parameter, as ZeRO-3's offloaded `grad_partitions_flat_buffer`, zeroed at the
  start of a step and read in place by the overflow check and the optimizer after the backward;
- streamed (gradients.py): one buffer laid out for the groups live at once, each group's slice zeroed when
  the backward first reaches it; `grad_done(gi)` runs AdamW on group gi right there (`update_group`), so its
  bytes are free for the next group. A blockwise group's gradient comes as a `PieceGrad` instead of bytes in
  the buffer.

A mixin rather than a member: the store's update (its tiers, its SSD pieces) and these gradients call each
other at every group, and the executor and trainer address both through the one store.
"""
from __future__ import annotations

import time

import torch

from memfit.train.finetune.gradients import PieceGrad, StreamedLayout
from memfit.train.finetune.optim import AdamW


class GradientsMixin:
    """Needs, from the store: groups, tier, design, device, placement, offsets, pools, and `update_group`."""

    def _init_gradients(self, streamed: StreamedLayout | None) -> None:
        total = self.offsets[-1]
        # Gradients: one flat fp32 buffer, zeroed at the start of each step; or streamed (`streamed`: the
        # layout of the groups live at once, each group's slice zeroed when the backward first reaches it).
        self.streamed = streamed
        self._open: set[int] = set()  # streamed: groups whose gradient the backward is filling
        self._pending: tuple[AdamW, int, float] | None = None  # streamed: (adam, step, scale) of this step
        # this step's time in the optimizer update: the group updates (streamed: inside the backward; flat: the
        # whole optimizer_step), and the waits for their SSD transfers outside them (below)
        self.update_seconds = 0.0
        # of which, the time outside the group updates: a pipelined design's last writes of a group, still in
        # flight when its update returns, waited for at the step's end (settle_updates), and, streamed, a group's
        # first read started during the backward (prepare_update); the writes a group's update waits for inside
        # it (the sequential design's, or a set the pipeline needs back) are not in it
        self.update_settle_seconds = 0.0
        if streamed is not None:
            if self.placement is not None or self.tier not in ("host", "ssd"):
                raise ValueError("streamed gradients need --offload host or ssd and no --placement")
            self.piece = self.design.optimizer_piece(self.groups)  # a blockwise group's slice holds one piece
            hb = self.design.host_buffer(streamed.total * 4)
            self._grad_buf = hb.tensor[: streamed.total * 4].view(torch.float32)
            self._grad_buf.zero_()  # resident from the start, as a pool is
            self.pools["gradients (streamed)"] = hb.reserved_bytes
        elif self.placement is not None:
            self._grad_buf = self.placement.tensor(("grad", -1), total, torch.float32)
            self._grad_buf.zero_()  # the first touch: pages commit where the plan says
            self.pools["gradients"] = total * 4
        elif self.tier == "none":
            self._grad_buf = torch.zeros(total, dtype=torch.float32, device=self.device)
            self.pools["gradients"] = total * 4
        else:
            hb = self.design.host_buffer(total * 4)
            self._grad_buf = hb.tensor[: total * 4].view(torch.float32)
            self._grad_buf.zero_()
            self.pools["gradients"] = hb.reserved_bytes
        self.grads = (streamed.views(self._grad_buf) if streamed is not None else
                      [self._grad_buf[self.offsets[i] : self.offsets[i + 1]] for i in range(len(self.groups))])

    def update_group(self, gi: int, adam: AdamW, step: int, grad_scale: float, source: PieceGrad | None = None) -> None:
        raise NotImplementedError

    def stream_updates(self, adam: AdamW, step: int, grad_scale: float) -> None:
        """Arm this step's updates: `grad_done(gi)` then runs AdamW step `step` on group gi."""
        self._pending = (adam, step, grad_scale)
        self.update_seconds = self.update_settle_seconds = 0.0

    def settle_updates(self) -> None:
        """The step's end: wait for the update's writes still in flight (`settle_writes`), counted as update
        time: the part of the update the pipeline did not hide behind the backward."""
        t0 = time.perf_counter()
        self.settle_writes()
        self._count_outside(time.perf_counter() - t0)

    def _count_outside(self, seconds: float) -> None:
        """Update time spent outside the group updates (update_settle_seconds; part of update_seconds)."""
        self.update_seconds += seconds
        self.update_settle_seconds += seconds

    def grad(self, gi: int) -> torch.Tensor:
        """Group gi's fp32 gradient to add into; streamed, its slice is zeroed when the step first asks."""
        if self.streamed is not None and gi in self.streamed.blockwise:
            raise RuntimeError(f"group {gi}'s gradient is blockwise: hand grad_done a PieceGrad instead")
        if self.streamed is not None and gi not in self._open:
            self.grads[gi].zero_()
            self._open.add(gi)
        return self.grads[gi]

    def grad_done(self, gi: int, source: PieceGrad | None = None) -> None:
        """The backward has finished group gi's gradient: streamed, update the group now (its slice may be
        handed to another group after); flat, nothing (the optimizer runs after the backward). `source`: a
        blockwise group's gradient (gradients.PieceGrad)."""
        if self.streamed is None:
            return
        if self._pending is None:
            raise RuntimeError("streamed gradients: call stream_updates before the step's backward")
        if gi not in self.streamed.blockwise:
            self.grad(gi)  # a group no unit gave a gradient to still steps (with a zero gradient, as flat)
        t0 = time.perf_counter()
        self.update_group(gi, *self._pending, source)
        self.update_seconds += time.perf_counter() - t0
        self._open.discard(gi)

    def zero_grad(self) -> None:
        """A step begins: its gradients start from zero, and so do its update timers."""
        self.update_seconds = self.update_settle_seconds = 0.0
        if self.streamed is None:
            self._grad_buf.zero_()
        self._open.clear()  # streamed: each group's slice is zeroed when the backward first reaches it

    @property
    def grad_buffer(self) -> torch.Tensor:
        return self._grad_buf
