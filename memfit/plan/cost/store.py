"""The dataset: one SQLite file (stdlib, safe to append to from a resumed run). Tables:
- meta: key/value (IREE version, host CPU, generator seed, measured peaks);
- kernels: the generated programs (family, dtype, shape key, parameters, MLIR text);
- labels: one row per labelled kernel (latency median, spread and repetitions; static figures; or the error);
- noise: repeated latency measurements of the same kernels (the label noise floor)."""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.families import KernelSpec
from memfit.plan.cost.iree import label_value

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS kernels (key TEXT PRIMARY KEY, family TEXT, dtype TEXT, shape_key TEXT,
  params TEXT, mlir TEXT);
CREATE TABLE IF NOT EXISTS labels (key TEXT PRIMARY KEY, latency_us REAL, spread REAL, reps TEXT,
  figures TEXT, iree_version TEXT, host_cpu TEXT, error TEXT, seconds REAL, labelled_at REAL);
CREATE TABLE IF NOT EXISTS noise (key TEXT, run INTEGER, latency_us REAL, PRIMARY KEY (key, run));
"""


def connect(path: str | Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(str(path), timeout=60)
        con.row_factory = sqlite3.Row
        con.executescript(SCHEMA)
    except sqlite3.DatabaseError as exc:  # not an SQLite file, or a path where none can be opened or made
        raise CostModelError(f"{path} is not a dataset memfit can open ({exc}); give the file `memfit costmodel "
                             "generate --out` wrote, or a new path to create one") from None
    return con


def set_meta(con: sqlite3.Connection, **values: object) -> None:
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])
    con.commit()


def meta(con: sqlite3.Connection) -> dict:
    return {r["key"]: json.loads(r["value"]) for r in con.execute("SELECT key, value FROM meta")}


def add_kernels(con: sqlite3.Connection, specs: Iterable[KernelSpec]) -> int:
    """Insert kernels not already there; returns how many were new."""
    rows = [(s.key(), s.family, s.dtype, s.shape_key(), json.dumps(s.params), s.mlir()) for s in specs]
    before = con.total_changes
    con.executemany("INSERT OR IGNORE INTO kernels VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    return con.total_changes - before


def unlabelled(con: sqlite3.Connection) -> list[sqlite3.Row]:
    return list(con.execute("SELECT k.* FROM kernels k LEFT JOIN labels l ON k.key = l.key "
                            "WHERE l.key IS NULL ORDER BY k.rowid"))


def put_label(con: sqlite3.Connection, key: str, *, latency_us: float | None = None, spread: float | None = None,
              reps: list[float] | None = None, figures: dict | None = None, iree_version: str = "",
              host_cpu: str = "", error: str | None = None, seconds: float = 0.0) -> None:
    con.execute("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, latency_us, spread, json.dumps(reps or []), json.dumps(figures or {}), iree_version,
                 host_cpu, error, seconds, time.time()))
    con.commit()


def label_kind(con: sqlite3.Connection) -> str:
    """Which time the labels' latency_us is (iree.LABEL_KINDS); files labelled before it was recorded hold
    the median real time."""
    return meta(con).get("label_kind", "real_median")


def labelled(con: sqlite3.Connection, kind: str | None = None) -> list[dict]:
    """Every kernel with a good label, as dicts (figures unpacked). With `kind`, latency_us is that kind
    read off the stored repetitions (the file's own kind stays in `stored_latency_us`); a label without the
    repetitions that kind needs (CPU times were first stored as their median only) raises."""
    own = label_kind(con) if kind is not None else None
    rows = con.execute("SELECT k.key, k.family, k.dtype, k.shape_key, k.params, k.mlir, l.latency_us, l.spread, "
                       "l.figures, l.reps FROM kernels k JOIN labels l ON k.key = l.key WHERE l.error IS NULL "
                       "ORDER BY k.rowid")
    out = []
    for r in rows:
        d = dict(r)
        d["params"] = json.loads(d["params"])
        d["reps"] = json.loads(d["reps"] or "[]")  # each repetition's real time per call (us)
        d.update(json.loads(d.pop("figures")))
        if kind is not None and kind != own:
            cpu = d.get("cpu_reps") or ([d["cpu_us"]] if kind == "cpu_median" and "cpu_us" in d else [])
            d["stored_latency_us"] = d["latency_us"]
            d["latency_us"] = label_value(kind, d["reps"], cpu)
        out.append(d)
    return out


def first_keys(con: sqlite3.Connection, n: int) -> set[str]:
    """The keys of the file's first `n` kernels, in the order they were drawn (added)."""
    if n < 1:
        raise ValueError(f"the first n kernels needs n >= 1 (got {n})")
    return {r[0] for r in con.execute("SELECT key FROM kernels ORDER BY rowid LIMIT ?", (n,))}


def counts(con: sqlite3.Connection) -> dict:
    one = lambda q: con.execute(q).fetchone()[0]  # noqa: E731
    return {"kernels": one("SELECT COUNT(*) FROM kernels"),
            "labelled": one("SELECT COUNT(*) FROM labels WHERE error IS NULL"),
            "failed": one("SELECT COUNT(*) FROM labels WHERE error IS NOT NULL")}
