"""Comparing training rules over several seeds: mean, sample std and paired differences with a t-interval.

`python -m benchmarks.train_local --seeds` runs every method once per seed with the same settings and hands the
test accuracies here. A rule is called better (or within 5 points of bp) only when the whole 95% interval of
the paired difference (tpSGD - other, same seed: same init, projections, subset and data order) lies on one
side of the threshold; otherwise the gap is "within seed noise".
"""
from __future__ import annotations


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; ValueError with a message for anything else (repeats are refused: the pairing
    and the std assume distinct runs)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers such as 0,1,2 (got {text!r})") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds takes distinct non-negative integers such as 0,1,2 (got {text!r})")
    return seeds


def mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    # sample std (n - 1); undefined for one seed
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
    return mean, std


def compare_seeds(tpsgd: list[float], other: list[float]) -> dict:
    """tpSGD minus another method, paired by seed (same init seed, same data order and subset), in points."""
    if len(tpsgd) != len(other):
        raise ValueError("paired comparison needs one value per seed for both methods")
    diffs = [100 * (a - b) for a, b in zip(tpsgd, other)]
    mean, std = mean_std(diffs)
    out = {"per_seed_points": [round(d, 2) for d in diffs], "mean_points": round(mean, 2),
           "std_points": None if std is None else round(std, 2),
           "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "n": len(diffs),
           "ci95_points": None}
    if std is not None:
        # paired t-interval: n - 1 degrees of freedom (t = 4.30 for 3 seeds)
        from scipy.stats import t

        half = float(t.ppf(0.975, len(diffs) - 1)) * std / len(diffs) ** 0.5
        out["ci95_points"] = [round(mean - half, 2), round(mean + half, 2)]
    return out


def verdict(diff: dict, threshold: float = 0.0) -> str:
    """'above' / 'below' the threshold (points) when the whole 95% interval of the paired difference is on
    one side, else 'within seed noise' (always so for one seed)."""
    ci = diff["ci95_points"]
    if ci is None:
        return "single seed: no uncertainty"
    if ci[0] > threshold:
        return "above"
    if ci[1] < threshold:
        return "below"
    return "within seed noise"


def aggregate_seeds(seeds: list[int], accuracies: dict[str, list[float]]) -> dict:
    """accuracies: method -> test accuracy per seed (in `seeds` order) of one setup."""
    methods = {}
    for m, values in accuracies.items():
        mean, std = mean_std(values)
        methods[m] = {"per_seed": values, "mean": round(mean, 4), "std": None if std is None else round(std, 4)}
    vs = {m: compare_seeds(accuracies["tpsgd"], v) for m, v in accuracies.items() if m != "tpsgd"}
    targets = {}

    def target(diff: dict, threshold: float) -> str:
        # met / not met only when the whole 95% interval of the paired difference is on one side
        v = verdict(diff, threshold)
        side = "above" if diff["mean_points"] > threshold else "below"
        return {"above": "met", "below": "not met"}.get(v, f"{v} (mean {side} {threshold:g} points)")

    if "bp" in vs:  # within 5 points of bp: the paired difference against -5
        targets["tpsgd_within_5_points_of_bp"] = target(vs["bp"], -5.0)
    for m in ("drtp", "dfa"):
        if m in vs:
            targets[f"tpsgd_beats_{m}"] = target(vs[m], 0.0)
    return {"seeds": seeds, "methods": methods, "tpsgd_minus": vs, "targets": targets}
