"""The loss curve of a fine-tuning run: PNG (matplotlib, Agg) and JSON side by side."""
from __future__ import annotations

import json
from pathlib import Path


def write_loss_curve(losses: list[float], png: str | Path, title: str = "", skipped: list[int] | None = None) -> Path:
    """Draw loss per step (from step 0) to `png` and write the numbers to the same name with .json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(range(1, len(losses) + 1), losses, marker="." if len(losses) < 200 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    png.with_suffix(".json").write_text(json.dumps({"losses": losses, "skipped_steps": skipped or []}, indent=1))
    return png
