"""Model passes over token trees (engine/spec_tree.py) through a KV cache, and the compaction after verification.

`tree_forward` runs a runner's model over tree nodes of several sequences in one pass: node i of a tree rooted at
cache index `base` is written at base + i, rotated at position base + depth(i), and attends to the sequence's
committed prefix and its own ancestors (`TreeAttention`: an explicit boolean mask through PyTorch's
scaled_dot_product_attention). On a fixed-stride cache (the virtual one) two or more trees are attended in one call
per run of consecutive slots, their masks stacked (kernels/chunk_batch.py, as the chain's verify chunks); the paged
cache, and MEMFIT_CHUNK_LOOP=1, attend sequence by sequence. The target's verification feeds every node of each
tree; the draft feeds one level of its tree per pass. This is the PyTorch path only: the C++ decode stack (kernels/stack.py)
attends causally and has no mask input, so tree passes never go through it (the chain's passes do).

`compact` then moves the accepted path's K/V to contiguous indices base + 1 .. base + a (where its rotary
positions already put them: a node at depth k was rotated at base + k), so a truncate to base + 1 + a leaves the
cache holding exactly the sequence's tokens, with no committed page for a rejected node.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memfit.llm.engine.runner import ModelRunner, bucket_tokens
from memfit.llm.kernels.attention import DECODE_PAD
from memfit.llm.kernels.chunk_batch import ChunkRun, attend_chunks, plan_chunks
from memfit.llm.kernels.decode_batch import bridges_gaps
from memfit.llm.kernels.slot_runs import make_gaps_readable
from memfit.llm.engine.spec_tree import TokenTree
from memfit.llm.kv.base import KVCacheManager, SeqStep


@dataclass
class TreeChunk:
    """Nodes first .. first+count-1 of `tree` (a breadth-first slice: earlier nodes already in the cache)."""

    seq_id: int
    base: int  # the root's cache index and position: the sequence's committed length
    tree: TokenTree
    first: int
    count: int
    anc: torch.Tensor  # tree.ancestor_mask(), (N, N) bool

    def mask(self, window: int | None) -> torch.Tensor:
        """(count, base + first + count) bool: True where the chunk's node may attend."""
        end = self.first + self.count
        allowed = torch.cat([torch.ones(self.count, self.base, dtype=torch.bool),
                             self.anc[self.first : end, :end]], dim=1)
        if window is not None:  # keys within `window` positions of the query's own position
            depths = torch.tensor(self.tree.depths[:end])
            kpos = torch.cat([torch.arange(self.base), self.base + depths])  # (end_abs,)
            qpos = self.base + depths[self.first : end]  # (count,)
            allowed &= kpos.unsqueeze(0) > qpos.unsqueeze(1) - window
        return allowed


