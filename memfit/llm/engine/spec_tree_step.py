"""Tree speculation's part of an engine step (`speculative_tree=(W, D)`): draft a token tree, verify it, compact.

    SpecDecoder.execute -> tree_shape(...) per decoding sequence -> speculate_tree(decoder, rows, result)

Per sequence of n tokens (n - 1 in the target's KV, the last one, the tree's root, not yet):
1. room: the target's KV grows to n + w x d (the root and every node), the draft's to n + (d - 1) x w (the root
   and the levels it is fed); where memory or the step's token budget is short the tree shrinks, first in width
   (w = W .. 1), then in depth (a chain of d = D - 1 .. 1), then to plain decoding (`tree_shape`);
2. draft: one pass feeds the draft what it has not seen, up to the root (as the chain's first pass) and takes its
   top-w tokens as the root's children; then d - 1 passes each feed one level of the tree, the w nodes of every
   sequence in one pass under the tree mask (engine/spec_tree_forward.py), and extend each branch by the draft's
   argmax: w chains of depth d (engine/spec_tree.py says why this shape);
3. verify: one target pass over every node of every tree (positions n - 1 + depth, the tree mask) gives the
   target's argmax after each node's path; the longest path matching them is accepted (`greedy_tree_verdict`);
4. compact: the accepted path's K/V moves to contiguous indices in both caches and the rest is truncated, so the
   caches hold exactly the sequence's tokens and no committed page is left for a rejected node.

Sampled requests: the draft draws the root's w children i.i.d. from its distribution q there (with replacement)
and continues each branch by drawing, not by its argmax (branches that drew the same text share its node: one
KV slot and one row per pass, `TokenTree.draw`); verification is SpecInfer's multi-candidate rejection rule
(`sampled_tree_verdict`, engine/spec_tree_sample.py), so their tokens are distributed exactly as the target's.
p and q are `Sampler.probs` rows (temperature, top-k, top-p, min-p as plain sampling), and each step draws a fixed
2 x w x d + 1 uniforms from the request's seeded generator. Greedy and sampled rows share the passes; a sampled
plain row (w = d = 0) rides in the verification pass as a tree of its root alone, its token drawn from p.
The level passes and the verification go through PyTorch's attention with an explicit mask, never the C++ decode
stack (it has no mask input); the draft's first pass is the chain's (the stack where there is one), and a
one-branch tree never comes here: SpecDecoder sends it the chain's way.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any

import torch

from memfit.llm.engine.request import Sequence
from memfit.llm.engine.spec_forward import forward
from memfit.llm.engine.spec_tree import TokenTree, greedy_tree_verdict
from memfit.llm.engine.spec_tree_forward import TreeChunk, compact, tree_forward
from memfit.llm.engine.spec_tree_sample import draw_children, sampled_tree_verdict, uniforms_needed
from memfit.llm.engine.step import StepResult

# `dec` below is the engine's SpecDecoder (engine/spec_decode.py, which imports this module, so it is not imported
# back): its runners (target, draft), draft_kv, sampler, stats, _useful, _draft_room, _catch_up, _time, _logprobs.


def tree_shapes(width: int, depth: int) -> list[tuple[int, int]]:
    """The shapes a (W, D) tree shrinks through, largest first: narrower, then a shorter chain."""
    return [(w, depth) for w in range(width, 0, -1)] + [(1, d) for d in range(depth - 1, 0, -1)]


def tree_shape(dec: Any, seq: Sequence, width: int, depth: int, extra: int) -> tuple[int, int]:
    """The (w, d) tree `seq` drafts this step, within max_tokens, the context, the step's `extra` token budget and
    what both caches can hold now; (0, 0): decode it plainly."""
    d = dec._useful(seq, depth)  # no deeper than max_tokens and the context allow
    if d == 0:
        return 0, 0
    n = seq.num_tokens
    for w, dd in tree_shapes(min(width, (seq.max_model_len - n) // d), d):
        if w * dd > extra:
            continue
        if dec.target.kv.try_grow(seq.seq_id, n + w * dd) and dec._draft_room(seq, n + (dd - 1) * w):
            return w, dd
    return 0, 0


class TreeOrChain:
    """Adaptive tree speculation (`speculative_tree` with `speculative_adaptive`): each step, trees or chains for the
    greedy rows, whichever emitted more tokens per second over recent decode-only steps (medians of the last
    `window`, robust to a step another process delayed); the other kind is re-measured every `probe_every` steps.
    A chain step's rows then pick their own g as adaptive chains do (down to plain decoding)."""

    def __init__(self, probe_every: int, window: int) -> None:
        self.probe_every = probe_every
        self.recent = {True: deque(maxlen=window), False: deque(maxlen=window)}  # trees? -> tokens per second
        self.counts = {"tree": 0, "chain": 0}
        self._steps = 0

    def rate(self, trees: bool) -> float | None:
        return statistics.median(self.recent[trees]) if self.recent[trees] else None

    def choose(self) -> bool:
        """True: trees this step. Unmeasured kinds first (trees, then chains)."""
        self._steps += 1
        tree_rate, chain_rate = self.rate(True), self.rate(False)
        if tree_rate is None or chain_rate is None:
            pick = tree_rate is None
        else:
            best = tree_rate >= chain_rate
            pick = (not best) if self._steps % self.probe_every == 0 else best
        self.counts["tree" if pick else "chain"] += 1
        return pick

    def observe(self, trees: bool, tokens: int, seconds: float) -> None:
        if tokens and seconds > 0:
            self.recent[trees].append(tokens / seconds)


