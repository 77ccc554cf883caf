"""Logits -> tokens: greedy, temperature, top-k, top-p (nucleus), min-p, per-request seeds, logprobs.

The engine calls `Sampler.sample` once per step with the last-position logits of every running sequence.
Rows fall into three groups, each handled by a few batched tensor ops with per-row parameter tensors (so
mixed temperatures cost nothing extra): greedy rows (argmax), filtered rows (top-k and/or top-p: sampled
among the few largest logits, found with `topk`, never a full-vocabulary sort) and unfiltered rows
(softmax over the whole vocabulary). The only per-row Python work is one uniform draw per *seeded* row
from that request's own generator (a CPU `torch.Generator`, so the draw costs no kernel launch even when
the logits live on a GPU).

Sampling uses the inverse CDF: one uniform u per row, pick the first token, in vocabulary order, whose
cumulative probability exceeds u. Because a seeded request consumes exactly one number of its own
generator per sampled step, and the kept tokens and their order do not depend on the other rows, its
tokens do not depend on which other requests share the batch (given the same logits).

Logprobs follow vLLM's default convention: they are the *model's* distribution, `log_softmax` of the raw
logits in float32, before temperature, top-k, top-p or min-p are applied.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from memfit.llm.engine.candidates import Candidates, candidate_blocks, sampler_scratch_bytes
from memfit.llm.engine.params import MAX_LOGPROBS, MAX_STOP_STRINGS, InvalidSamplingParams, SamplingParams, TokenLogprobs
from memfit.llm.models.ops import TORCH_OPS, TorchOps


__all__ = ["MAX_LOGPROBS", "MAX_STOP_STRINGS", "InvalidSamplingParams", "Sampler", "SamplingParams", "TokenLogprobs", "make_generator"]

def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator for a seeded request (None without a seed: such rows use the global RNG).

    Always on the CPU, whatever device the model runs on: a draw is one number per step, which is cheaper
    on the CPU than a kernel launch, and the same seed then gives the same draws on every device.
    """
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


