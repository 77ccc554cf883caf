"""Top-k / top-p candidates for the sampler, found in row blocks whose scratch memory has a bound.

Sampling with top-k or top-p keeps, per row, the smallest set of most likely tokens whose probability reaches
top_p (after top-k and temperature). A full descending sort of the vocabulary costs far more than the rest of
a step on a CPU (32 x 152k fp32: ~0.7 s against ~20 ms for everything else) and real nuclei are small, so the
cut-off is searched among the n largest logits (`topk`), widening n 4x only for rows whose nucleus may extend
past it. The kept set is exact whatever n ends up being.

Why blocks: a row whose distribution is nearly flat (a random or badly calibrated model, a high temperature)
widens n to the whole vocabulary, and the search then holds about `BYTES_PER_CANDIDATE` bytes of temporaries
per row and candidate (values, int64 ids, the sort's order, cumsums, masks). Over every row at once that is
~10 float32 copies of the logits: at batch 32 with speculative verification (5 rows each) and a 152k
vocabulary, 1 GB that no budget had reserved. The engine reserves one float32 copy of the sampled rows beside
the logits (`accounting.activation_bytes`, `speculation_bytes`), so rows are searched in blocks whose scratch
fits `budget_bytes` (one row at least). Rows that settle at a small n are finished at once, whatever the block
size; only the rows that widen are taken in smaller blocks. A row's result does not depend on its block.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from memfit.llm.engine.params import SamplingParams

# Peak temporaries of one search step per (row x candidate), in bytes, with the references dropped as below:
# topk's values (4) and int64 ids (8), the scaled and masked values (4 + 4), the probabilities and their
# cumsum (4 + 4), the masks (a few bools), then the id sort's values and order (8 + 8). tests/llm/engine/
# test_candidates.py checks it against the allocator's own count.
BYTES_PER_CANDIDATE = 44


@dataclass
class Candidates:
    """One block's kept tokens. rows (r,) long: which rows of the logits; vals (r, w) float32: the kept
    tokens' logits / temperature, -inf padded; ids (r, w) long: their ids ascending, padded with V."""

    rows: torch.Tensor
    vals: torch.Tensor
    ids: torch.Tensor


def row_cost_bytes(n: int, vocab: int) -> int:
    """Scratch of one row searched at width n: the temporaries and the row's copy out of the batch. (The full
    normaliser of rows whose top-k reaches past n is taken first, in its own row chunks: `_search`.)"""
    return n * BYTES_PER_CANDIDATE + 4 * vocab


def candidate_blocks(logits: torch.Tensor, params: list[SamplingParams], rows: list[int], first: int,
                     budget_bytes: int) -> Iterator[Candidates]:
    """Search `rows` of logits (R, V) float32 (params indexed like the logits' rows), starting at `first`
    candidates, in blocks whose scratch stays within budget_bytes. Yields each block's kept tokens; consume
    one before asking for the next, so that only one block's results are alive."""
    R, V = logits.shape
    dev = logits.device
    top_k = {i: min(params[i].top_k, V) if params[i].top_k > 0 else V for i in rows}
    n = min(V, max(max((k for k in top_k.values() if k < V), default=0), first, 1))
    pending = torch.tensor(rows, dtype=torch.long, device=dev)
    while pending.numel():
        whole = pending.numel() == R and R * n * BYTES_PER_CANDIDATE <= budget_bytes  # no copy of the rows
        per_block = pending.numel() if whole else max(1, budget_bytes // row_cost_bytes(n, V))
        wider = []
        for lo in range(0, pending.numel(), per_block):
            block = pending[lo : lo + per_block]
            ids_l = block.tolist()
            sub = logits if whole else logits.index_select(0, block)  # (r, V)
            left = budget_bytes - (0 if whole else sub.numel() * 4)  # for the normaliser: the block's copy is held
            found, settled = _search(sub, [params[i] for i in ids_l], [top_k[i] for i in ids_l], n, left)
            del sub
            if bool(settled.all()):
                yield Candidates(block, *found)
            else:
                if bool(settled.any()):
                    yield Candidates(block[settled], found[0][settled], found[1][settled])
                wider.append(block[~settled])
            del found
        pending = torch.cat(wider) if wider else pending[:0]
        n = min(V, n * 4)


def _search(logits: torch.Tensor, params: list[SamplingParams], top_k: list[int], n: int, lse_bytes: int
            ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One width n over rows (r, V): ((vals, ids) each (r, w), settled (r,) bool). A row is settled when its
    kept set lies within the n largest logits (it keeps fewer than n, or its top-k is at most n). lse_bytes:
    the scratch the whole rows' normalisers may take (in row chunks, one row at least)."""
    r, V = logits.shape
    dev = logits.device
    k = torch.tensor(top_k, device=dev).unsqueeze(1)  # (r, 1); V = off
    p = torch.tensor([q.top_p for q in params], device=dev).unsqueeze(1)  # (r, 1); 1.0 = off
    temp = torch.tensor([q.temperature for q in params], device=dev).unsqueeze(1)  # (r, 1)
    lse_full = None  # (r, 1): the whole row's normaliser, for rows whose top-k reaches past n
    if n < V and any(kk > n for kk in top_k):
        # before the search's own temporaries, in row chunks of the budget (the scaled row and its exp: 8 V each)
        step = max(1, lse_bytes // (8 * V))
        lse_full = torch.cat([(logits[a : a + step] / temp[a : a + step]).logsumexp(dim=-1, keepdim=True)
                              for a in range(0, r, step)])
    raw, ids = logits.topk(n, dim=-1)  # (r, n) descending; temperature > 0 keeps the order
    rank = torch.arange(n, device=dev).unsqueeze(0)  # (1, n)
    cand = (raw / temp).masked_fill_(rank >= k, float("-inf"))  # (r, n): top-k
    del raw
    lse = cand.logsumexp(dim=-1, keepdim=True)  # (r, 1): exact when a row's top-k lies within n
    if lse_full is not None:
        lse = torch.where(k > n, lse_full, lse)
    probs = (cand - lse).exp_()  # (r, n): probabilities after top-k
    before = probs.cumsum(dim=-1).sub_(probs)  # (r, n): exclusive cumsum
    del probs
    # Keep a token while the ones before it fall short of top_p; the first is always kept (p > 0).
    # p >= 1 (off): rounding in the cumsum must not drop the tail of the top-k.
    # clamp_min(1): a top_p that underflows float32 (e.g. 1e-50) still keeps the most likely token.
    n_keep = (((before < p) | (p >= 1.0)) & (rank < k)).sum(dim=-1, keepdim=True).clamp_min(1)  # (r, 1)
    del before
    settled = ((n_keep < n) | (k <= n)).squeeze(1) if n < V else torch.ones(len(top_k), dtype=torch.bool, device=dev)
    keep = rank < n_keep  # (r, n)
    ids = ids.masked_fill_(~keep, V)
    ids, order = ids.sort(dim=-1)  # (r, n): kept ids ascending, padding (V) last
    width = int(n_keep.max())
    cand = cand.masked_fill_(~keep, float("-inf")).gather(1, order[:, :width])
    return (cand, ids[:, :width]), settled


def sampler_scratch_bytes(rows: int, vocab: int) -> int:
    """The scratch the sampler's search may use for `rows` sampled rows of a `vocab` vocabulary: one float32
    copy of the rows, one row at full width at least (what `Sampler._blocks` passes as the budget, and what
    the engine's ledger reserves beside the logits: accounting.activation_bytes, speculation_bytes)."""
    return max(rows * vocab * 4, row_cost_bytes(vocab, vocab)) if rows > 0 else 0
