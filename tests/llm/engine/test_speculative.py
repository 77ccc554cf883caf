"""The rejection sampler (engine/speculative.py) on its own: exactness of the rule, ragged rows, greedy rows."""
from __future__ import annotations

import torch

from memfit.llm.engine.speculative import (AcceptanceTracker, best_gamma, expected_tokens_per_step, greedy_verdict,
                                           rejection_sample)
from tests.llm.engine import chi2


def one_hot(ids: list[int], V: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), V).float()


def test_greedy_rows_keep_drafts_while_they_match_the_target_argmax() -> None:
    V = 6
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 4, 4]])
    q = torch.stack([one_hot([1, 2, 3], V)] * 2 + [one_hot([4, 4, 4], V)])  # (3, 3, V)
    # row 0: the target agrees on all three, bonus 5; row 1: disagrees at the second (wants 0); row 2: at once.
    p = torch.stack([one_hot([1, 2, 3, 5], V), one_hot([1, 0, 3, 5], V), one_hot([2, 4, 4, 4], V)])
    u = torch.zeros(3, 3)
    v = rejection_sample(drafts, torch.tensor([3, 3, 3]), q, p, u, torch.zeros(3))
    assert v.num_accepted.tolist() == [3, 1, 0]
    assert v.emitted() == [[1, 2, 3, 5], [1, 0], [2]]
    assert v.tokens[2].tolist() == [2, -1, -1, -1]


def test_greedy_verdict_is_the_rule_on_one_hot_distributions() -> None:
    """Random greedy rows (drafts that often match the target's picks), ragged lengths: the shortcut decides what
    the full rule decides on one-hot p and q."""
    gen = torch.Generator().manual_seed(0)
    B, K, V = 64, 4, 5
    target = torch.randint(0, V, (B, K + 1), generator=gen)
    drafts = torch.where(torch.rand(B, K, generator=gen) < 0.7, target[:, :K], torch.randint(0, V, (B, K), generator=gen))
    num_draft = torch.randint(1, K + 1, (B,), generator=gen)
    q = torch.nn.functional.one_hot(drafts, V).float()  # (B, K, V)
    p = torch.nn.functional.one_hot(target, V).float()  # (B, K+1, V)
    want = rejection_sample(drafts, num_draft, q, p, torch.rand(B, K, generator=gen), torch.rand(B, generator=gen))
    n = num_draft.tolist()
    got = greedy_verdict([d[:k] for d, k in zip(drafts.tolist(), n)], [t[: k + 1] for t, k in zip(target.tolist(), n)])
    assert got == want.emitted()
    accepted = [len(e) - 1 for e in got]
    assert 0 < sum(a == k for a, k in zip(accepted, n)) < B and accepted.count(0) > 0  # all kinds of rows


def test_ragged_rows_ignore_columns_past_their_draft_length() -> None:
    V = 4
    drafts = torch.tensor([[1, 1], [2, 3]])
    q = torch.stack([one_hot([1, 1], V), one_hot([2, 3], V)])
    p = torch.stack([one_hot([1, 3, 0], V), one_hot([2, 3, 1], V)])
    v = rejection_sample(drafts, torch.tensor([1, 2]), q, p, torch.zeros(2, 2), torch.zeros(2))
    # row 0 has one draft: accepted, and its bonus comes from p at column 1 (token 3), not from column 2.
    assert v.emitted() == [[1, 3], [2, 3, 1]]


def _first_token_counts(p: torch.Tensor, q: torch.Tensor, n: int, wrong: bool = False) -> torch.Tensor:
    """Counts of the first emitted token over n independent rows, with one draft drawn from q (V,)."""
    g = torch.Generator().manual_seed(1234)
    V = p.shape[-1]
    drafts = torch.multinomial(q.expand(n, V), 1, replacement=True, generator=g)  # (n, 1)
    qq = q.expand(n, 1, V).contiguous()
    pp = p.expand(n, 2, V).contiguous()
    u_acc = torch.rand(n, 1, generator=g)
    u_fin = torch.rand(n, generator=g)
    if wrong:  # a plausible bug: a rule blind to q (q ~ 0) accepts every draft the target allows at all
        qq = torch.full_like(qq, 1e-9)
    v = rejection_sample(drafts, torch.ones(n, dtype=torch.long), qq, pp, u_acc, u_fin)
    return torch.bincount(v.tokens[:, 0], minlength=V)


