"""How noisy each kind of label is, and whether it still says what a quiet machine measures.

`remeasure` times the same kernels in rounds, each round once per pinning (free to migrate, or under
`taskset` on one core), interleaved so that load drifts through every variant alike, and stores every
repetition's real and CPU time with the 1-minute load average at the start of the run. `summary` then reads,
for every label kind (iree.LABEL_KINDS) and pinning, the MAPE of one run's label predicting another run's
(the noise floor a perfect model would still show against those labels), and, for each kind, its error
against the quiet real time, which is what `latency_us` promises (`iree-benchmark-module
--device=local-sync` on a quiet machine): the median real time of the runs taken at the lowest load, and
the median real time of the repetitions that were not kept off their core (real time = CPU time)."""
from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from memfit.plan.cost import iree, metrics, store
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.parse import pick_function

SCHEMA = """CREATE TABLE IF NOT EXISTS noise_runs (key TEXT, round INTEGER, pin INTEGER, real TEXT, cpu TEXT,
  load REAL, at REAL, PRIMARY KEY (key, round, pin));"""
FREE = -1  # the pin column of runs not pinned


def remeasure(db: str | Path, n_kernels: int = 40, rounds: int = 3, pins: tuple[int | None, ...] = (None, 1),
              seed: int = 0, family: str | None = None, keys: list[str] | None = None,
              progress: bool = True) -> dict:
    """Time `n_kernels` kernels of the dataset (labelled or not; or exactly `keys`) `rounds` more times per
    pinning; resumes (runs already stored are kept). Returns `summary` over those kernels."""
    con = store.connect(db)
    con.executescript(SCHEMA)
    rows = [dict(r) for r in con.execute("SELECT k.key, k.family, k.mlir FROM kernels k LEFT JOIN labels l "
                                         "ON k.key = l.key WHERE l.error IS NULL ORDER BY k.rowid")]
    if keys is not None:
        by_key = {r["key"]: r for r in rows}
        rows = [by_key[k] for k in keys if k in by_key]
    else:
        rows = [r for r in rows if family in (None, r["family"])]
        random.Random(seed).shuffle(rows)
        rows = rows[:n_kernels]
    from tqdm import tqdm

    bar = tqdm(total=len(rows) * rounds * len(pins), disable=not progress, unit="run", dynamic_ncols=True)
    done = {(r[0], r[1], r[2]) for r in con.execute("SELECT key, round, pin FROM noise_runs")}
    measured = []
    for row in rows:
        todo = [(rd, FREE if p is None else p) for rd in range(rounds) for p in pins]
        todo = [t for t in todo if (row["key"], *t) not in done]
        if not todo:
            measured.append(row["key"])
            bar.update(rounds * len(pins))
            continue
        fn = pick_function(row["mlir"])
        with tempfile.TemporaryDirectory(prefix="memfit-cost-") as tmp:
            try:
                vmfb = iree.compile_mlir(row["mlir"], Path(tmp), dump=False)
            except CostModelError:
                bar.update(rounds * len(pins))
                continue  # kernels the compiler rejects have no time to measure
            for rd, pin in todo:
                load = os.getloadavg()[0]
                t = iree.benchmark(vmfb, fn, 5, 0.05, pin_cpu=None if pin == FREE else pin)
                con.execute("INSERT OR REPLACE INTO noise_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (row["key"], rd, pin, json.dumps(t.reps_us), json.dumps(t.cpu_reps_us), load,
                             time.time()))
                bar.update(1)
        con.commit()
        measured.append(row["key"])
    bar.close()
    return summary(con, measured)


def runs(con, keys: list[str] | None = None) -> dict[str, list[dict]]:
    """The stored runs per kernel: {key: [{pin, real, cpu, load}]}."""
    con.executescript(SCHEMA)
    want = None if keys is None else set(keys)
    out: dict[str, list[dict]] = {}
    for r in con.execute("SELECT key, pin, real, cpu, load FROM noise_runs ORDER BY key, round, pin"):
        if want is None or r["key"] in want:
            out.setdefault(r["key"], []).append({"pin": None if r["pin"] == FREE else r["pin"],
                                                 "real": json.loads(r["real"]), "cpu": json.loads(r["cpu"]),
                                                 "load": r["load"]})
    return out


