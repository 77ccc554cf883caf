"""PNG plots for local-learning runs (matplotlib, Agg backend)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_curves(runs: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """runs: TrainResult.to_json() dicts (optional 'label' overrides the method name); one panel per model,
    one colour per method, test accuracy per epoch."""
    plt = _pyplot()
    models = list(dict.fromkeys(run["model"] for run in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    colours = {"tpsgd": "tab:blue", "bp": "tab:orange", "drtp": "tab:green", "dfa": "tab:red"}
    for ax, model in zip(axes[0], models):
        for run in (r for r in runs if r["model"] == model):
            epochs = [c["epoch"] for c in run["curve"]]
            acc = [c["test_accuracy"] for c in run["curve"]]
            label = run.get("label", run["method"])
            ax.plot(epochs, acc, marker="o", color=colours.get(run["method"]),
                    linestyle="--" if label != run["method"] else "-", label=f"{label} ({acc[-1]:.3f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_memory_scaling(depth_rows: Sequence[dict], batch_rows: Sequence[dict], path: str | Path) -> Path:
    """rows: {'depth'|'batch', 'method', 'allocator_ratio', 'total_ratio'} (ratios to backprop): the allocator's
    peak within a step (the headline) and the total with weights and optimizer state."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, key in ((axes[0], depth_rows, "depth"), (axes[1], batch_rows, "batch")):
        for method in sorted({r["method"] for r in rows}):
            sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r[key])
            xs = [r[key] for r in sel]
            ax.plot(xs, [r["allocator_ratio"] for r in sel], marker="o", label=f"{method} step peak")
            ax.plot(xs, [r["total_ratio"] for r in sel], marker="x", linestyle="--", label=f"{method} total")
        ax.axhline(1 / 3, color="grey", linewidth=0.8, linestyle=":", label="1/3")
        ax.set_xlabel(key + (" (layers)" if key == "depth" else " size"))
        if key == "batch":
            ax.set_xscale("log", base=2)
        ax.set_ylabel("peak bytes / backprop's")
        ax.set_ylim(0, 1.7)  # headroom above 1.0 for the legend
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    axes[0].set_title("MLP width 1024, batch 1024")
    axes[1].set_title("MLP width 1024, 5 layers")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_seeds(setups: dict, path: str | Path) -> Path:
    """One panel per setup: mean +- sample std of the test accuracy per method, each seed as a dot."""
    plt = _pyplot()
    colours = {"tpsgd": "tab:blue", "bp": "tab:orange", "drtp": "tab:green", "dfa": "tab:red"}
    fig, axes = plt.subplots(1, len(setups), figsize=(3.2 * len(setups), 3.6), squeeze=False)
    for ax, (name, s) in zip(axes[0], setups.items()):
        methods = [m for m in ("tpsgd", "bp", "drtp", "dfa") if m in s["methods"]]
        for i, m in enumerate(methods):
            r = s["methods"][m]
            ax.bar(i, r["mean"], yerr=r["std"] or 0, color=colours.get(m), alpha=0.7, capsize=4)
            ax.plot([i] * len(r["per_seed"]), r["per_seed"], "k.", markersize=4)
        low = min(min(r["per_seed"]) for r in s["methods"].values())
        ax.set_ylim(max(0.0, low - 0.03), min(1.0, max(max(r["per_seed"]) for r in s["methods"].values()) + 0.02))
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(f"{name} ({s['setup']['train_examples'] // 1000}k)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle(f"Fashion-MNIST, mean +- sample std over seeds {','.join(map(str, s['seeds']))} "
                 "(dots: each seed; same settings for every seed)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
