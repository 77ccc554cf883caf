"""Error and rank metrics of predicted against measured figures (numpy only: no scipy in the cost extra)."""
from __future__ import annotations

import numpy as np


def mape(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    return float(np.mean(np.abs(pred - true) / np.maximum(np.abs(true), 1e-12)))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (O(n^2) pairs; the test sets are a few hundred kernels)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2:
        return float("nan")
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    den = np.sqrt(np.count_nonzero(da) * np.count_nonzero(db))
    return float((da * db).sum() / den) if den > 0 else float("nan")


def summary(pred: np.ndarray, true: np.ndarray) -> dict:
    return {"n": int(len(true)), "mape": mape(pred, true), "spearman": spearman(pred, true),
            "kendall": kendall(pred, true)}
