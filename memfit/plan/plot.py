"""Draw a plan: scratchpad address against step, one rectangle per placement; spills and reloads marked."""
from __future__ import annotations

from pathlib import Path

from memfit.plan.plan_format import Plan


def plot_plan(plan: Plan, path: str | Path, max_rects: int = 20000) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    g, order = plan.graph, plan.order
    colors = {"input": "#4c72b0", "weight": "#8c8c8c", "activation": "#55a868", "output": "#c44e52"}
    by: dict[str, list] = {}
    for p in plan.placements:
        by.setdefault(p.tensor, []).append(p)
    fig, ax = plt.subplots(figsize=(12, 5), dpi=120)
    scale = 1 << 20 if plan.scratchpad_bytes >= (1 << 22) else 1 << 10
    unit = "MiB" if scale == 1 << 20 else "KiB"
    drawn = 0
    for name, pls in by.items():
        t = g.tensor[name]
        pls.sort(key=lambda p: p.start)
        for k, p in enumerate(pls):
            if drawn >= max_rects:
                break
            y, h = p.offset / scale, t.bytes / scale
            ax.add_patch(Rectangle((p.start, y), p.end - p.start + 1, h, facecolor=colors[t.kind],
                                   edgecolor="black", linewidth=0.2, alpha=0.8))
            drawn += 1
            created = t.producer is not None and order[p.start] == t.producer
            if not created and (k > 0 or t.producer is not None):  # non-compulsory reload
                ax.plot([p.start], [y + h / 2], marker=">", color="navy", markersize=3)
            if k < len(pls) - 1 and t.kind in ("activation", "output"):  # spill (store)
                ax.plot([p.end + 1], [y + h / 2], marker="x", color="red", markersize=4)
    ax.axhline(plan.scratchpad_bytes / scale, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, max(1, len(order)))
    ax.set_ylim(0, plan.scratchpad_bytes / scale * 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"address ({unit})")
    tr = plan.traffic or {}
    ax.set_title(f"{g.model} | {plan.planner} | scratchpad {plan.scratchpad_bytes / scale:.2f} {unit} | "
                 f"non-compulsory {tr.get('non_compulsory_bytes', 0) / scale:.2f} {unit}  (x spill, > reload)",
                 fontsize=9)
    handles = [Rectangle((0, 0), 1, 1, facecolor=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