class Sampler:
    """One instance per engine. See the module docstring for the conventions.

    It keeps each seeded request's random generator (`generators_for`, by request id, created on the
    request's first sampled token and dropped by `release`), so the request state the scheduler reasons
    about holds no torch object. Keyed by request id, not sequence id: a conversation's next turn adopts
    the previous turn's sequence id with its KV, but brings its own seed.
    """

    # First width of the candidate search for top-k / top-p; widened 4x while a nucleus may extend past it.
    first_candidates: int = 256

    def __init__(self, ops: TorchOps = TORCH_OPS) -> None:
        self.ops = ops  # its `argmax` picks greedy batches (memfit's CPU kernel where the engine runs them)
        self._generators: dict[str, torch.Generator] = {}

    def generators_for(self, requests: list[tuple[str, int | None]]) -> list[torch.Generator | None]:
        """The generator of each (request id, seed); None for unseeded requests (they draw from the global RNG)."""
        out: list[torch.Generator | None] = []
        for rid, seed in requests:
            if seed is None:
                out.append(None)
                continue
            g = self._generators.get(rid)
            if g is None:
                g = self._generators[rid] = make_generator(seed)  # type: ignore[assignment]
            out.append(g)
        return out

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request's generator (unknown ids are ignored)."""
        self._generators.pop(request_id, None)

    @property
    def num_generators(self) -> int:
        return len(self._generators)

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """Pick one token per row. logits: (B, V) float; returns token ids (B,) long on logits' device,
        and per row a TokenLogprobs (rows whose params ask for logprobs) or None."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
        B, V = logits.shape
        if len(params) != B or len(generators) != B:
            raise ValueError(f"got {B} logit rows, {len(params)} params and {len(generators)} generators")
        if all(p.greedy and p.logprobs is None for p in params):
            # The max in the model's dtype picks the same token as in fp32 (widening is exact and keeps the
            # order; ties go to the first index either way) and skips converting a (B, V) tensor.
            return self.ops.argmax(logits), [None] * B
        logits = logits.float()  # (B, V) fp32: bf16 cumsums over 100k+ tokens lose too much precision

        greedy, filtered, plain = [], [], []
        for i, p in enumerate(params):
            if p.greedy:
                greedy.append(i)
            elif p.top_p < 1.0 or 0 < p.top_k < V:
                filtered.append(i)
            else:
                plain.append(i)
        if len(greedy) == B:  # the common all-greedy batch: one op
            tokens = logits.argmax(dim=-1)  # (B,)
        else:
            u = self._uniforms(generators, greedy, logits.device)  # (B,) in [0, 1)
            tokens = torch.empty(B, dtype=torch.long, device=logits.device)
            for rows, pick in ((greedy, self._greedy), (plain, self._plain)):
                if rows:
                    idx = torch.tensor(rows, device=logits.device)
                    # (R, V): the plain rows' own copy, which _plain works in (one copy of the rows in all)
                    sub = logits if len(rows) == B and pick is self._greedy else logits.index_select(0, idx)
                    tokens.index_copy_(0, idx, pick(sub, [params[i] for i in rows], u[idx]))
            if filtered:
                self._filtered(logits, params, u, filtered, tokens)
        return tokens, self._logprobs(logits, params, tokens)

    def probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution `sample` draws each row from, over the whole vocabulary: (R, V) float32 rows that
        sum to 1. Greedy rows are one-hot at the argmax; the others carry temperature, top-k, top-p and
        min-p exactly as `_plain` / `_filtered` apply them. Speculative decoding's rejection rule compares
        the target's and the draft's rows of this (engine/speculative.py)."""
        logits = logits.float()  # (R, V)
        R, V = logits.shape
        out = torch.zeros(R, V, dtype=torch.float32, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        filtered = [i for i, p in enumerate(params) if not p.greedy and (p.top_p < 1.0 or 0 < p.top_k < V)]
        plain = sorted(set(range(R)) - set(greedy) - set(filtered))
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            out[idx, logits.index_select(0, idx).argmax(dim=-1)] = 1.0
        if plain:
            idx = torch.tensor(plain, device=logits.device)
            sub = [params[i] for i in plain]
            out[idx] = self._softmax_(logits.index_select(0, idx), sub)  # (R', V): one copy, worked in place
        for c in self._blocks(logits, params, filtered):  # (r, w) each, padded with (-inf, V)
            kept = self._min_p(torch.softmax(c.vals, dim=-1), [params[i] for i in c.rows.tolist()])  # (r, w)
            rows = torch.zeros(len(c.rows), V + 1, dtype=torch.float32, device=logits.device)
            rows.scatter_(1, c.ids, kept)  # the padding lands in column V, dropped below
            out[c.rows] = rows[:, :V]
            del c, kept, rows
        return out.div_(out.sum(dim=-1, keepdim=True))  # min-p leaves rows unnormalised

    # -- the three groups -------------------------------------------------------------------------------

    @staticmethod
    def _greedy(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)  # (R,); first index among ties

    def _plain(self, logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
        """Temperature (and min-p) over the whole vocabulary. logits (R, V): the rows' own copy, overwritten (the
        softmax and the CDF are made in it: one float32 copy of the rows in all, what the ledger reserves)."""
        cdf = self._softmax_(logits, params).cumsum_(dim=-1)  # (R, V)
        return self._inverse_cdf(cdf, u, cumulative=True)

    def _softmax_(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """softmax(logits / temperature) with min-p, in place in logits (R, V) float32, which is returned."""
        temp = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)  # (R, 1)
        logits.div_(temp)
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        logits.div_(logits.sum(dim=-1, keepdim=True))
        return self._min_p(logits, params)

    def _filtered(self, logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor, rows: list[int],
                  tokens: torch.Tensor) -> None:
        """Temperature, top-k, top-p (and min-p) for `rows` of logits (B, V), sampled among the kept candidates
        only, into tokens (B,)."""
        for c in self._blocks(logits, params, rows):
            probs = self._min_p(torch.softmax(c.vals, dim=-1), [params[i] for i in c.rows.tolist()])  # (r, w)
            pos = self._inverse_cdf(probs, u[c.rows])  # (r,)
            tokens[c.rows] = c.ids.gather(1, pos.unsqueeze(1)).squeeze(1)
            del c, probs

    # -- building blocks --------------------------------------------------------------------------------

    def _blocks(self, logits: torch.Tensor, params: list[SamplingParams], rows: list[int]) -> Iterator[Candidates]:
        """Top-k, then top-p on the distribution renormalised after top-k, with temperature applied, for `rows`
        of logits (B, V): each block's kept tokens sorted by token id (engine/candidates.py). Sorting by id
        makes the inverse CDF walk the same order as `_plain` does, so a seeded request picks the same token
        for the same draw whichever group computes it. The search's scratch stays within one float32 copy
        of the rows (what the engine reserves for sampling beside the logits), one row at least."""
        budget = sampler_scratch_bytes(len(rows), logits.shape[1])
        return candidate_blocks(logits, params, rows, self.first_candidates, budget)

    @staticmethod
    def _min_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Zero tokens with probability below min_p x the row's largest (which always survives)."""
        if all(p.min_p == 0.0 for p in params):
            return probs
        mp = torch.tensor([p.min_p for p in params], device=probs.device).unsqueeze(1)  # (R, 1)
        return probs.masked_fill_(probs < mp * probs.amax(dim=-1, keepdim=True), 0.0)  # callers pass their own tensor

    @staticmethod
    def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, cumulative: bool = False) -> torch.Tensor:
        """Column of the first entry whose cumulative probability exceeds u x row total. probs: (R, n)
        unnormalised (or already their cumsum: `cumulative`), u: (R,) -> (R,) long."""
        cdf = probs if cumulative else probs.cumsum(dim=-1)  # (R, n)
        total = cdf[:, -1:].contiguous()  # (R, 1)
        # right=True: the first column with cdf > x, so a zero-probability entry is never chosen.
        pos = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)  # (R, 1)
        # Rounding can put u x total at the very top; fall back to the last entry with nonzero probability.
        last = torch.searchsorted(cdf, total, right=False)  # (R, 1)
        return torch.minimum(pos, last).squeeze(1)

    @staticmethod
    def _uniforms(generators: list[torch.Generator | None], greedy: list[int], dev: torch.device) -> torch.Tensor:
        """One U[0,1) per row: seeded rows from their own generator, the rest in one global-RNG draw.
        Greedy rows draw nothing from their generator."""
        u = torch.rand(len(generators))  # (B,) CPU, global RNG
        skip = set(greedy)
        for i, g in enumerate(generators):
            if g is not None and i not in skip:
                u[i] = torch.rand(1, generator=g)[0]
        return u.to(dev, non_blocking=True)

    # -- logprobs ---------------------------------------------------------------------------------------

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, params: list[SamplingParams], tokens: torch.Tensor
    ) -> list[TokenLogprobs | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(params)
        if not rows:
            return out
        idx = torch.tensor(rows, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, idx), dim=-1)  # (R, V) fp32, raw model distribution
        chosen = lp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1)  # (R,)
        n = max(params[i].logprobs for i in rows)  # type: ignore[type-var]
        top_v, top_i = lp.topk(n, dim=-1) if n > 0 else (lp[:, :0], lp[:, :0].long())  # (R, n), descending
        # One device->host copy for all rows, then plain Python.
        tok_l = tokens.index_select(0, idx).tolist()
        chosen_l, top_v_l, top_i_l = chosen.tolist(), top_v.tolist(), top_i.tolist()
        for j, i in enumerate(rows):
            m = params[i].logprobs or 0
            out[i] = TokenLogprobs(
                token_id=tok_l[j],
                logprob=chosen_l[j],
                top={t: v for t, v in zip(top_i_l[j][:m], top_v_l[j][:m])},
            )
        return out


inverse_cdf = Sampler._inverse_cdf  # probs (R, n) unnormalised, u (R,) -> (R,) column ids
