"""Pearson's chi-square goodness-of-fit, without scipy (a `train` extra, not a test dependency)."""
from __future__ import annotations

import math

Z_999 = 3.0902  # the standard normal's 0.999 quantile


def statistic(counts: list[int], expected: list[float]) -> float:
    """sum (O - E)^2 / E over cells; cells with E = 0 must have O = 0 (else the statistic is infinite)."""
    out = 0.0
    for o, e in zip(counts, expected):
        if e <= 0:
            if o:
                return math.inf
            continue
        out += (o - e) ** 2 / e
    return out


def critical(df: int, z: float = Z_999) -> float:
    """The chi-square quantile for `df` degrees of freedom at the normal quantile z (Wilson-Hilferty, a little
    above the exact value: df 4 -> 18.7 for 18.47, df 20 -> 45.4 for 45.3)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def fits(counts: list[int], expected: list[float]) -> bool:
    """Does the sample fit the distribution at the 0.1% level? (cells with E > 0 count as degrees of freedom)"""
    df = sum(1 for e in expected if e > 0) - 1
    return statistic(counts, expected) < critical(max(df, 1))