@torch.inference_mode()
def speculate_tree(dec: Any, rows: list[tuple[Sequence, int, int]], result: StepResult) -> None:
    """Draft, verify and compact for `rows` (sequence, w, d); w = d = 0 rows are plain decode rows riding in the
    verification pass (a tree of the root alone: the target's own pick, or its draw for a sampled row)."""
    seqs = [s for s, _, _ in rows]
    dec._catch_up([s for s, _, d in rows if d])
    dev = dec.target.device
    sampled = [b for b, s in enumerate(seqs) if not s.params.greedy]
    gens = dec.sampler.generators_for([(seqs[b].request_id, seqs[b].params.seed) for b in sampled])
    # per sampled row: its uniforms (a fixed count a step, from its own generator; None: the global RNG) and the
    # draft's distribution q at each node it drew children from, (V,) each
    u = {b: torch.rand(uniforms_needed(*rows[b][1:]), generator=g).to(dev) for b, g in zip(sampled, gens)}
    q: dict[int, dict[int, torch.Tensor]] = {b: {} for b in sampled}
    t0 = time.perf_counter()
    trees = [TokenTree(s.token_slice(s.num_tokens - 1, s.num_tokens)[0]) for s in seqs]
    # 2. the draft: its first pass as the chain's, the root's w children from it (greedy: its top-w; sampled: w
    #    i.i.d. draws from q)
    first = [b for b, (_, _, d) in enumerate(rows) if d]
    ends: dict[int, list[int]] = {}  # b -> each branch's last node (branches that drew the same text share one)
    if first:
        chunks = []
        for b in first:
            s = seqs[b]
            start = dec.draft_kv.num_tokens(s.seq_id)
            chunks.append((s.seq_id, start, s.token_slice(start, s.num_tokens)))
        logits = forward(dec.draft, chunks, all_rows=False)  # (R, V)
        top = torch.topk(logits.float(), max(rows[b][1] for b in first), dim=-1).indices.tolist()
        probs = _draft_probs(dec, logits, [(r, seqs[b]) for r, b in enumerate(first) if b in q])
        for r, b in enumerate(first):
            w = rows[b][1]
            if b in q:
                q[b][0] = probs[r]
                top[r] = draw_children(q[b][0], u[b][:w])
            ends[b] = [trees[b].draw(0, top[r][j]) for j in range(w)]  # a duplicate draw merges into its first copy
    passes = 1 if first else 0
    for k in range(1, max((d for _, _, d in rows), default=0)):  # level k is fed, level k + 1 drawn
        level = [b for b in first if rows[b][2] > k]
        chunks = [TreeChunk(seqs[b].seq_id, seqs[b].num_tokens - 1, trees[b], *trees[b].level(k),
                            trees[b].ancestor_mask()) for b in level]
        logits = tree_forward(dec.draft, chunks)  # (sum of counts, V): one row per fed (distinct) node
        picks = dec.draft.sampler.ops.argmax(logits).tolist()
        at = [sum(c.count for c in chunks[:i]) for i in range(len(chunks))]  # each chunk's first row
        probs = _draft_probs(dec, logits, [(at[i] + j, seqs[b]) for i, b in enumerate(level) if b in q
                                           for j in range(chunks[i].count)])
        for i, (b, c) in enumerate(zip(level, chunks)):
            if b in q:
                for j in range(c.count):
                    q[b][c.first + j] = probs[at[i] + j]
            w = rows[b][1]
            for j, node in enumerate(ends[b]):  # each branch draws its next token at its node (in branch order)
                row = at[i] + node - c.first
                tok = picks[row]
                if b in q:  # sampled: one draw from q at the node, with the branch's own uniform
                    tok = draw_children(q[b][node], u[b][w * k + j : w * k + j + 1])[0]
                ends[b][j] = c.tree.draw(node, tok)
        passes += 1
    t1 = time.perf_counter()
    logits = probs = None  # the last draft pass's (R, V) logits and copies go before the verification's are made
    # 3. the target verifies every tree in one pass
    chunks = [TreeChunk(s.seq_id, s.num_computed, trees[b], 0, len(trees[b]), trees[b].ancestor_mask())
              for b, s in enumerate(seqs)]
    verify = getattr(dec.target, "forward_tree", None)  # tensor parallel: rank 0 sends the pass to the workers
    logits = verify(chunks) if verify else tree_forward(dec.target, chunks)  # (sum of tree sizes, V)
    if passes:
        dec._time(t1 - t0, passes, time.perf_counter() - t1, kind="tree")
    picks = dec.sampler.ops.argmax(logits).tolist() if len(sampled) < len(seqs) else []
    # 4. compact both caches to the accepted paths, truncate the rest, hand the tokens to the engine
    verdicts, offsets, off = [], [], 0
    for b, tree in enumerate(trees):
        if b in q:  # p row by row, only at the nodes the walk reaches (the root and its accepted path)
            p = _TargetRows(dec.sampler, logits[off : off + len(tree)], seqs[b].params)
            half = (len(u[b]) - 1) // 2
            verdicts.append(sampled_tree_verdict(tree, p, q[b], u[b][half:-1].tolist(), float(u[b][-1])))
        else:
            verdicts.append(greedy_tree_verdict(tree, picks[off : off + len(tree)]))
        offsets.append(off)
        off += len(tree)
    moves = [(s.seq_id, s.num_tokens - 1, trees[b], verdicts[b][0]) for b, s in enumerate(seqs)]
    getattr(dec.target, "compact_tree", lambda m: compact(dec.target.kv, m))(moves)  # TP: on every rank, in order
    compact(dec.draft_kv, [(s.seq_id, s.num_tokens - 1, trees[b], verdicts[b][0][: max(0, rows[b][2] - 1)])
                           for b, s in enumerate(seqs) if rows[b][2]])
    for b, s in enumerate(seqs):
        path, emitted = verdicts[b]
        a, d = len(path), rows[b][2]
        length = s.num_tokens  # before this step's tokens are appended
        dec.target.kv.truncate(s.seq_id, length + a)
        s.num_computed = length + a  # the last emitted token is fed next step
        if d:
            dec.draft_kv.truncate(s.seq_id, length + min(a, d - 1))
        idx = torch.tensor([offsets[b]] + [offsets[b] + i for i in path], device=logits.device)
        for tok, lp in zip(emitted, dec._logprobs(logits.index_select(0, idx), s, emitted)):
            result.sampled_seqs.append(s)
            result.token_ids.append(tok)
            result.logprobs.append(lp)
        if not d:
            continue
        dec.stats.proposed += len(trees[b]) - 1  # distinct nodes: w x d less the merged duplicates
        dec.stats.accepted += a
        dec.stats.rejections += a < d
        dec.stats.emitted += a + 1
        dec.stats.seq_steps += 1
    dec.stats.steps += 1


