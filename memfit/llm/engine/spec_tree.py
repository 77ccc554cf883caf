"""Token trees for tree speculation (SpecInfer-style): their shape, attention mask, positions and greedy verdict.

Pure functions and a small class, no engine state (tests/llm/engine/test_spec_tree.py); the engine's side is
engine/spec_tree_step.py, the masked passes engine/spec_tree_forward.py.

A tree is rooted at the sequence's last token (not yet in the target's KV); its nodes are stored in breadth-first
order (a parent always comes before its children), and node i sits in a KV cache at index base + i, where base is
the root's position. Its rotary position is base + depth(i): siblings share a position, as they are alternatives
for the same place in the text. Node i attends to the committed prefix (indices < base) and to its ancestors and
itself (`ancestor_mask`), so every node sees exactly the text of its own path.

The shape memfit drafts (`TokenTree.chains`, the `--speculative-tree W,D` option): the draft's top-W tokens after
the root, each continued by a greedy chain to depth D: W x D nodes (sampled requests: W draws and drawn chains,
verified by engine/spec_tree_sample.py; branches that drew the same text share its nodes, `TokenTree.draw`, so
at most W x D). SpecInfer's expansion configs have this form
(branch at one level, then chains). A full W-ary tree of depth D would hold W + W^2 + .. + W^D nodes, and on a CPU
a verification pass costs about its node count, while deep nodes off the draft's first choices are rarely on the
accepted path; branching at the root, where the draft disagrees with the target most, buys most of the extra
acceptance at a linear cost.
"""
from __future__ import annotations

import bisect

import torch


def parse_tree(spec: str | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """'W,D' (a flag) or (W, D) (a keyword) -> (W, D); None stays None. W branches and depth D must be >= 1."""
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = spec.replace("x", ",").split(",")
        try:
            w, d = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"speculative_tree (--speculative-tree) takes W,D (two integers: branches at the root "
                             f"and depth), got {spec!r}") from None
    else:
        vals = list(spec)
        if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise ValueError(f"speculative_tree takes (W, D), two integers, got {spec!r}")
        w, d = vals
    if w < 1 or d < 1:
        raise ValueError(f"speculative_tree (--speculative-tree) W,D must both be at least 1 (W branches at the root, "
                         f"each a chain of depth D), got {w},{d}")
    return w, d


def tree_nodes(width: int, depth: int) -> int:
    """Draft nodes of a W,D tree (the root, the sequence's last token, not counted)."""
    return width * depth


class TokenTree:
    """Nodes in breadth-first order: tokens[i], parents[i] (-1 for the root, node 0), depths[i]; draws[i]: node i's
    children in the order they were drafted, once per draw (a merged child, drawn k times, appears k times)."""

    def __init__(self, root_token: int) -> None:
        self.tokens = [root_token]
        self.parents = [-1]
        self.depths = [0]
        self.draws: list[list[int]] = [[]]

    def add(self, parent: int, token: int) -> int:
        """A new child of `parent` (even if it has one with this token already)."""
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.draws.append([])
        self.draws[parent].append(len(self.tokens) - 1)
        return len(self.tokens) - 1

    def draw(self, parent: int, token: int) -> int:
        """`token` drafted after `parent`: its existing child with that token if there is one (the same text, so
        one node, one KV slot and one row of each pass; the draw is recorded on it again), else a new child."""
        for child in self.draws[parent]:
            if self.tokens[child] == token:
                self.draws[parent].append(child)
                return child
        return self.add(parent, token)

    def level(self, depth: int) -> tuple[int, int]:
        """(first node, count) of the nodes at `depth`, contiguous when the tree is built level by level."""
        first = bisect.bisect_left(self.depths, depth)
        return first, bisect.bisect_right(self.depths, depth) - first

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def chain_index(width: int, depth: int, branch: int) -> int:
        """The node index of chain `branch`'s node at `depth` (1..D) in a chains tree: level by level, W a level."""
        return 1 + (depth - 1) * width + branch

    def ancestor_mask(self) -> torch.Tensor:
        """(N, N) bool: [i, j] True where node j is node i or one of its ancestors."""
        n = len(self.tokens)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = self.parents[j]
        return mask

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's first child down to `node` (empty for the root)."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def greedy_tree_verdict(tree: TokenTree, picks: list[int]) -> tuple[list[int], list[int]]:
    """The longest path whose tokens match the target's argmax: walk from the root, at each node follow the child
    whose token is the target's pick there, else stop and emit the pick. picks[i]: the target's argmax after node
    i's path (one per node). Returns (accepted node indices, root to leaf; emitted tokens: theirs, then the pick at
    the last accepted node), which is greedy decoding of the target, as the chain's `greedy_verdict`."""
    node, path = 0, []
    kids: dict[int, dict[int, int]] = {}
    for i in range(1, len(tree)):
        kids.setdefault(tree.parents[i], {}).setdefault(tree.tokens[i], i)  # the first such child on a duplicate
    while True:
        nxt = kids.get(node, {}).get(picks[node])
        if nxt is None:
            return path, [tree.tokens[i] for i in path] + [picks[node]]
        path.append(nxt)
        node = nxt
