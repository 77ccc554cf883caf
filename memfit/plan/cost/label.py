"""Label kernels with IREE: compile for llvm-cpu (assembly dumped), read the static figures, time the
function on local-sync. Runs in worker threads (each label is two subprocesses), shows a progress bar,
commits each label as it lands so an interrupted run resumes where it stopped; failures are stored with
the compiler's message and not retried."""
from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from memfit.plan.cost import iree, store
from memfit.plan.cost.asm import dump_figures
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.parse import pick_function


@dataclass
class LabelConfig:
    workers: int = 1          # 1 on a small shared machine: parallel timings disturb each other
    repetitions: int = 5
    min_time_s: float = 0.05  # per repetition; short kernels get many iterations
    limit: int | None = None
    family: str | None = None  # label only this family now (the rest stays for a later run)


@dataclass
class Measurement:
    latency_us: float
    spread: float
    reps: list[float]
    figures: dict
    seconds: float


def measure(mlir: str, function: str | None = None, repetitions: int = 5, min_time_s: float = 0.05,
            extra_flags: tuple[str, ...] = ()) -> Measurement:
    """Compile and time one program (the `measure` command and every label)."""
    t0 = time.perf_counter()
    fn = pick_function(mlir, function)
    with tempfile.TemporaryDirectory(prefix="memfit-cost-") as tmp:
        vmfb = iree.compile_mlir(mlir, Path(tmp), extra_flags)
        figures = dump_figures(Path(tmp) / "dump")
        timing = iree.benchmark(vmfb, fn, repetitions, min_time_s)
    # process CPU time beside the real time: on a shared machine it shows when a label was disturbed
    figures["cpu_us"] = sorted(timing.cpu_reps_us)[len(timing.cpu_reps_us) // 2]
    return Measurement(timing.median_us, timing.spread, timing.reps_us, figures, time.perf_counter() - t0)


def label_all(db: str | Path, cfg: LabelConfig, progress: bool = True) -> dict:
    """Label every unlabelled kernel of the dataset; returns the dataset's counts afterwards."""
    con = store.connect(db)
    version, cpu = iree.version(), iree.host_cpu()
    old = store.meta(con)
    if old.get("iree_version") not in (None, version) or old.get("host_cpu") not in (None, cpu):
        raise CostModelError(f"{db} was labelled with IREE {old.get('iree_version')} on {old.get('host_cpu')}; "
                             f"this is IREE {version} on {cpu}: label into a new file")
    store.set_meta(con, iree_version=version, host_cpu=cpu, device="local-sync", target_cpu="host")
    todo = [r for r in store.unlabelled(con) if cfg.family in (None, r["family"])][:cfg.limit]
    bar = _bar(len(todo), progress)
    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        futures = {pool.submit(_one, row["mlir"], cfg): row["key"] for row in todo}
        for fut in as_completed(futures):
            key = futures[fut]
            result = fut.result()
            if isinstance(result, Measurement):
                store.put_label(con, key, latency_us=result.latency_us, spread=result.spread, reps=result.reps,
                                figures=result.figures, iree_version=version, host_cpu=cpu,
                                seconds=result.seconds)
            else:
                store.put_label(con, key, error=result, iree_version=version, host_cpu=cpu)
            bar.update(1)
    bar.close()
    return store.counts(con)


def _one(mlir: str, cfg: LabelConfig) -> Measurement | str:
    try:
        return measure(mlir, None, cfg.repetitions, cfg.min_time_s)
    except CostModelError as exc:
        return str(exc)


def noise_floor(db: str | Path, n_kernels: int = 30, runs: int = 3, seed: int = 0, progress: bool = True,
                keys: list[str] | None = None) -> dict:
    """Time `n_kernels` labelled kernels again (or exactly the kernels `keys`, in that order), `runs`
    separate times each (fresh process per run), and store the latencies. The noise floor is the MAPE of one
    run predicting another: the error a perfect model would still show against these labels."""
    import random

    con = store.connect(db)
    rows = store.labelled(con)
    if keys is not None:
        by_key = {r["key"]: r for r in rows}
        rows = [by_key[k] for k in keys if k in by_key]
    else:
        random.Random(seed).shuffle(rows)
        rows = rows[:n_kernels]
    bar = _bar(len(rows) * runs, progress)
    for row in rows:
        fn = pick_function(row["mlir"])
        with tempfile.TemporaryDirectory(prefix="memfit-cost-") as tmp:
            vmfb = iree.compile_mlir(row["mlir"], Path(tmp), dump=False)
            for run in range(runs):
                t = iree.benchmark(vmfb, fn, 5, 0.05)
                con.execute("INSERT OR REPLACE INTO noise VALUES (?, ?, ?)", (row["key"], run, t.median_us))
                bar.update(1)
        con.commit()
    bar.close()
    return noise_summary(con, [r["key"] for r in rows])


def noise_summary(con, keys: list[str] | None = None) -> dict:
    """Over the noise table (or its rows of `keys`): the MAPE of one run predicting another, and the
    median (max - min) / median spread of a kernel's runs."""
    by_key: dict[str, list[float]] = {}
    want = None if keys is None else set(keys)
    for r in con.execute("SELECT key, latency_us FROM noise ORDER BY key, run"):
        if want is None or r["key"] in want:
            by_key.setdefault(r["key"], []).append(r["latency_us"])
    pair_errors, spreads = [], []
    for vals in by_key.values():
        if len(vals) < 2:
            continue
        pair_errors += [abs(a - b) / b for i, a in enumerate(vals) for j, b in enumerate(vals) if i != j]
        spreads.append((max(vals) - min(vals)) / sorted(vals)[len(vals) // 2])
    if not pair_errors:
        return {"kernels": 0}
    spreads.sort()
    return {"kernels": len(spreads), "runs": max(len(v) for v in by_key.values()),
            "noise_mape": sum(pair_errors) / len(pair_errors), "median_spread": spreads[len(spreads) // 2]}


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="kernel", dynamic_ncols=True)