def pair_mape(values: list[list[float]]) -> float | None:
    """Mean over kernels' ordered pairs of runs of |a - b| / b: one run predicting another."""
    pairs = [(a, b) for vals in values for i, a in enumerate(vals) for j, b in enumerate(vals) if i != j]
    return metrics.mape([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None


def summary(con, keys: list[str] | None = None, quiet_load: float | None = None) -> dict:
    """Noise floor per (pinning, label kind), and each kind's error against the quiet real time.

    The quiet reference of a kernel is the median real time of its runs at the lowest load (at most
    `quiet_load`, default: the 1-minute load of the quietest tenth of all runs); each of the kernel's other
    runs is a label under load, judged by its MAPE against that reference and by the median ratio (bias)."""
    by_key = runs(con, keys)
    out: dict = {"kernels": len(by_key), "noise": {}, "quiet": {}}
    pins = sorted({r["pin"] if r["pin"] is not None else FREE for v in by_key.values() for r in v})
    for pin in pins:
        name = "free" if pin == FREE else f"pinned_cpu{pin}"
        sel = {k: [r for r in v if (r["pin"] if r["pin"] is not None else FREE) == pin] for k, v in by_key.items()}
        out["noise"][name] = {kind: pair_mape([[iree.label_value(kind, r["real"], r["cpu"]) for r in v]
                                               for v in sel.values() if len(v) > 1])
                              for kind in iree.LABEL_KINDS}
    loads = sorted(r["load"] for v in by_key.values() for r in v)
    if not loads:
        return out
    limit = quiet_load if quiet_load is not None else loads[len(loads) // 10]
    errs: dict[str, list[float]] = {k: [] for k in iree.LABEL_KINDS}
    ratios: dict[str, list[float]] = {k: [] for k in iree.LABEL_KINDS}
    quiet_loads, loaded_loads = [], []
    for v in by_key.values():
        quiet = [r for r in v if r["load"] <= limit]
        rest = [r for r in v if r["load"] > limit]
        if not quiet or not rest:
            continue
        ref = statistics.median([statistics.median(r["real"]) for r in quiet])
        quiet_loads += [r["load"] for r in quiet]
        loaded_loads += [r["load"] for r in rest]
        for kind in iree.LABEL_KINDS:
            for r in rest:
                lab = iree.label_value(kind, r["real"], r["cpu"])
                errs[kind].append(abs(lab - ref) / ref)
                ratios[kind].append(lab / ref)
    out["undisturbed"] = _undisturbed(by_key)
    if quiet_loads:
        out["quiet"] = {"quiet_load_max": limit, "quiet_load_mean": sum(quiet_loads) / len(quiet_loads),
                        "loaded_load_mean": sum(loaded_loads) / len(loaded_loads), "runs_judged": len(loaded_loads),
                        "mape": {k: sum(e) / len(e) for k, e in errs.items()},
                        "median_ratio": {k: statistics.median(x) for k, x in ratios.items()}}
    return out


def _undisturbed(by_key: dict[str, list[dict]], slack: float = 1.02) -> dict:
    """A second quiet reference that needs no quiet machine: a repetition whose real time is within `slack`
    of its CPU time was not kept off its core, so its real time is a quiet one. Per kernel with at least
    two such repetitions, each run's label of each kind against their median real time."""
    errs: dict[str, list[float]] = {k: [] for k in iree.LABEL_KINDS}
    ratios: dict[str, list[float]] = {k: [] for k in iree.LABEL_KINDS}
    kernels = 0
    for v in by_key.values():
        ok = [a for r in v for a, c in zip(r["real"], r["cpu"]) if a <= slack * c]
        if len(ok) < 2:
            continue
        kernels += 1
        ref = statistics.median(ok)
        for r in v:
            for kind in iree.LABEL_KINDS:
                lab = iree.label_value(kind, r["real"], r["cpu"])
                errs[kind].append(abs(lab - ref) / ref)
                ratios[kind].append(lab / ref)
    if not kernels:
        return {"kernels": 0}
    return {"kernels": kernels, "mape": {k: sum(e) / len(e) for k, e in errs.items()},
            "median_ratio": {k: statistics.median(x) for k, x in ratios.items()}}


def floor(con) -> dict:
    """The noise floor of the file's own labels: the MAPE of one run's label predicting another's, for the
    file's label kind and pinning (from `remeasure`); files from before it hold real-time medians in the
    older `noise` table, read as such."""
    kind, pin = store.label_kind(con), store.meta(con).get("pin_cpu")
    s = summary(con)
    name = "free" if pin is None else f"pinned_cpu{pin}"
    if s["kernels"] and s["noise"].get(name, {}).get(kind) is not None:
        return {"label_kind": kind, "pinning": name, "kernels": s["kernels"], "noise_mape": s["noise"][name][kind],
                "by_kind": s["noise"], "quiet": s["quiet"]}
    by_key: dict[str, list[float]] = {}
    for r in con.execute("SELECT key, latency_us FROM noise ORDER BY key, run"):
        by_key.setdefault(r["key"], []).append(r["latency_us"])
    nf = pair_mape([v for v in by_key.values() if len(v) > 1])
    if nf is None:
        return {"kernels": 0}
    return {"label_kind": "real_median", "kernels": sum(len(v) > 1 for v in by_key.values()), "noise_mape": nf}
