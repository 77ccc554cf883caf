"""A memory timeline: one row per engine step (KV committed / used / waste bytes, tokens held, RSS, queue
lengths ...), written as JSON lines, a PNG plot, or a Chrome trace-event file that Perfetto (ui.perfetto.dev)
and chrome://tracing open as counter tracks. The probes it reads are in measure.py.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memfit.memory.measure import rss_bytes


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v))


class MemoryTimeline:
    """Per-step memory rows: {"step", "time_s", "rss_bytes", **fields}.

    `record(**fields)` numbers the step (unless `step=` is given), stamps `time_s` (monotonic seconds since
    the timeline was created) and `rss_bytes` (unless given, or `track_rss=False`). Fields named `*_bytes`
    are plotted in MiB; other numeric fields (counts) on a second axis. With `jsonl_path`, each row is
    also appended to that file and flushed as it is recorded, so a long run can be watched (`tail -f`).
    Thread-safe: an engine loop and a server thread may both record.
    """

    def __init__(self, jsonl_path: str | os.PathLike | None = None, *, track_rss: bool = True,
                 append: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.track_rss = track_rss
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._file = None
        if jsonl_path is not None:
            path = Path(jsonl_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (held open)
            self._finalizer = weakref.finalize(self, self._file.close)

    # recording ---------------------------------------------------------------------------------------

    def record(self, **fields: Any) -> dict[str, Any]:
        """Add one row; returns it. Values should be JSON-serialisable (numbers for plotting/tracing)."""
        now = time.monotonic() - self._t0
        rss = rss_bytes() if self.track_rss and "rss_bytes" not in fields else None
        with self._lock:
            row: dict[str, Any] = {"step": fields.pop("step", len(self.rows)), "time_s": round(now, 6)}
            if rss is not None:
                row["rss_bytes"] = rss
            row.update(fields)
            self.rows.append(row)
            if self._file is not None:
                self._file.write(json.dumps(row) + "\n")
                self._file.flush()
        return row

    def close(self) -> None:
        """Close the streaming file (if any); recording afterwards keeps rows in memory only."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> MemoryTimeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.rows)

    def fields(self) -> list[str]:
        """Numeric fields seen in any row (besides step and time_s), in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for key, value in row.items():
                if key not in ("step", "time_s") and _is_number(value) and not isinstance(value, bool):
                    seen.setdefault(key, None)
        return list(seen)

    # JSON lines --------------------------------------------------------------------------------------

    def write_jsonl(self, path: str | os.PathLike) -> Path:
        """All rows, one JSON object per line."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)
        return path

    @classmethod
    def read_jsonl(cls, path: str | os.PathLike) -> MemoryTimeline:
        """A timeline holding the rows of a JSON-lines file (blank lines skipped)."""
        timeline = cls(track_rss=False)
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object: {e.msg}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
                timeline.rows.append(row)
        return timeline

    # PNG ---------------------------------------------------------------------------------------------

    def plot(self, path_png: str | os.PathLike, fields: Iterable[str] | None = None, *,
             x: str = "time_s", title: str = "memory timeline") -> Path:
        """Draw the timeline: `*_bytes` fields in MiB on the left axis, other (count) fields on the right.
        KV committed is the outer line, used the filled area under it, waste the dashed line."""
        return _plot_rows(self.rows, Path(path_png), list(fields) if fields else self.fields(), x, title)

    # Perfetto ----------------------------------------------------------------------------------------

    def to_perfetto(self, path: str | os.PathLike, process_name: str = "memfit") -> Path:
        """Chrome trace-event JSON: one counter track ("ph": "C") per numeric field, one event per row,
        timestamps in microseconds. Byte counts are written as bytes (the track name says so)."""
        pid = os.getpid()
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": process_name}},
        ]
        names = self.fields()
        for row in self.rows:
            ts = float(row.get("time_s", 0.0)) * 1e6
            for name in names:
                value = row.get(name)
                if _is_number(value) and not isinstance(value, bool):
                    events.append({"name": name, "ph": "C", "ts": ts, "pid": pid, "tid": 0, "args": {name: value}})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        return path


# -- plotting ----------------------------------------------------------------------------------------------

# How the KV fields read at a glance: committed is the envelope, used fills under it, waste is the gap.
_STYLES: dict[str, dict[str, Any]] = {
    "kv_committed_bytes": {"color": "tab:blue", "linewidth": 2.0, "label": "KV committed"},
    "kv_used_bytes": {"color": "tab:green", "linewidth": 1.2, "label": "KV used", "fill": True},
    "kv_waste_bytes": {"color": "tab:red", "linewidth": 1.2, "linestyle": "--", "label": "KV waste"},
    "rss_bytes": {"color": "tab:gray", "linewidth": 1.0, "linestyle": ":", "label": "process RSS"},
}
_MIB = 1024.0**2


def _plot_rows(rows: list[dict[str, Any]], path: Path, fields: list[str], x: str, title: str) -> Path:
    # The object-oriented API with an Agg canvas: no pyplot, so the caller's matplotlib backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if x not in ("time_s", "step"):
        raise ValueError(f"x must be 'time_s' or 'step', got {x!r}")
    unknown = [f for f in fields if not any(f in r for r in rows)]
    if unknown:
        raise ValueError(f"no row has the field(s) {unknown}; recorded fields: {sorted({k for r in rows for k in r})}")
    fig = Figure(figsize=(10, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    byte_fields = [f for f in fields if f.endswith("_bytes")]
    count_fields = [f for f in fields if not f.endswith("_bytes")]
    # draw order: used (filled) under committed, then the rest
    byte_fields.sort(key=lambda f: list(_STYLES).index(f) if f in _STYLES else len(_STYLES))

    def series(name: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
        pts = [(float(r[x]), float(r[name]) / scale) for r in rows if x in r and _is_number(r.get(name))]
        return [p[0] for p in pts], [p[1] for p in pts]

    for name in byte_fields:
        xs, ys = series(name, _MIB)
        style = dict(_STYLES.get(name, {"linewidth": 1.2, "label": name.removesuffix("_bytes")}))
        fill = style.pop("fill", False)
        (line,) = ax.plot(xs, ys, drawstyle="steps-post", **style)
        if fill:
            ax.fill_between(xs, ys, step="post", alpha=0.25, color=line.get_color(), linewidth=0)
    ax.set_xlabel("time (s)" if x == "time_s" else "engine step")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if count_fields:
        ax2 = ax.twinx()
        for i, name in enumerate(count_fields):
            xs, ys = series(name)
            ax2.plot(xs, ys, drawstyle="steps-post", linewidth=0.9, alpha=0.8, color=f"C{(i + 4) % 10}", label=name)
        ax2.set_ylabel("count")
        ax2.set_ylim(bottom=0)
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper left", fontsize=8, framealpha=0.85)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
