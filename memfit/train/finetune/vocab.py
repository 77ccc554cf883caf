"""The vocabulary matrices (the embedding and the output layer, (V, C)) read from the store a block of rows at
a time, so no unit holds a (V, C) compute copy: memascend's `vocab_blocks` (designs.py).

Why: without it the embedding's forward and the head fetch their whole matrix into the parameter pool, whose
slot for it stays resident: 47 MiB at 0.1B (32000 x 768 bf16, the embedding's and the untied head's shared
slot), 272 MB at Qwen2.5-0.5B's tied 151936 x 896. With it the pool holds two block slots
(`block_slot_bytes`: HEAD_GRAD_ROWS rows, 1.5 MiB at 0.1B) and the layers' slots.

- the embedding's forward copies each token's row out of the block that holds it (the rows F.embedding copies:
  same bits), and reads only the blocks the batch's tokens hit;
- the head's forward and backward (`VocabReader.head_step`) run over target tokens only, in two passes over
  the matrix: the first makes the logits a block of rows at a time and keeps a running maximum and sum of
  exponentials per token (the online softmax of Milakov and Gimelshein, arXiv 1805.02867), giving each token's
  log-sum-exp and so the loss; the second makes each block's logits again and their gradient,
  (softmax - one-hot) x the loss's scale, adds its product with the block into the hidden state's gradient (in
  float32) and hands the output matrix's gradient on block by block (a dense float32 buffer, or the kept
  factors of units.HeadRows). So the matrix is read twice a step (once more than whole), and nothing of size
  (tokens, V) is made but the kept factors. The log-sum-exp is summed in another order than cross_entropy's
  over a whole row, so the losses and gradients equal the dense head's to rounding, not bit for bit (tests:
  test_finetune_vocab.py).

Blocks are read one ahead of the compute (two slots: the one in hand and the next), from the SSD with O_DIRECT
over the aligned range that covers them, or as views of a host tier's tensors.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from memfit.memory.aio import wait
from memfit.memory.hostpool import IO_ALIGN
from memfit.memory.mapping import round_up
from memfit.train.finetune.data import IGNORE
from memfit.train.finetune.units import (DEFAULT_LOSS_CHUNK_BYTES, HEAD_GRAD_ROWS, LOGIT_BYTES_PER_ENTRY, Group,
                                         HeadRows)

VOCAB_MATRICES = ("model.embed_tokens.weight", "lm_head.weight")
BLOCK_SLOTS = 2  # the block in hand and the one being read
# Target tokens per pass over the matrix: a block's logits, float32 copy, exponentials and gradient take about
# LOGIT_BYTES_PER_ENTRY bytes per (token, row), ~16 MiB at 1024 rows; more tokens read the matrix again.
BLOCK_TOKENS = max(32, DEFAULT_LOSS_CHUNK_BYTES // (LOGIT_BYTES_PER_ENTRY * HEAD_GRAD_ROWS))


def block_slot_bytes(groups: list[Group], itemsize: int) -> int:
    """Bytes of one block slot: HEAD_GRAD_ROWS rows of the (V, C) matrix and the O_DIRECT alignment on each side
    (an untied head's matrix starts C elements into its group, after the final norm). Also holds the norm."""
    vocab, width = groups[0].params[0][1]
    return round_up(min(vocab, HEAD_GRAD_ROWS) * width * itemsize, IO_ALIGN) + 2 * IO_ALIGN


class Span:
    """Elements [start, start + n) of a group's compute copy being read; `get` waits and returns them (n,) on the
    compute device, `release` gives the slot back."""

    def __init__(self, store, view: torch.Tensor, futures: list, slot: torch.Tensor | None) -> None:
        self.store, self.view, self.futures, self.slot = store, view, futures, slot

    def get(self) -> torch.Tensor:
        wait(self.futures)
        self.futures = []
        return self.view.to(self.store.device, non_blocking=True)

    def release(self) -> None:
        if self.slot is not None:
            self.store.block_pool.release(self.slot)
            self.slot = None


class SpanReads:
    """GroupStore's reads of part of a group's compute copy (a mixin, as grad_store.GradientsMixin)."""

    def read_span(self, gi: int, start: int, n: int) -> Span:
        kind = "param" if self.separate_copy else "master"
        item = self.itemsize if self.separate_copy else 4
        dtype = self.dtype if self.separate_copy else torch.float32
        if self.tier != "ssd":
            return Span(self, self._tensors[gi][kind][start : start + n], [], None)
        if self._param_copy is not None:
            at = self.offsets[gi] + start
            return Span(self, self._param_copy[at : at + n], [], None)
        b0, b1 = start * item, (start + n) * item
        a0, a1 = b0 - b0 % IO_ALIGN, round_up(b1, IO_ALIGN)
        slot = self.block_pool.acquire(a1 - a0)
        futures = self.space.read(f"{self.groups[gi].name}.{kind}", slot, a1 - a0, a0)
        return Span(self, slot[b0 - a0 : b1 - a0].view(dtype), futures, slot)


class VocabReader:
    """A (rows, cols) matrix at element `offset` of group gi, read a block of HEAD_GRAD_ROWS rows at a time."""

    def __init__(self, store, gi: int, offset: int, rows: int, cols: int) -> None:
        self.store, self.gi, self.offset, self.shape = store, gi, offset, (rows, cols)

    def blocks(self, only: set[int] | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(r0, r1, rows r0..r1 (r1 - r0, cols)) per block in order (`only`: those block indices); a block's
        tensor is valid until the next is asked for."""
        rows, cols = self.shape
        starts = [r for r in range(0, rows, HEAD_GRAD_ROWS) if only is None or r // HEAD_GRAD_ROWS in only]

        def read(r0: int) -> Span:
            return self.store.read_span(self.gi, self.offset + r0 * cols, (min(r0 + HEAD_GRAD_ROWS, rows) - r0) * cols)

        pending = read(starts[0]) if starts else None
        try:
            for i, r0 in enumerate(starts):
                cur, pending = pending, (read(starts[i + 1]) if i + 1 < len(starts) else None)
                try:
                    r1 = min(r0 + HEAD_GRAD_ROWS, rows)
                    yield r0, r1, cur.get().view(r1 - r0, cols)
                finally:
                    cur.release()
        finally:
            if pending is not None:
                wait(pending.futures)  # the slot is not handed on while a read still fills it
                pending.release()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """F.embedding(ids, matrix): (N, cols), each token's row copied from its block."""
        out = torch.empty((ids.numel(), self.shape[1]), dtype=self.store.dtype, device=self.store.device)
        hit = set((torch.unique(ids) // HEAD_GRAD_ROWS).tolist())
        for r0, r1, w in self.blocks(hit):
            sel = ((ids >= r0) & (ids < r1)).nonzero().squeeze(1)
            out[sel] = w[ids[sel] - r0]
        return out

    def head_step(self, runner, weights: dict[str, torch.Tensor], state, batch, loss_scale: float,
                  head_grad: torch.Tensor | HeadRows) -> torch.Tensor:
        """units.UnitRunner.head_step with this matrix in blocks: the final norm, the mean cross-entropy over the
        batch's targets and its gradients (into state's and the norm weight's .grad; the matrix's, times
        `loss_scale`, into `head_grad`, (V, C) float32, or kept as factors by a HeadRows)."""
        x, residual = state
        h = runner.model.model.norm.ops.add_rms_norm(x, residual, weights["model.norm.weight"],
                                                     runner.cfg.rms_norm_eps)[1]  # (N, C)
        hd = h.detach()
        labels = batch.labels.reshape(-1)
        where = (labels != IGNORE).nonzero().squeeze(1)  # (T,) the target tokens
        per_target = loss_scale / batch.n_targets
        total = torch.zeros((), dtype=torch.float32, device=hd.device)
        grad_h = torch.zeros_like(hd)  # (N, C)
        for s in range(0, where.numel(), BLOCK_TOKENS):
            at = where[s : s + BLOCK_TOKENS]
            hc, target = hd[at], labels[at]  # (t, C), (t,)
            lse, picked = self._log_sum_exp(hc, target)
            total += (lse - picked).sum()
            grad_h[at] = self._backward(hc, target, lse, per_target, head_grad).to(hd.dtype)
        h.backward(grad_h)
        return total / batch.n_targets

    def _log_sum_exp(self, hc: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, log(sum over V of exp(logit)) and its target's logit, (t,) float32 each."""
        t = hc.shape[0]
        peak = torch.full((t,), float("-inf"), device=hc.device)
        acc = torch.zeros(t, device=hc.device)
        picked = torch.zeros(t, device=hc.device)
        rows = torch.arange(t, device=hc.device)
        for r0, r1, w in self.blocks():
            z = F.linear(hc, w).float()  # (t, r1 - r0): the compute dtype's logits, as the dense head's
            new = torch.maximum(peak, z.max(dim=1).values)
            acc = acc * torch.exp(peak - new) + torch.exp(z - new[:, None]).sum(dim=1)
            peak = new
            hit = (target >= r0) & (target < r1)
            picked[hit] = z[rows[hit], target[hit] - r0]
        return peak + torch.log(acc), picked

    def _backward(self, hc: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, per_target: float,
                  head_grad: torch.Tensor | HeadRows) -> torch.Tensor:
        """The logits' gradient block by block; returns the gradient of hc, (t, C) float32."""
        t = hc.shape[0]
        rows = torch.arange(t, device=hc.device)
        grad = torch.zeros(hc.shape, dtype=torch.float32, device=hc.device)
        kept = None
        if isinstance(head_grad, HeadRows):  # the factors: this chunk's hc and its (t, V) logits' gradient
            kept = torch.empty((t, self.shape[0]), dtype=hc.dtype, device=hc.device)
            head_grad.keep(hc, kept)
        for r0, r1, w in self.blocks():
            p = torch.exp(F.linear(hc, w).float() - lse[:, None])  # (t, r1 - r0) softmax
            hit = (target >= r0) & (target < r1)
            p[rows[hit], target[hit] - r0] -= 1.0
            g = p.mul_(per_target).to(hc.dtype)  # as autograd hands the compute-dtype logits their gradient
            del p
            grad.addmm_(g.float(), w.float())
            if kept is not None:
                kept[:, r0:r1] = g
            else:  # float32 accumulator, the dense head's product for these rows
                head_grad[r0:r1].add_(hc.t().mm(g).t())
        return grad


def unit_weights(store, groups: list[Group], gis: list[int], grad: bool):
    """A unit's weights with its vocabulary matrix as a VocabReader (nothing fetched into the pool): name ->
    tensor or reader, and, with grad, (group, name, leaf) for the executor to collect gradients from (the
    matrix's leaf a storage-less stand-in of its shape, whose gradient the head hands on itself)."""
    weights, leaves = {}, []
    for gi in gis:
        off = 0
        for name, shape in groups[gi].params:
            n = math.prod(shape)
            if name in VOCAB_MATRICES:
                weights[name] = VocabReader(store, gi, off, *shape)
                if grad:
                    leaves.append((gi, name, torch.empty((), device=store.device).expand(shape)))
            else:  # small (the final norm): read and copied out of its slot at once
                span = store.read_span(gi, off, n)
                try:
                    w = span.get().clone().view(shape)
                finally:
                    span.release()
                if grad:
                    w.requires_grad_(True)
                    leaves.append((gi, name, w))
                weights[name] = w
            off += n
    return weights, leaves