class TreeAttention:
    """An AttentionBackend (kernels/attention.py) for tree chunks: write the nodes' K/V, then attend each chunk
    over its sequence's context under its tree mask: batched per slot run (`runs`) where the cache allows, else
    chunk by chunk. Rows past `num_real` are padding: they attend to nothing."""

    def __init__(self, kv: KVCacheManager, chunks: list[TreeChunk], scale: float, window: int | None,
                 num_real: int) -> None:
        self.kv = kv
        self.chunks = chunks
        self.scale = scale
        self.num_real = num_real
        # token_ids None: a tree's nodes are not the sequence's text, so prefix caching must not hash them
        self.plan = kv.plan_step([SeqStep(c.seq_id, c.base + c.first, c.count, None) for c in chunks])
        dev = kv.layout.device
        self.masks = [c.mask(window).to(dev) for c in chunks]  # (count, end) each
        self.runs: list[ChunkRun] | None = None  # planned once a step; every layer reuses the stacked masks
        if kv.fixed_stride and len(chunks) > 1 and os.environ.get("MEMFIT_CHUNK_LOOP") != "1":
            rows = [0, *itertools.accumulate(c.count for c in chunks)][:-1]  # each chunk's first row
            starts = [c.base + c.first for c in chunks]
            ends = [s + c.count for s, c in zip(starts, chunks)]
            self.runs, self.width_q = plan_chunks(rows, starts, ends, self.plan.slots, DECODE_PAD,
                                                  kv.strided(0)[0].shape[1], dev, bridges_gaps(dev), self.masks)
            make_gaps_readable(kv, [c.run for c in self.runs])

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.num_real
        self.kv.write(layer, self.plan, k[:n], v[:n])
        out = torch.zeros_like(q)  # (N, Hq, D)
        if self.runs is not None:
            kall, vall = self.kv.strided(layer)  # (S, Lmax, Hkv, D) each
            return attend_chunks(q, kall, vall, self.runs, self.width_q, self.scale, out)
        row = 0
        for i, c in enumerate(self.chunks):
            kc, vc = self.kv.context(layer, self.plan, i)  # (end, Hkv, D)
            qh = q[row : row + c.count].transpose(0, 1)  # (Hq, count, D)
            o = F.scaled_dot_product_attention(qh, kc.transpose(0, 1), vc.transpose(0, 1), attn_mask=self.masks[i],
                                               scale=self.scale, enable_gqa=qh.shape[0] != kc.shape[1])
            out[row : row + c.count] = o.transpose(0, 1)
            row += c.count
        return out


def tree_forward(runner: ModelRunner, chunks: list[TreeChunk]) -> torch.Tensor:
    """The logits (sum of counts, V) of every node of every chunk, in chunk order, after one pass of `runner`'s
    model that writes their K/V into its cache."""
    ids: list[int] = []
    pos: list[int] = []
    for c in chunks:
        ids.extend(c.tree.tokens[c.first : c.first + c.count])
        pos.extend(c.base + d for d in c.tree.depths[c.first : c.first + c.count])
    num_real = len(ids)
    padded = bucket_tokens(num_real)  # bounded shapes, as the chain's passes
    ids.extend([0] * (padded - num_real))
    pos.extend([0] * (padded - num_real))
    model, dev = runner.model, runner.device
    attn = TreeAttention(runner.kv, chunks, model.scale, model.config.sliding_window, num_real)
    with runner.step_scratch(padded):
        hidden = model(torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                       attn)  # (padded, C), in the step arena where the runner has one
        return model.compute_logits(hidden[:num_real])  # (num_real, V)


def compact(kv: KVCacheManager, moves: list[tuple[int, int, TokenTree, list[int]]]) -> None:
    """For each (seq_id, base, tree, path): copy the K/V of the root and the accepted `path` (node indices, root to
    leaf) to indices base .. base + len(path), in every layer; the caller then truncates to base + 1 + len(path).
    The root already sits at base and a path node at depth k never moves up (its index is >= k), so reading all
    sources before writing is safe; the write passes the path's tokens, so prefix caching hashes the real text."""
    moves = [m for m in moves if m[3]]
    if not moves:
        return
    # The write plan first: a block shared with another sequence is copied by it, and the read plan then sees it.
    write = kv.plan_step([SeqStep(s, base, 1 + len(path), [tree.tokens[0]] + [tree.tokens[i] for i in path])
                          for s, base, tree, path in moves])
    read = kv.plan_step([SeqStep(s, kv.num_tokens(s), 0, None) for s, _, _, _ in moves])
    dev = kv.layout.device
    src = [torch.tensor([base] + [base + i for i in path], device=dev) for _, base, _, path in moves]
    for layer in range(kv.layout.num_layers):
        ks, vs = [], []
        for i, idx in enumerate(src):
            kc, vc = kv.context(layer, read, i)  # (held, Hkv, D): a view or a gather
            ks.append(kc.index_select(0, idx))  # copies, taken before anything is written
            vs.append(vc.index_select(0, idx))
        kv.write(layer, write, torch.cat(ks), torch.cat(vs))
