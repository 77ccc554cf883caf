"""Speculative decoding's arithmetic: the rejection sampler (Leviathan et al., ICML 2023) and the draft's picks.

Pure functions of tensors, no engine state, so each is tested on its own (tests/llm/engine/test_speculative.py).
The engine's side (the draft model, its KV cache, the verification pass) is engine/spec_decode.py.

The rule, for a draft that proposed x_1..x_g from its distributions q_1..q_g, and the target's distributions
p_1..p_{g+1} at the same positions (p_{g+1}: after all g drafts):
- walk j = 1..g: accept x_j with probability min(1, p_j(x_j) / q_j(x_j));
- at the first rejection j, emit a token drawn from norm(max(0, p_j - q_j)) and stop;
- if all g are accepted, emit a bonus token drawn from p_{g+1}.
Every emitted token is then distributed exactly as the target's own sampling would give it. p and q are the
distributions after the request's temperature / top-k / top-p / min-p (`Sampler.probs`); greedy requests have
one-hot p and q, and the rule reduces to "keep the drafts while they equal the target's argmax, then emit the
target's argmax", i.e. greedy decoding of the target (`greedy_verdict`, which skips the distributions).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.llm.engine.sampling import inverse_cdf


@dataclass
class Verdict:
    """What `rejection_sample` decided per row."""

    num_accepted: torch.Tensor  # (B,) long: drafts kept, 0..num_draft[b]
    tokens: torch.Tensor  # (B, K+1) long: the kept drafts, then the resampled or bonus token, then -1 padding

    def emitted(self) -> list[list[int]]:
        """Each row's emitted tokens (num_accepted + 1 of them)."""
        n = self.num_accepted.tolist()
        return [row[: k + 1] for row, k in zip(self.tokens.tolist(), n)]


def rejection_sample(
    draft_tokens: torch.Tensor,
    num_draft: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_final: torch.Tensor,
) -> Verdict:
    """The exact speculative sampling rule, batched with ragged draft lengths.

    draft_tokens (B, K) long: row b's drafts in columns < num_draft[b] (the rest is ignored);
    num_draft (B,) long, 0..K; draft_probs (B, K, V): q at each draft position (rows sum to 1);
    target_probs (B, K+1, V): p at each draft position and one past the last;
    u_accept (B, K) and u_final (B,): uniform [0, 1) draws (the caller owns the random generators).
    """
    B, K = draft_tokens.shape
    dev = target_probs.device
    cols = torch.arange(K, device=dev).unsqueeze(0)  # (1, K)
    live = cols < num_draft.unsqueeze(1)  # (B, K): real drafts
    safe = torch.where(live, draft_tokens, torch.zeros_like(draft_tokens)).unsqueeze(2)  # (B, K, 1)
    p_x = target_probs[:, :K].gather(2, safe).squeeze(2)  # (B, K): p_j(x_j)
    q_x = draft_probs.gather(2, safe).squeeze(2)  # (B, K): q_j(x_j), > 0 for a token the draft drew
    # Accept with probability min(1, p/q): u < p/q, written u*q < p so q = 0 (impossible for a drawn token,
    # possible for a caller's hand-made one) rejects instead of dividing by zero.
    accept = (u_accept * q_x < p_x) & live  # (B, K)
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # (B,): leading accepts
    rows = torch.arange(B, device=dev)
    p_n = target_probs[rows, num_accepted]  # (B, V): p at the first rejection, or p_{g+1}
    rejected = num_accepted < num_draft  # (B,): a rejection happened (else the bonus token)
    q_n = draft_probs[rows, num_accepted.clamp(max=K - 1)] if K else torch.zeros_like(p_n)  # (B, V)
    residual = torch.where(rejected.unsqueeze(1), (p_n - q_n).clamp_min(0.0), p_n)  # (B, V)
    # A residual that rounding left empty (p == q up to float error, where a rejection has vanishing
    # probability) falls back to p itself.
    empty = residual.sum(dim=1, keepdim=True) <= 0
    residual = torch.where(empty, p_n, residual)
    final = inverse_cdf(residual, u_final)  # (B,)
    tokens = torch.full((B, K + 1), -1, dtype=torch.long, device=dev)
    keep = cols < num_accepted.unsqueeze(1)  # (B, K)
    tokens[:, :K] = torch.where(keep, draft_tokens, tokens[:, :K])
    tokens[rows, num_accepted] = final
    return Verdict(num_accepted, tokens)


def greedy_verdict(drafts: list[list[int]], target: list[list[int]]) -> list[list[int]]:
    """`rejection_sample` for rows whose p and q are one-hot (greedy requests), without building them: keep the
    drafts while they equal the target's pick, then emit the target's pick (the resample from norm(max(0, p - q))
    and the bonus token are both the target's argmax). drafts[b]: row b's drafts; target[b]: the target's argmax
    at each of them and one past the last (len(drafts[b]) + 1). Returns each row's emitted tokens. Plain lists:
    a step holds a few tokens per sequence, where tensor ops would cost more than the comparisons."""
    out = []
    for d, t in zip(drafts, target):
        n = 0
        while n < len(d) and d[n] == t[n]:
            n += 1
        out.append(d[:n] + [t[n]])
    return out


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (R, V) by the inverse CDF of u (R,): how the draft samples its proposals,
    from the same distributions (`Sampler.probs`) the rule then divides by."""
    return inverse_cdf(probs, u)


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """Tokens one verification emits on average for acceptance rate alpha: (1 - alpha^(g+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def best_gamma(alpha: float, draft_cost: float, max_gamma: int, verify_cost: float = 1.0) -> int:
    """The g in 0..max_gamma that emits the most tokens per unit of time, for acceptance rate alpha, a draft pass
    costing `draft_cost` and a verification pass `verify_cost` plain decode steps: a step with g drafts emits
    expected_tokens_per_step(alpha, g) tokens in g x draft_cost + verify_cost steps' time; plain decoding (g = 0)
    emits 1 token a step. 0 when no g beats plain decoding."""
    best, best_rate = 0, 1.0
    for g in range(1, max_gamma + 1):
        rate = expected_tokens_per_step(alpha, g) / (g * draft_cost + verify_cost)
        if rate > best_rate * (1.0 + 1e-9):
            best, best_rate = g, rate
    return best


class AcceptanceTracker:
    """A sequence's acceptance rate, from what its verifications showed: each kept draft is a success, the first
    rejected one a failure (drafts after it were never tested), with older steps decaying by `decay` a step. It
    starts from a prior of `prior` worth `prior_weight` trials."""

    def __init__(self, prior: float = 0.5, prior_weight: float = 2.0, decay: float = 0.9) -> None:
        self.successes = prior * prior_weight
        self.trials = prior_weight
        self.decay = decay

    def update(self, accepted: int, proposed: int) -> None:
        self.successes = self.successes * self.decay + accepted
        self.trials = self.trials * self.decay + accepted + (1 if accepted < proposed else 0)

    @property
    def alpha(self) -> float:
        return self.successes / self.trials if self.trials > 0 else 0.0
