"""One training step, unit by unit, with the weights of the next units fetched on a thread.

Order of a step (K = layers + 2 units: embed, layers, head):
  forward  units 0 .. K-2 (no graph kept when recomputing: only each unit's input is saved, the
           activation checkpoint, on the device or in host memory);
  head     forward and backward at once (its weights are fetched once for both), its logits a chunk of
           tokens at a time (units.py: never the whole (tokens, vocabulary) matrix); with vocab_blocks
           (memascend) it and the embedding's forward fetch nothing whole: their (V, C) matrix is read in row
           blocks (vocab.py), the head's logits with a running log-sum-exp;
  backward units K-2 .. 1: fetch the unit's weights again, recompute its forward from the saved input with
           autograd on, backpropagate the incoming gradient, add the weight gradients into the group's fp32
           gradient (store.grad), hand the input gradient to the unit before; then tell the store which
           groups' gradients are complete (store.grad_done: with streamed gradients, AdamW updates them there).
  embed    unit 0: its output's gradient added into the rows of the batch's tokens (no weights fetched, no
           autograd: the dense (V, C) gradient autograd would make is never held).
A blockwise group (gradients.blockwise_groups: an untied embedding and head, or a tied embedding) adds into no
buffer: its gradient goes to store.grad_done as a PieceGrad, made a block of vocabulary rows at a time as AdamW
reads it (the head's from the logits' gradients it kept, units.HeadRows; the embedding's from the batch's rows;
a tied embedding's from both, the head's factors kept through the backward until unit 0).

Without recomputation (`--offload none` and no `--grad-checkpointing`) each unit keeps its autograd graph
from the forward instead; the arithmetic is the same, so the losses are identical either way.

The weights of the units ahead are fetched on a thread (prefetch.Prefetcher), at most `depth` units ahead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.train.finetune.gradients import DenseGrad, PieceGrad, RowBlocks, embedding_rows, last_units
from memfit.train.finetune.prefetch import Prefetcher
from memfit.train.finetune.store import GroupStore
from memfit.train.finetune.units import (HEAD_GRAD_ROWS, Batch, Group, HeadRows, State, UnitRunner,
                                         embedding_grad_rows)
from memfit.train.finetune.vocab import unit_weights


@dataclass
class StepConfig:
    recompute: bool = True
    checkpoints_on_host: bool = False
    depth: int = 2
    vocab_blocks: bool = False  # the embedding's forward and the head read their (V, C) matrix in row blocks


class StepExecutor:
    def __init__(self, runner: UnitRunner, groups: list[Group], unit_groups: list[list[int]], store: GroupStore,
                 cfg: StepConfig) -> None:
        self.runner, self.groups, self.unit_groups, self.store, self.cfg = runner, groups, unit_groups, store, cfg
        self.checkpoint_bytes = 0  # peak bytes of saved activation checkpoints in the last step
        # unit k -> the groups whose gradient is complete once unit k's backward is done (store.grad_done)
        self.completes: dict[int, list[int]] = {}
        for gi, k in enumerate(last_units(unit_groups, len(groups))):
            self.completes.setdefault(k, []).append(gi)
        self.blockwise = store.streamed.blockwise if store.streamed is not None else frozenset()
        # units that fetch nothing whole: they read their groups through vocab.unit_weights (embed and head)
        self.blocked = {0, len(unit_groups) - 1} if cfg.vocab_blocks else set()

    def _weights(self, k: int, fetched, grad: bool) -> tuple[dict[str, torch.Tensor], list[tuple[int, str, torch.Tensor]]]:
        """name -> weight tensor for unit k; with grad, also (group, name, leaf) to collect gradients from."""
        if k in self.blocked:
            return unit_weights(self.store, self.groups, self.unit_groups[k], grad)
        weights, leaves = {}, []
        for gi, (flat, _slot) in zip(self.unit_groups[k], fetched):
            for name, view in self.groups[gi].views(flat).items():
                if grad:
                    view = view.detach().requires_grad_(True)
                    leaves.append((gi, name, view))
                weights[name] = view
        return weights, leaves

    def _accumulate(self, leaves: list[tuple[int, str, torch.Tensor]]) -> None:
        offsets = {}
        for gi, name, leaf in leaves:
            if gi not in offsets:
                offsets[gi] = _name_offsets(self.groups[gi])
            if leaf.grad is not None:
                start, n = offsets[gi][name]
                dst = self.store.grad(gi)[start : start + n]
                _add_into(dst, leaf.grad.reshape(-1).to(dst.device))  # device -> host gradient buffer on CUDA
                leaf.grad = None  # added: not held while streamed gradients update the group

    def _head_grad(self, head: int, leaves: list[tuple[int, str, torch.Tensor]]):
        """Where the head accumulates its output matrix's gradient: straight into that weight's slice of the
        float32 gradient buffer when it lives on the compute device (no extra memory), else into a device
        buffer added to it once at the end (one copy instead of one per chunk). Returns (buffer, flush)."""
        name = self.runner.head_weight
        gi, leaf = next((gi, leaf) for gi, n, leaf in leaves if n == name)
        start, n = _name_offsets(self.groups[gi])[name]
        dst = self.store.grad(gi)[start : start + n].view(leaf.shape)
        if dst.device == leaf.device:
            return dst, lambda: None
        acc = torch.zeros(leaf.shape, dtype=torch.float32, device=leaf.device)
        return acc, lambda: dst.add_(acc.to(dst.device))

    def step(self, batch: Batch, loss_scale: float) -> float:
        """Forward and backward of one batch; weight gradients (times loss_scale) land in store.grads.
        Returns the (unscaled) loss."""
        n_units = len(self.unit_groups)
        head = n_units - 1
        schedule = list(range(n_units))
        if self.cfg.recompute:  # the layers again for the backward; the embedding's needs no weights
            schedule += list(range(head - 1, 0, -1))
        fetch = [[] if k in self.blocked else self.unit_groups[k] for k in schedule]
        fetcher = Prefetcher(self.store, fetch, self.cfg.depth)
        try:
            loss = self._run(batch, loss_scale, fetcher, head)
            self.store.settle_updates()  # streamed updates' last writes (update time), before the next step reads
            return loss
        finally:
            fetcher.close()

    def _run(self, batch: Batch, loss_scale: float, fetcher: Prefetcher, head: int) -> float:
        recompute = self.cfg.recompute
        saved: list[State] = []
        kept: list[tuple[State, State, list]] = []
        state: State = ()
        self.checkpoint_bytes = 0
        for k in range(head):  # forward
            fetched = fetcher.next()
            if recompute:
                saved.append(self._save(state))
                with torch.no_grad():
                    weights, _ = self._weights(k, fetched, grad=False)
                    state = self.runner.forward(k, weights, state, batch)
            else:
                inputs = _leaf_inputs(state)
                weights, leaves = self._weights(k, fetched, grad=True)
                state = self.runner.forward(k, weights, inputs, batch)
                kept.append((inputs, state, leaves))
            fetcher.done(fetched)
        self._prepare(head)
        fetched = fetcher.next()  # the head: forward and backward at once
        inputs = _leaf_inputs(state)
        weights, leaves = self._weights(head, fetched, grad=True)
        hgi = self.unit_groups[head][0]
        wgi = self.unit_groups[head][-1]  # the output matrix's group: the head's own, or a tied embedding
        tied_rows = None  # tied and blockwise: the head's factors, kept for the embedding's backward (unit 0)
        if wgi in self.blockwise:  # its gradient made a block of rows at a time by the update
            rows = HeadRows(*weights[self.runner.head_weight].shape)
            loss = self.runner.head_step(weights, inputs, batch, loss_scale, rows)
            if wgi == hgi:
                fetcher.done(fetched)
                self._completed(head, {hgi: self._piece_grad(hgi, leaves, rows.rows)})
            else:  # the norm's gradient is dense; the matrix's is complete only after unit 0
                self._accumulate(leaves)
                fetcher.done(fetched)
                self._completed(head)
                tied_rows = rows
            del rows
        else:
            head_grad, flush = self._head_grad(head, leaves)
            loss = self.runner.head_step(weights, inputs, batch, loss_scale, head_grad)
            flush()
            self._accumulate(leaves)  # the final norm's weight (the output matrix's leaf has no .grad)
            fetcher.done(fetched)
            self._completed(head)
        grads = tuple(x.grad for x in inputs)
        for k in range(head - 1, -1, -1):  # backward
            self._prepare(k)
            if k == 0:  # the embedding: its gradient is its output's, added into the rows of the batch's tokens
                self._completed(0, self._embedding_backward(batch, grads[0], tied_rows))
                break
            if recompute:
                fetched = fetcher.next()
                inputs = _leaf_inputs(self._load(saved.pop()))
                weights, leaves = self._weights(k, fetched, grad=True)
                outs = self.runner.forward(k, weights, inputs, batch)
            else:
                inputs, outs, leaves = kept.pop()
            pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            self._accumulate(leaves)
            if recompute:
                fetcher.done(fetched)
            grads = tuple(x.grad for x in inputs)
            del outs, pairs  # this unit's graph, before its groups are updated
            self._completed(k)
        return float(loss.detach())

    def _piece_grad(self, gi: int, leaves: list[tuple[int, str, torch.Tensor]], make) -> PieceGrad:
        """Blockwise group gi's gradient: its row matrix (the head's weight, (V, C)) from make(r0, r1), and
        the .grad of its other leaves (the final norm's)."""
        offsets = _name_offsets(self.groups[gi])
        shapes = dict(self.groups[gi].params)
        parts = []
        for g, name, leaf in leaves:
            start, n = offsets[name]
            if g != gi:
                continue
            if name == self.runner.head_weight:
                parts.append((start, n, RowBlocks(*shapes[name], HEAD_GRAD_ROWS, make)))
            elif leaf.grad is not None:
                parts.append((start, n, DenseGrad(leaf.grad.reshape(-1))))
                leaf.grad = None
        return PieceGrad(parts)

    def _embedding_backward(self, batch: Batch, grad: torch.Tensor,
                            tied_rows: HeadRows | None = None) -> dict[int, PieceGrad] | None:
        """Unit 0's backward without autograd: the embedding's gradient rows for the batch's tokens only
        (units.embedding_grad_rows: autograd's adds, not its dense (V, C) tensor), added into the group's fp32
        gradient, or, blockwise, returned as the group's PieceGrad (a tied one's blocks start from the head's
        rows, `tied_rows`, as the buffer held the head's sums before these rows were added); the weights are
        not needed, so the backward does not fetch them."""
        gi = self.unit_groups[0][0]
        name = "model.embed_tokens.weight"
        start, n = _name_offsets(self.groups[gi])[name]
        shape = dict(self.groups[gi].params)[name]  # (V, C)
        tokens, rows = embedding_grad_rows(batch.ids.reshape(-1), grad)  # (U,), (U, C)
        if gi in self.blockwise:  # made a block of rows at a time by the update, from the rows
            base = tied_rows.rows if tied_rows is not None else None
            blocks = RowBlocks(*shape, HEAD_GRAD_ROWS, embedding_rows(tokens, rows, shape[1], base))
            return {gi: PieceGrad([(start, n, blocks)])}
        dst = self.store.grad(gi)[start : start + n].view(shape)
        # distinct rows: each element gets one float32 add, as the dense gradient's add did (its other rows were 0)
        dst.index_add_(0, tokens.to(dst.device), rows.to(dst.device, torch.float32))
        return None

    def _prepare(self, k: int) -> None:
        """Unit k's backward comes next: the store may start reading the optimizer state of the first group it
        completes (store.prepare_update), so that read overlaps the backward."""
        if self.store.streamed is not None and self.completes.get(k):
            self.store.prepare_update(self.completes[k][0])

    def _completed(self, k: int, sources: dict[int, PieceGrad] | None = None) -> None:
        for gi in self.completes.get(k, ()):
            self.store.grad_done(gi, (sources or {}).get(gi))

    def _save(self, state: State) -> State:
        out = tuple(self._to_host(t) if self.cfg.checkpoints_on_host else t.detach() for t in state)
        self.checkpoint_bytes += sum(t.numel() * t.element_size() for t in out)
        return out

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of a checkpoint: in the tier the placement gives it (--placement), else plain."""
        placement = self.store.placement
        if placement is None:
            return t.detach().to("cpu")
        dst = placement.checkpoint(t.shape, t.dtype)
        dst.copy_(t.detach())
        return dst

    def _load(self, state: State) -> State:
        return tuple(t.to(self.store.device, non_blocking=True) for t in state)


ADD_BLOCK = 1 << 20  # elements of a 16-bit gradient cast to float32 at a time


def _add_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst += src, elementwise, for a float32 dst and a (16-bit) src of the same length, ADD_BLOCK elements at
    a time: on the CPU, `add_` casts a mixed-dtype input to float32 in a temporary as large as the input (98 MB
    for a 32k x 768 embedding's gradient), so a block's cast (4 MiB) is all that is held; same sums, same bits."""
    for s in range(0, src.numel(), ADD_BLOCK):
        dst[s : s + ADD_BLOCK].add_(src[s : s + ADD_BLOCK])


def _leaf_inputs(state: State) -> State:
    """The unit's input as fresh autograd leaves (float tensors only), so its gradient can be read back."""
    return tuple(t.detach().requires_grad_(True) if t.is_floating_point() else t for t in state)


def _name_offsets(group: Group) -> dict[str, tuple[int, int]]:
    out, off = {}, 0
    for name, shape in group.params:
        n = 1
        for d in shape:
            n *= d
        out[name] = (off, n)
        off += n
    return out
