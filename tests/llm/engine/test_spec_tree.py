"""Token trees (engine/spec_tree.py): the W,D option, the chains layout, duplicate draws merged into one node, the
ancestor mask and the greedy verdict, checked against the chain's rule (speculative.greedy_verdict) and against
paths written out by hand."""
from __future__ import annotations

import random

import pytest
import torch

from memfit.llm.engine.spec_tree import TokenTree, greedy_tree_verdict, parse_tree, tree_nodes
from memfit.llm.engine.speculative import greedy_verdict


def _chains(root: int, branches: list[list[int]]) -> TokenTree:
    """W chains of equal depth, added level by level as the engine drafts them."""
    tree = TokenTree(root)
    w = len(branches)
    for k in range(1, len(branches[0]) + 1):
        for j, chain in enumerate(branches):
            parent = 0 if k == 1 else TokenTree.chain_index(w, k - 1, j)
            assert tree.add(parent, chain[k - 1]) == TokenTree.chain_index(w, k, j)
    return tree


def test_parse_tree_accepts_flags_and_tuples_and_refuses_bad_shapes() -> None:
    assert parse_tree("3,4") == (3, 4) and parse_tree((2, 1)) == (2, 1) and parse_tree(None) is None
    assert tree_nodes(3, 4) == 12
    for bad in ("0,3", "3,0", (1, -1), "-2,2"):
        with pytest.raises(ValueError, match="at least 1"):
            parse_tree(bad)
    for bad in ("3", "a,b", "1,2,3", (1, 2, 3), (1.5, 2), (True, 2)):
        with pytest.raises(ValueError, match="W,D|\\(W, D\\)"):
            parse_tree(bad)


def test_chains_layout_depths_and_ancestor_mask() -> None:
    tree = _chains(9, [[1, 2, 3], [4, 5, 6]])
    assert tree.tokens == [9, 1, 4, 2, 5, 3, 6]
    assert tree.parents == [-1, 0, 0, 1, 2, 3, 4]
    assert tree.depths == [0, 1, 1, 2, 2, 3, 3]
    assert tree.path_to(6) == [2, 4, 6] and tree.path_to(0) == []
    mask = tree.ancestor_mask()
    want = torch.zeros(7, 7, dtype=torch.bool)
    for node, anc in {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 2, 4], 5: [0, 1, 3, 5], 6: [0, 2, 4, 6]}.items():
        want[node, anc] = True
    assert torch.equal(mask, want)


def test_greedy_tree_verdict_follows_the_matching_branch() -> None:
    tree = _chains(9, [[1, 2, 3], [4, 5, 6]])
    # the target picks 4 after the root, 5 after node 2 (token 4), then 7 after node 4 (token 5): branch 1, 2 deep
    picks = [4, 0, 5, 0, 7, 0, 0]
    assert greedy_tree_verdict(tree, picks) == ([2, 4], [4, 5, 7])
    assert greedy_tree_verdict(tree, [8, 0, 0, 0, 0, 0, 0]) == ([], [8])  # no child matches: the target's pick
    full = [1, 2, 0, 3, 0, 11, 0]  # branch 0 all the way: the bonus token after its leaf
    assert greedy_tree_verdict(tree, full) == ([1, 3, 5], [1, 2, 3, 11])


def test_a_one_branch_tree_is_the_chain_rule() -> None:
    rng = random.Random(0)
    for _ in range(200):
        d = rng.randint(1, 5)
        drafts = [rng.randint(0, 3) for _ in range(d)]
        target = [rng.randint(0, 3) for _ in range(d + 1)]
        tree = _chains(7, [drafts])
        path, emitted = greedy_tree_verdict(tree, target)  # chain node k sits at index k: picks line up
        assert emitted == greedy_verdict([drafts], [target])[0]
        assert path == list(range(1, len(emitted)))


def test_a_duplicate_draw_is_one_node_and_every_draw_is_kept() -> None:
    """Branches drawn as [5, 7, 5] then continued [1, 2, 1] and [3, 4, 6] (as the engine drafts them, branch by
    branch): the two 5s are one node whose draws are the branches' continuations (1 twice: one node again), levels
    stay contiguous, and each node's text is its path's."""
    tree = TokenTree(9)
    ends = [tree.draw(0, t) for t in (5, 7, 5)]
    assert ends == [1, 2, 1] and tree.draws[0] == [1, 2, 1] and tree.level(1) == (1, 2)
    for level in ([1, 2, 1], [3, 4, 6]):
        ends = [tree.draw(node, t) for node, t in zip(ends, level)]
    assert tree.tokens == [9, 5, 7, 1, 2, 3, 4, 6]
    assert tree.parents == [-1, 0, 0, 1, 2, 3, 4, 3]
    assert tree.draws[1] == [3, 3] and tree.draws[3] == [5, 7] and tree.draws[2] == [4]
    assert [tree.level(k) for k in range(4)] == [(0, 1), (1, 2), (3, 2), (5, 3)]
    texts = {tuple(tree.tokens[i] for i in tree.path_to(n)) for n in range(1, len(tree))}
    assert len(texts) == len(tree) - 1  # no two nodes hold the same text
    mask = tree.ancestor_mask()
    assert mask[7].nonzero().flatten().tolist() == [0, 1, 3, 7]
    assert greedy_tree_verdict(tree, [5, 1, 0, 6, 0, 0, 0, 8]) == ([1, 3, 7], [5, 1, 6, 8])
    assert tree.add(0, 5) == 8 and tree.draws[0] == [1, 2, 1, 8]  # add() always makes a node