def test_first_token_is_distributed_as_the_target_chi_square() -> None:
    p1 = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    q1 = torch.tensor([0.30, 0.10, 0.30, 0.10, 0.20])  # a poor draft: many rejections and resamples
    p = torch.stack([p1, torch.full((5,), 0.2)])  # (2, V): the second row is the bonus position
    n = 40_000
    counts = _first_token_counts(p, q1, n)
    assert chi2.fits(counts.tolist(), (p1 * n).tolist())
    # The same test has the power to see a wrong rule: the draft's bias shows through.
    bad = _first_token_counts(p, q1, n, wrong=True)
    assert chi2.statistic(bad.tolist(), (p1 * n).tolist()) > 10 * chi2.critical(4)


def test_acceptance_matches_theory_min_p_q_overlap() -> None:
    """The acceptance rate of one draft is sum_x min(p(x), q(x)) (Leviathan et al., eq. for alpha)."""
    p1 = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    q1 = torch.tensor([0.30, 0.10, 0.30, 0.10, 0.20])
    n = 40_000
    g = torch.Generator().manual_seed(7)
    drafts = torch.multinomial(q1.expand(n, 5), 1, replacement=True, generator=g)
    v = rejection_sample(drafts, torch.ones(n, dtype=torch.long), q1.expand(n, 1, 5).contiguous(),
                         torch.stack([p1, p1]).expand(n, 2, 5).contiguous(), torch.rand(n, 1, generator=g),
                         torch.rand(n, generator=g))
    alpha = float(torch.minimum(p1, q1).sum())
    rate = v.num_accepted.float().mean().item()
    assert abs(rate - alpha) < 4 * (alpha * (1 - alpha) / n) ** 0.5


def test_expected_tokens_per_step() -> None:
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert abs(expected_tokens_per_step(0.5, 2) - 1.75) < 1e-12


def test_best_gamma_trades_acceptance_against_the_draft_cost() -> None:
    assert best_gamma(0.9, 0.05, 8) >= 5  # a cheap draft that agrees: speculate far
    assert best_gamma(0.2, 0.5, 8) == 0  # an expensive draft that disagrees: plain decoding is faster
    assert best_gamma(0.6, 0.1, 1) == 1  # capped by the largest g allowed
    picks = [best_gamma(a / 10, 0.1, 8) for a in range(1, 10)]
    assert picks == sorted(picks)  # more acceptance never means fewer drafts
    # the chosen g is the argmax of the rate the docstring defines
    g = best_gamma(0.7, 0.2, 8)
    rates = [expected_tokens_per_step(0.7, k) / (1 + k * 0.2) for k in range(1, 9)]
    assert g == 1 + rates.index(max(rates))


def test_acceptance_tracker_estimates_the_per_token_rate() -> None:
    """Drafts accepted one by one with probability alpha until the first rejection: the tracker's estimate
    converges to alpha (the naive accepted / proposed would read ~0.38 for 0.6 at g = 4)."""
    g = torch.Generator().manual_seed(3)
    t = AcceptanceTracker(decay=1.0)
    naive = [0, 0]
    for _ in range(4000):
        n = 0
        while n < 4 and torch.rand(1, generator=g).item() < 0.6:
            n += 1
        t.update(n, 4)
        naive[0] += n
        naive[1] += 4
    assert abs(t.alpha - 0.6) < 0.02
    assert naive[0] / naive[1] < 0.5


def test_an_expensive_verification_makes_plain_decoding_faster() -> None:
    # 1.5 tokens per step at best for alpha 0.4, but a verification pass costing 3 plain steps: never worth it
    assert best_gamma(0.4, 0.05, 8, verify_cost=3.0) == 0
    assert best_gamma(0.4, 0.05, 8, verify_cost=1.0) > 0


def test_smallest_budget_keeps_the_share_of_the_speedup_at_the_least_memory() -> None:
    from memfit.llm.engine.spec_budget import predicted_speedup, smallest_budget

    def total_at(g: int) -> int:
        return 1000 + 10 * g  # memory grows with g (lookahead KV, buffers)

    r = smallest_budget(0.8, 0.1, 1.0, 8, total_at, keep=0.95)
    rates = [predicted_speedup(0.8, 0.1, 1.0, g) for g in range(9)]
    assert r.best_speedup == max(rates) and r.gamma <= r.best_gamma
    assert r.speedup >= 0.95 * r.best_speedup
    assert all(rates[g] < 0.95 * r.best_speedup for g in range(1, r.gamma))  # no smaller g keeps the share
    assert r.budget_bytes == total_at(r.gamma)
    none = smallest_budget(0.2, 0.5, 2.0, 8, total_at)  # speculation never pays: the plain budget
    assert none.gamma == none.best_gamma == 0 and none.budget_bytes == 1000
