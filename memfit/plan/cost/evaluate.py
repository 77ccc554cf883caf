"""Per-family MAPE, Spearman and Kendall of each model's predicted latency, and the predicted-against-
measured plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memfit.plan.cost.metrics import summary


def report(preds: dict[str, np.ndarray], true: np.ndarray, families: list[str]) -> dict:
    """{model: {"all": summary, "families": {family: summary}}} for latency predictions."""
    fam = np.array(families)
    out = {}
    for name, p in preds.items():
        out[name] = {"all": summary(p, true),
                     "families": {f: summary(p[fam == f], true[fam == f]) for f in sorted(set(families))}}
    return out


def table(rep: dict) -> str:
    """Plain-text table: one row per (model, family)."""
    lines = [f"{'model':<10} {'family':<13} {'n':>5} {'MAPE':>8} {'Spearman':>9} {'Kendall':>8}"]
    for model, r in rep.items():
        for fam, s in [("all", r["all"]), *r["families"].items()]:
            lines.append(f"{model:<10} {fam:<13} {s['n']:>5} {s['mape']:>8.3f} {s['spearman']:>9.3f} "
                         f"{s['kendall']:>8.3f}")
    return "\n".join(lines)


def plot(path: str | Path, preds: dict[str, np.ndarray], true: np.ndarray, families: list[str],
         title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted(set(families))
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(fams)}
    fig, axes = plt.subplots(1, len(preds), figsize=(4.2 * len(preds), 4.2), squeeze=False)
    lo, hi = float(np.min(true)) / 2, float(np.max(true)) * 2
    for ax, (name, p) in zip(axes[0], preds.items()):
        for f in fams:
            m = np.array(families) == f
            ax.scatter(true[m], p[m], s=9, color=colors[f], label=f, alpha=0.8)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured latency (us)",
               ylabel="predicted latency (us)", title=name)
    axes[0][0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
