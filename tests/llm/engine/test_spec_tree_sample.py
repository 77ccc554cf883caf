"""SpecInfer's multi-candidate rule for sampled token trees (engine/spec_tree_sample.py) on a 6-token vocabulary with
hand-made p and q: the first emitted token, and the first two jointly, are distributed as the target's by a
chi-square test over many seeded trials (W = 2 and 3), with duplicate draws merged into one node as the engine
merges them; the same test fails for the rule without the residual update (every later candidate tried against
the unchanged p) and for a merge that tries each distinct token once, so it can tell a broken rule from the right
one."""
from __future__ import annotations

import sys

import pytest
import torch

from memfit.llm.engine import spec_tree, spec_tree_sample
from memfit.llm.engine.spec_tree import TokenTree
from memfit.llm.engine.spec_tree_sample import draw_children, residual, sampled_tree_verdict, uniforms_needed
from tests.llm.engine import chi2

V = 6
# p is far from q (the draft over-weights tokens 0 and 1), so rejections, residuals and several trials all happen
P0 = torch.tensor([0.05, 0.10, 0.30, 0.25, 0.20, 0.10])
Q0 = torch.tensor([0.40, 0.30, 0.05, 0.05, 0.10, 0.10])


def _cond(seed: int) -> torch.Tensor:
    """(V, V): a distribution over the next token after each first token (rows sum to 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(V, V, generator=g) ** 3 + 0.01
    return w / w.sum(dim=1, keepdim=True)


P1, Q1 = _cond(1), _cond(2)


def _trial(width: int, depth: int, g: torch.Generator) -> list[int]:
    """One step as the engine makes it: W children of the root drawn i.i.d. from q, each branch continued by
    sampling at its node (the engine's chains, with a duplicate draw merged into the node its text already has),
    then the verdict; returns the first two tokens of the text (the second drawn from the target when the step
    emitted only one, as the next step would)."""
    u = torch.rand(uniforms_needed(width, depth), generator=g)
    tree = TokenTree(0)
    q: dict[int, torch.Tensor] = {0: Q0}
    ends = [tree.draw(0, tok) for tok in draw_children(Q0, u[:width])]
    for k in range(1, depth):  # level k is continued: each branch draws one child from q at its node
        for j, node in enumerate(ends):
            q[node] = Q1[tree.tokens[node]]
            ends[j] = tree.draw(node, draw_children(q[node], u[width * k + j : width * k + j + 1])[0])
    p = torch.stack([P0] + [P1[t] for t in tree.tokens[1:]])  # depth <= 2: p after a node depends on its token
    path, emitted = sampled_tree_verdict(tree, p, q, u[width * depth : -1].tolist(), float(u[-1]))
    assert len(emitted) == len(path) + 1 and path == tree.path_to(path[-1] if path else 0)
    if len(emitted) == 1:
        emitted.append(int(torch.multinomial(P1[emitted[0]], 1, generator=g)))
    return emitted[:2]


def _fits(width: int, depth: int, trials: int = 6000) -> tuple[bool, bool]:
    g = torch.Generator().manual_seed(1234 + width)
    firsts, pairs = [0] * V, [0] * (V * V)
    for _ in range(trials):
        a, b = _trial(width, depth, g)
        firsts[a] += 1
        pairs[a * V + b] += 1
    joint = (P0.unsqueeze(1) * P1).flatten()
    return (chi2.fits(firsts, [trials * float(x) for x in P0]),
            chi2.fits(pairs, [trials * float(x) for x in joint]))


@pytest.mark.parametrize("width", [2, 3])
def test_emitted_tokens_are_distributed_as_the_target(width: int) -> None:
    first, joint = _fits(width, 2)
    assert first, "the first emitted token does not fit p"
    assert joint, "the first two tokens do not fit p(x1) p(x2 | x1)"


@pytest.mark.parametrize("width", [2, 3])
def test_the_rule_without_the_residual_update_fails_the_test(width: int, monkeypatch) -> None:
    """Trying every candidate against the unchanged p over-weights the draft's favourite tokens: the first token
    no longer fits p (the check above is not vacuous)."""
    monkeypatch.setattr(spec_tree_sample, "residual", lambda p, q: p)
    first, _ = _fits(width, 1)
    assert not first


def test_duplicates_are_merged_in_most_trials(monkeypatch) -> None:
    """The chi-square tests above exercise merging: with this q, most W = 3, depth-2 trees have fewer nodes than
    draws (a duplicate somewhere), and no parent has two children with the same token."""
    sizes: list[int] = []

    def spy(tree, *a):  # noqa: ANN001, ANN002
        sizes.append(len(tree))
        for kids in tree.draws:
            assert len({tree.tokens[c] for c in kids}) == len(set(kids))
        return spec_tree_sample.sampled_tree_verdict(tree, *a)

    monkeypatch.setattr(sys.modules[__name__], "sampled_tree_verdict", spy)
    g = torch.Generator().manual_seed(5)
    for _ in range(200):
        _trial(3, 2, g)
    assert sum(n < 1 + 3 * 2 for n in sizes) > 100


def test_a_merge_that_tries_each_distinct_token_once_fails_the_test(monkeypatch) -> None:
    """Merging duplicates but making one trial per distinct token (not per draw) skips the residual updates of the
    later copies, and the first token no longer fits p: the rule must see every draw."""

    def once(self, parent, token):  # noqa: ANN001
        for child in self.draws[parent]:
            if self.tokens[child] == token:
                return child  # the draw is not recorded
        return self.add(parent, token)

    monkeypatch.setattr(spec_tree.TokenTree, "draw", once)
    first, _ = _fits(3, 1)
    assert not first


def test_a_merged_duplicate_is_rejected_with_a_residual_update_per_copy() -> None:
    """Token 0 drawn twice (one node, two draws): its first trial rejects it (p = 0.1 < 0.99 x q = 0.594) and
    p <- norm(max(0, p - q)) = (0, 0.2, 0.8); its second copy is rejected too (p(0) is 0 now) and updates p again,
    to (0, 0, 1): the emitted token is 2 whatever the final uniform (a single update would give 1 at u = 0.1)."""
    tree = TokenTree(5)
    a = tree.draw(0, 0)
    assert tree.draw(0, 0) == a and tree.draws[0] == [a, a] and len(tree) == 2
    p = torch.tensor([[0.1, 0.3, 0.6], [1 / 3, 1 / 3, 1 / 3]])
    q = {0: torch.tensor([0.6, 0.2, 0.2])}
    assert sampled_tree_verdict(tree, p, q, [0.99, 0.99], 0.1) == ([], [2])
    torch.testing.assert_close(residual(p[0], q[0]), torch.tensor([0.0, 0.2, 0.8]))
    # a low first uniform accepts it (0.1 < 0.15 x 0.6 is false; 0.05 x 0.6 = 0.03 < 0.1 is true), once
    assert sampled_tree_verdict(tree, p, q, [0.05, 0.99], 0.1) == ([a], [0, 0])


def test_walk_by_hand() -> None:
    """Small cases written out: a certain acceptance descends; all rejected draws from the residual after every
    child (never a rejected token); a leaf's bonus comes from the leaf's p."""
    tree = TokenTree(0)
    a, b = tree.add(0, 0), tree.add(0, 1)
    c = tree.add(a, 2)
    p = torch.tensor([[0.0, 0.5, 0.5, 0, 0, 0], [0, 0, 1.0, 0, 0, 0], [0, 0, 0, 0, 1.0, 0], [0, 0, 0, 0, 0, 1.0]])
    q = {0: torch.tensor([0.5, 0.5, 0, 0, 0, 0]), a: torch.tensor([0, 0, 1.0, 0, 0, 0])}
    # token 0 has p = 0: rejected; p <- norm(max(0, p - q)) = token 2 alone; token 1 then has p = 0: rejected
    assert sampled_tree_verdict(tree, p, q, [0.0, 0.0, 0.0], 0.99) == ([], [2])
    p2 = p.clone()
    p2[0] = torch.tensor([0.6, 0.4, 0, 0, 0, 0])  # token 0: p/q > 1, always accepted; then node a's child 2
    assert sampled_tree_verdict(tree, p2, q, [0.99, 0.99, 0.99], 0.5) == ([a, c], [0, 2, 5])
    assert b == 2
    torch.testing.assert_close(residual(P0, P0), P0)  # an empty residual falls back to p
