"""Tree passes through a KV cache (engine/spec_tree_forward.py): each node's logits equal those of its own path run
as a plain sequence, and after `compact` + truncate the cache holds what a plain prefill of the accepted text
writes (read back through one more token), on both caches."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.engine.api import LLM
from memfit.llm.engine.spec_forward import forward
from memfit.llm.engine.spec_tree import TokenTree
from memfit.llm.engine.spec_tree_forward import TreeChunk, compact, tree_forward

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [8, 9, 10, 11], [200, 260, 31, 64, 12, 13, 90, 91, 92, 93, 14]]


def _tree(root: int, edges: list[tuple[int, int]]) -> TokenTree:
    tree = TokenTree(root)
    for parent, tok in edges:
        tree.add(parent, tok)
    return tree


# an irregular tree (not only chains): node 1 has two children, node 2 one, node 4 one
EDGES = [(0, 44), (0, 46), (1, 45), (1, 47), (2, 48), (4, 49)]


def _runner(kv_cache: str):
    llm = LLM("memfit-tiny", dtype="float32", kv_cache=kv_cache, max_num_seqs=16, threads=1)
    runner = llm.engine.runner
    runner.stack = None  # references through the chunked PyTorch path
    return llm, runner


def _plain(runner, sid: int, tokens: list[int]) -> torch.Tensor:
    """Logits at every position of `tokens` run as one sequence from scratch (a fresh sequence id)."""
    assert runner.kv.try_allocate(sid, len(tokens) + 1)
    out = forward(runner, [(sid, 0, tokens)], all_rows=True)
    runner.kv.free(sid)
    return out


@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_tree_logits_equal_each_paths_plain_run_and_compaction_keeps_the_path(kv_cache: str) -> None:
    llm, runner = _runner(kv_cache)
    trees = [_tree(p[-1], EDGES[: 2 + 2 * i]) for i, p in enumerate(PROMPTS)]  # ragged: 2, 4 and 6 nodes
    for sid, prompt, tree in zip((1, 2, 3), PROMPTS, trees):
        assert runner.kv.try_allocate(sid, len(prompt) + len(tree))
        forward(runner, [(sid, 0, prompt[:-1])], all_rows=False)
    chunks = [TreeChunk(sid, len(p) - 1, t, 0, len(t), t.ancestor_mask()) for sid, p, t in zip((1, 2, 3), PROMPTS, trees)]
    logits = tree_forward(runner, chunks)  # (sum of tree sizes, V)
    assert logits.shape[0] == sum(len(t) for t in trees)
    off = 0
    for b, (prompt, tree) in enumerate(zip(PROMPTS, trees)):
        for node in range(len(tree)):
            text = prompt + [tree.tokens[i] for i in tree.path_to(node)]
            want = _plain(runner, 100 + 10 * b + node, text)[-1]
            torch.testing.assert_close(logits[off + node], want, rtol=1e-4, atol=1e-4)
        off += len(tree)
    # accept the deepest path of each tree, compact, truncate; one more token then reads every kept K/V row
    paths = [t.path_to(len(t) - 1) for t in trees]
    compact(runner.kv, [(sid, len(p) - 1, t, path) for sid, p, t, path in zip((1, 2, 3), PROMPTS, trees, paths)])
    for sid, prompt, tree, path in zip((1, 2, 3), PROMPTS, trees, paths):
        runner.kv.truncate(sid, len(prompt) + len(path))
        assert runner.kv.num_tokens(sid) == len(prompt) + len(path)
        text = prompt + [tree.tokens[i] for i in path]
        after = forward(runner, [(sid, len(text), [6])], all_rows=True)[0]
        want = _plain(runner, 200 + sid, text + [6])[-1]
        torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
    llm.engine.close()


def test_tree_mask_with_a_sliding_window_counts_positions_not_indices() -> None:
    """A node at depth k sits at index base + i but position base + k: the window is measured in positions, so a
    sibling's descendants (later indices, same positions) do not push the prefix out of a node's window."""
    tree = _tree(9, [(0, 1), (0, 2), (1, 3), (2, 4)])  # depths 0, 1, 1, 2, 2
    chunk = TreeChunk(1, 5, tree, 0, len(tree), tree.ancestor_mask())
    full = chunk.mask(None)  # (5, 10)
    assert full.shape == (5, 10) and full[:, :5].all()
    assert full[4, 5:].tolist() == [True, False, True, False, True]  # node 4: root, node 2, itself
    win = chunk.mask(3)  # keys with position > query position - 3
    # node 4 (position 7) sees positions > 4: no prefix key (positions 0..4), the root (5), node 2 (6), itself (7)
    assert win[4].tolist() == [False] * 5 + [True, False, True, False, True]
    # node 1 (position 6) sees positions > 3: prefix key 4, the root, itself
    assert win[1].tolist() == [False] * 4 + [True, True, True, False, False, False]
