"""Token trees for SAMPLED requests: SpecInfer's multi-candidate rejection rule and the draft's random children.

Pure functions of tensors and trees, no engine state (tests/llm/engine/test_spec_tree_sample.py); the engine's
side is engine/spec_tree_step.py, which drafts with `draw_children` and verifies with `sampled_tree_verdict`.

The rule (SpecInfer, Miao et al., ASPLOS'24, "multi-step speculative sampling"), at a node whose target
distribution is p and whose k children x_1..x_k were drawn i.i.d. from the draft's distribution q there:
- try the children in order: accept x_i with probability min(1, p(x_i) / q(x_i));
- on a rejection set p <- norm(max(0, p - q)) and try the next child with that p (and the same q);
- if every child is rejected, emit a token drawn from the last p and stop;
- after an acceptance, descend into the accepted child with its own p and q; at a leaf, emit the bonus token
  drawn from the leaf's p.
Why it is exact: one trial is Leviathan's single-draft rule with p_i in place of p (x_i ~ q, accept with
min(1, p_i/q), else the outcome is whatever comes from norm(max(0, p_i - q)) = p_{i+1}), whose outcome is
distributed as p_i whenever what follows a rejection is distributed as p_{i+1}. The last step (drawing from
p_{k+1}) is, so by induction on i the whole walk emits its first token distributed as p_1 = p; given that token,
the same argument applies one level down (a child's subtree was drawn from q at that child, independently of how
the child was chosen). With W = 1 the walk is the chain's rule (speculative.rejection_sample).

Duplicates are merged: a token drawn twice under one parent is one node (the same text: one KV slot and one row of
each pass), and `TokenTree.draws` keeps every draw in order, so the rule still makes one trial per draw. That is
what exactness asks of a merge:
- a rejected token's later copies are rejected (p_{i+1}(x) = 0 once x is rejected, as p_i(x) < q(x) then), but each
  still updates the residual p <- norm(max(0, p - q)): the induction above counts one trial per draw, and trying
  each distinct token once would emit from a residual that subtracted q fewer times than tokens were drawn (biased;
  tests/llm/engine/test_spec_tree_sample.py shows the test telling it apart);
- after an acceptance the walk descends into the merged node, whose children are the continuations drawn at every
  copy of it, all from q at the same text: given everything above, they are i.i.d. draws from q there (how many
  depends only on draws above), which is all the rule needs one level down. So a merge never changes what is
  emitted in distribution, and below a token the draft drew twice the walk has two candidates instead of one.

p and q are `Sampler.probs` rows: temperature, top-k, top-p and min-p applied as plain sampling applies them.
"""
from __future__ import annotations

from typing import Any

import torch

from memfit.llm.engine.sampling import inverse_cdf
from memfit.llm.engine.spec_tree import TokenTree


def uniforms_needed(width: int, depth: int) -> int:
    """Uniform draws one sampled W,D tree step takes: W x D draft draws (one per branch and level), at most W x D
    acceptance tests (one per draw: merged duplicates are tried once per copy, and each draw at most once) and the
    final draw. A fixed count per step, so a seeded request's stream does not depend on what was accepted."""
    return 2 * width * depth + 1


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) (V,); p itself when rounding left it empty (p == q up to float error, where a rejection
    has vanishing probability), as the chain's rule does."""
    r = (p - q).clamp_min(0.0)
    total = r.sum()
    return r / total if total > 0 else p


def draw_children(q: torch.Tensor, u: torch.Tensor) -> list[int]:
    """Tokens drawn i.i.d. from the distribution q (V,), one per uniform in u (k,), by the inverse CDF (the chain's
    `speculative.draw`): the k children of a node for the multi-candidate rule, with replacement."""
    return inverse_cdf(q.unsqueeze(0).expand(len(u), -1), u).tolist()


def sampled_tree_verdict(tree: TokenTree, p: Any, q: dict[int, torch.Tensor] | torch.Tensor,
                         u_accept: list[float], u_final: float) -> tuple[list[int], list[int]]:
    """SpecInfer's multi-candidate rule over `tree` (see the module docstring).

    p[i] (V,): the target's distribution after node i's path ((N, V) rows, or anything indexed so: the engine computes
    a row only when the walk reaches its node); q[i] (V,): the
    draft's distribution at node i, from which its children were drawn (needed for nodes with children only);
    u_accept: uniforms for the acceptance tests, consumed in order (at most len(tree) - 1 of them); u_final: the
    uniform of the emitted (resampled or bonus) token. Returns (accepted node indices, root to leaf; emitted tokens:
    theirs, then the final one), as `greedy_tree_verdict` does."""
    node, path, trial = 0, [], 0
    cur = p[0]  # (V,): the target's distribution at `node`, residualised by the rejections there
    while True:
        accepted = None
        for child in tree.draws[node]:  # one trial per draw, in drawing order: a merged child once per copy
            x, qn = tree.tokens[child], q[node]
            u = u_accept[trial]
            trial += 1
            # u < p/q written u*q < p: a token the draft drew has q > 0, and a hand-made one with q = 0 rejects
            if u * float(qn[x]) < float(cur[x]):
                accepted = child
                break
            cur = residual(cur, qn)
        if accepted is None:
            final = int(inverse_cdf(cur.unsqueeze(0), torch.tensor([u_final], device=cur.device))[0])
            return path, [tree.tokens[i] for i in path] + [final]
        path.append(accepted)
        node = accepted
        cur = p[node]
