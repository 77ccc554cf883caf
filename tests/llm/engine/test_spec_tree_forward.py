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


def _prefilled_trees(runner) -> tuple[list[TokenTree], list[TreeChunk]]:
    """Sequences 1, 2, 3 hold PROMPTS but their last tokens, the roots of ragged trees of 2, 4 and 6 nodes: the trees
    and their whole-tree chunks."""
    trees = [_tree(p[-1], EDGES[: 2 + 2 * i]) for i, p in enumerate(PROMPTS)]
    for sid, prompt, tree in zip((1, 2, 3), PROMPTS, trees):
        assert runner.kv.try_allocate(sid, len(prompt) + len(tree))
        forward(runner, [(sid, 0, prompt[:-1])], all_rows=False)
    return trees, [TreeChunk(sid, len(p) - 1, t, 0, len(t), t.ancestor_mask())
                   for sid, p, t in zip((1, 2, 3), PROMPTS, trees)]


@pytest.mark.parametrize("kv_cache", ["virtual", "paged"])
def test_tree_logits_equal_each_paths_plain_run_and_compaction_keeps_the_path(kv_cache: str) -> None:
    llm, runner = _runner(kv_cache)
    trees, chunks = _prefilled_trees(runner)
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


def _sdpa_calls_of_one_tree_pass(monkeypatch) -> tuple[torch.Tensor, int, int, list]:
    """One tree pass of three ragged trees on the virtual cache: (logits, SDPA calls, layer calls, the runs)."""
    from memfit.llm.engine import spec_tree_forward

    llm, runner = _runner("virtual")
    _, chunks = _prefilled_trees(runner)
    sdpa, layers, runs = [0], [0], []
    real_sdpa, real_call = torch.nn.functional.scaled_dot_product_attention, spec_tree_forward.TreeAttention.__call__

    def count_sdpa(*a, **kw):
        sdpa[0] += 1
        return real_sdpa(*a, **kw)

    def count_layer(self, *a):
        layers[0] += 1
        runs[:] = self.runs or []
        return real_call(self, *a)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "scaled_dot_product_attention", count_sdpa)
        m.setattr(spec_tree_forward.TreeAttention, "__call__", count_layer)
        logits = tree_forward(runner, chunks)
    llm.engine.close()
    return logits, sdpa[0], layers[0], runs


def test_tree_verification_is_batched_per_slot_run_on_the_virtual_cache(monkeypatch) -> None:
    """Three trees' chunks in one SDPA call per slot run and layer (their masks stacked), not one per tree; the
    per-sequence loop (MEMFIT_CHUNK_LOOP=1) gives the same logits."""
    batched, calls, layers, runs = _sdpa_calls_of_one_tree_pass(monkeypatch)
    assert runs and len(runs) < 3 and calls == layers * len(runs)
    monkeypatch.setenv("MEMFIT_CHUNK_LOOP", "1")
    looped, loop_calls, loop_layers, loop_runs = _sdpa_calls_of_one_tree_pass(monkeypatch)
    assert not loop_runs and loop_calls == loop_layers * 3
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)


def test_batched_tree_verification_decodes_as_the_loop_and_as_plain_decoding(monkeypatch) -> None:
    """Greedy, float32, batched: tree speculation's tokens with the batched verify attention equal the per-sequence
    loop's and plain decoding's."""
    from memfit.llm.engine.params import SamplingParams
    from tests.llm.engine.spec_helpers import DRAFT, tokens
    from tests.llm.engine.spec_helpers import PROMPTS as TEXTS

    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", max_num_seqs=6, threads=1)
    plain = LLM("memfit-tiny", **kw)
    want = tokens(plain.generate(TEXTS, sp))
    plain.engine.close()
    got = {}
    for loop in ("0", "1"):
        monkeypatch.setenv("MEMFIT_CHUNK_LOOP", loop)
        spec = LLM("memfit-tiny", speculative_model=DRAFT, speculative_tree=(3, 3), **kw)
        got[loop] = tokens(spec.generate(TEXTS, sp))
        assert spec.engine.stats()["speculative"]["spec_accepted"] > 0
        spec.engine.close()
    assert got["0"] == got["1"] == want
