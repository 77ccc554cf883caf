"""A gradient-boosted tree ensemble as plain arrays, evaluated with numpy. LightGBM trains it (the `cost`
extra); the shipped ranker is stored as JSON of these arrays (no pickle) and scored without LightGBM, so
`memfit costmodel tune` ranks candidates with IREE and LightGBM both uninstalled."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Tree:
    """Node i splits on feature[i] (x <= threshold[i] goes to left[i], else right[i]); a child index < 0
    is the leaf ~index, whose value is leaf[~index]."""

    feature: np.ndarray    # (n_nodes,) int
    threshold: np.ndarray  # (n_nodes,) float64
    left: np.ndarray       # (n_nodes,) int
    right: np.ndarray      # (n_nodes,) int
    leaf: np.ndarray       # (n_leaves,) float64

    def predict(self, X: np.ndarray) -> np.ndarray:
        if len(self.feature) == 0:  # a single-leaf tree
            return np.full(len(X), self.leaf[0])
        node = np.zeros(len(X), dtype=np.int64)
        out = np.empty(len(X))
        live = np.arange(len(X))
        while len(live):
            nd = node[live]
            go_left = X[live, self.feature[nd]] <= self.threshold[nd]
            nxt = np.where(go_left, self.left[nd], self.right[nd])
            done = nxt < 0
            out[live[done]] = self.leaf[~nxt[done]]
            node[live] = nxt
            live = live[~done]
        return out

    def to_json(self) -> dict:
        return {"f": self.feature.tolist(), "t": self.threshold.tolist(), "l": self.left.tolist(),
                "r": self.right.tolist(), "v": self.leaf.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "Tree":
        return cls(np.array(d["f"], dtype=np.int64), np.array(d["t"], dtype=np.float64),
                   np.array(d["l"], dtype=np.int64), np.array(d["r"], dtype=np.int64),
                   np.array(d["v"], dtype=np.float64))


def from_lightgbm(booster, num_iteration: int | None = None) -> list[Tree]:
    """The trees of a trained lightgbm.Booster (numerical splits, no missing values in our features)."""
    dump = booster.dump_model(num_iteration=num_iteration)
    return [_convert(t["tree_structure"]) for t in dump["tree_info"]]


def _convert(root: dict) -> Tree:
    feature, threshold, left, right, leaf = [], [], [], [], []

    def visit(node: dict) -> int:
        if "leaf_value" in node or "split_feature" not in node:
            leaf.append(float(node.get("leaf_value", 0.0)))
            return ~(len(leaf) - 1)
        if node.get("decision_type", "<=") != "<=":
            raise ValueError(f"unsupported split {node.get('decision_type')!r} (categorical features are not used)")
        i = len(feature)
        feature.append(int(node["split_feature"]))
        threshold.append(float(node["threshold"]))
        left.append(0)
        right.append(0)
        left[i] = visit(node["left_child"])
        right[i] = visit(node["right_child"])
        return i

    visit(root)
    return Tree(np.array(feature, dtype=np.int64), np.array(threshold), np.array(left, dtype=np.int64),
                np.array(right, dtype=np.int64), np.array(leaf))


def predict(trees: list[Tree], X: np.ndarray) -> np.ndarray:
    """Sum of the trees' outputs (LightGBM's raw score: it folds the initial score into the first tree)."""
    X = np.asarray(X, dtype=np.float64)
    out = np.zeros(len(X))
    for t in trees:
        out += t.predict(X)
    return out