def _draft_probs(dec: Any, logits: torch.Tensor, rows: list[tuple[int, Sequence]]) -> dict[int, torch.Tensor]:
    """The draft's distributions (`Sampler.probs`, the chain's q) at the given rows of `logits` (row, sequence):
    row -> (V,). Empty when no sampled row is among them."""
    if not rows:
        return {}
    every = [r for r, _ in rows] == list(range(logits.shape[0]))  # all sampled: no (R', V) copy of the logits
    sub = logits if every else logits.index_select(0, torch.tensor([r for r, _ in rows], device=logits.device))
    probs = dec.draft.sampler.probs(sub, [s.params for _, s in rows])  # (R', V)
    return {r: probs[i] for i, (r, _) in enumerate(rows)}


class _TargetRows:
    """The target's distribution (`Sampler.probs`) at a tree's nodes, computed one row when the walk asks for it:
    one (1, V) row and its working copies at a time, never the tree's (N, V) (accounting.tree_speculation_bytes)."""

    def __init__(self, sampler: Any, logits: torch.Tensor, params: Any) -> None:
        self.sampler, self.logits, self.params = sampler, logits, params  # logits: (N, V), one row per node

    def __getitem__(self, node: int) -> torch.Tensor:
        return self.sampler.probs(self.logits[node : node + 1], [self.params])[0]  # (V,)
