"""Labelled kernels as model inputs (features, tokens, targets) and the held-out splits: whole shapes
(every dtype of a shape on one side) and, separately, whole families."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from memfit.plan.cost import features, tokens
from memfit.plan.cost.parse import pick_function

TARGETS = ("latency_us", "instructions", "vector_fma", "spills")


@dataclass
class Examples:
    keys: list[str]
    families: list[str]
    shape_keys: list[str]
    X: np.ndarray                 # (n, len(features.ALL_NAMES)) hand-built features (NAMES first)
    toks: list[tuple[list[str], list[float]]]
    Y: np.ndarray                 # (n, len(TARGETS)) raw figures
    roofline_inputs: list         # parsed functions (for the roofline)

    def subset(self, idx: np.ndarray) -> "Examples":
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return Examples(pick(self.keys), pick(self.families), pick(self.shape_keys), self.X[idx],
                        pick(self.toks), self.Y[idx], pick(self.roofline_inputs))

    def __len__(self) -> int:
        return len(self.keys)


def from_rows(rows: list[dict], vtile_rules: str | None = None) -> Examples:
    """Labelled rows as Examples; the vector-tile columns by the rules of that name (vtiles.RULES; None: the
    shipped ones)."""
    from memfit.plan.cost.vtiles import rules_named

    rules = rules_named(vtile_rules)
    fns = [pick_function(r["mlir"]) for r in rows]
    X = np.array([features.full_vector(f, rules) for f in fns], dtype=np.float64)
    Y = np.array([[float(r.get(t) or 0.0) for t in TARGETS] for r in rows], dtype=np.float64)
    return Examples([r["key"] for r in rows], [r["family"] for r in rows], [r["shape_key"] for r in rows], X,
                    [tokens.tokenize(f) for f in fns], Y, fns)


def to_log(Y: np.ndarray) -> np.ndarray:
    """Figures -> regression targets: log latency, log1p of the counts."""
    out = np.log1p(Y)
    out[:, 0] = np.log(np.maximum(Y[:, 0], 1e-3))
    return out


def from_log(Z: np.ndarray) -> np.ndarray:
    out = np.expm1(Z)
    out[:, 0] = np.exp(Z[:, 0])
    return np.maximum(out, 0.0)


def _u(text: str, seed: int) -> float:
    return int(hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def shape_split(ex: Examples, seed: int = 0, test: float = 0.2, val: float = 0.1) \
        -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test indices; a shape (all its dtypes) falls wholly in one of them."""
    return split_shape_keys(ex.shape_keys, seed, test, val)


def split_shape_keys(shape_keys: list[str], seed: int = 0, test: float = 0.2, val: float = 0.1) \
        -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """shape_split on bare shape keys (the tile ranker's rows are not Examples)."""
    u = np.array([_u(s, seed) for s in shape_keys])
    te = np.flatnonzero(u < test)
    va = np.flatnonzero((u >= test) & (u < test + val))
    tr = np.flatnonzero(u >= test + val)
    return tr, va, te


def family_split(ex: Examples, family: str, seed: int = 0, val: float = 0.1) \
        -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test on one whole family; train and validate on the others (validation by whole shapes)."""
    fam = np.array(ex.families)
    te = np.flatnonzero(fam == family)
    u = np.array([_u(s, seed) for s in ex.shape_keys])
    va = np.flatnonzero((fam != family) & (u < val))
    tr = np.flatnonzero((fam != family) & (u >= val))
    return tr, va, te
