"""Label kernels with IREE: compile for llvm-cpu (assembly dumped), read the static figures, time the
function on local-sync. Runs in worker threads (each label is two subprocesses), shows a progress bar,
commits each label as it lands so an interrupted run resumes where it stopped; failures are stored with
the compiler's message and not retried. With a compiled-module store (`compiled.py`) the compiles can run
first, in parallel (`compile_only`), and the timings later in one quiet stretch."""
from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from memfit.plan.cost import iree, store
from memfit.plan.cost.compiled import CompiledStore
from memfit.plan.cost.errors import CostModelError, HarnessError, IreeMissingError
from memfit.plan.cost.parse import pick_function


@dataclass
class LabelConfig:
    workers: int = 1          # 1 on a small shared machine: parallel timings disturb each other
    repetitions: int = 5
    min_time_s: float = 0.05  # per repetition; short kernels get many iterations
    limit: int | None = None
    family: str | None = None  # label only this family now (the rest stays for a later run)
    label_kind: str = iree.DEFAULT_LABEL_KIND  # which time is the label (iree.LABEL_KINDS)
    pin_cpu: int | None = None  # run the timings under taskset on this core
    compiled_dir: str | None = None  # keep compiled modules here and reuse them (compiled.py)
    compile_only: bool = False  # fill compiled_dir and time nothing (no quiet machine needed: workers > 1)


@dataclass
class Measurement:
    latency_us: float  # the label: `label_kind` of the repetitions
    spread: float
    reps: list[float]  # real time per call of each repetition (us)
    figures: dict
    seconds: float


def measure(mlir: str, function: str | None = None, repetitions: int = 5, min_time_s: float = 0.05,
            extra_flags: tuple[str, ...] = (), label_kind: str = iree.DEFAULT_LABEL_KIND,
            pin_cpu: int | None = None, compiled: CompiledStore | None = None) -> Measurement:
    """Compile and time one program (the `measure` command and every label); its latency is the
    `label_kind` of the repetitions, and the figures keep every repetition's CPU time beside the real
    times, so any other kind can be read off the same label later. With `compiled`, the module comes from
    (or goes into) that store and `seconds` counts only what this call did."""
    iree.label_value(label_kind, [1.0], [1.0])  # an unknown kind fails before the compile
    t0 = time.perf_counter()
    fn = pick_function(mlir, function)
    with tempfile.TemporaryDirectory(prefix="memfit-cost-") as tmp:  # without a store: one of its own, dropped after
        vmfb, figures = (compiled or CompiledStore(Path(tmp))).compile(mlir, extra_flags)
        timing = iree.benchmark(vmfb, fn, repetitions, min_time_s, pin_cpu=pin_cpu)
    # process CPU time beside the real time: on a shared machine it shows when a label was disturbed
    figures["cpu_us"] = sorted(timing.cpu_reps_us)[len(timing.cpu_reps_us) // 2]
    figures["cpu_reps"] = timing.cpu_reps_us
    figures["real_median_us"] = timing.median_us
    return Measurement(timing.label(label_kind), timing.spread, timing.reps_us, figures,
                       time.perf_counter() - t0)


def label_all(db: str | Path, cfg: LabelConfig, progress: bool = True) -> dict:
    """Label every unlabelled kernel of the dataset; returns the dataset's counts afterwards."""
    con = store.connect(db)
    version, cpu = iree.version(), iree.host_cpu()
    old = store.meta(con)
    if old.get("iree_version") not in (None, version) or old.get("host_cpu") not in (None, cpu):
        raise CostModelError(f"{db} was labelled with IREE {old.get('iree_version')} on {old.get('host_cpu')}; "
                             f"this is IREE {version} on {cpu}: label into a new file")
    had = store.label_kind(con) if store.counts(con)["labelled"] else None
    if had not in (None, cfg.label_kind):
        raise CostModelError(f"{db} holds labels of kind {had}, not {cfg.label_kind}: label into a new file "
                             f"or pass --label-kind {had}")
    store.set_meta(con, iree_version=version, host_cpu=cpu, device="local-sync", target_cpu="host",
                   label_kind=cfg.label_kind, pin_cpu=cfg.pin_cpu)
    todo = [r for r in store.unlabelled(con) if cfg.family in (None, r["family"])][:cfg.limit]
    if cfg.compile_only:
        return _compile_all(con, todo, cfg, progress)
    bar = _bar(len(todo), progress)
    _in_pool(cfg.workers, lambda row: _one(row["mlir"], cfg), todo,
             lambda row, fut: _store_label(con, row["key"], fut.result(), version, cpu, bar))
    bar.close()
    return store.counts(con)


def _in_pool(workers: int, fn, items: list, on_done) -> None:
    """`fn(item)` for every item on `workers` threads, `on_done(item, future)` as each finishes. On Ctrl-C (or an
    error that stops the run, a HarnessError) the calls not yet started are dropped: leaving the pool waits for
    its queue, so it would otherwise compile or time (and not store) every kernel left."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fn, item): item for item in items}
        try:
            for fut in as_completed(futures):
                on_done(futures[fut], fut)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


def _store_label(con, key: str, result: Measurement | str, version: str, cpu: str, bar) -> None:
    """Commit one label as its timing lands (so an interrupted run resumes)."""
    if isinstance(result, Measurement):
        store.put_label(con, key, latency_us=result.latency_us, spread=result.spread, reps=result.reps,
                        figures=result.figures, iree_version=version, host_cpu=cpu, seconds=result.seconds)
    else:
        store.put_label(con, key, error=result, iree_version=version, host_cpu=cpu)
    bar.update(1)


def _compile_all(con, todo: list, cfg: LabelConfig, progress: bool) -> dict:
    """Compile every kernel still to label into the store, timing nothing; a kernel the compiler rejects is
    counted and left unlabelled (the timing run stores the compiler's message as its label's error)."""
    if cfg.compiled_dir is None:
        raise CostModelError("compiling only needs a directory to keep the modules in (--compiled DIR)")
    compiled, failed = CompiledStore(Path(cfg.compiled_dir)), 0
    bar = _bar(len(todo), progress)

    def done(row, fut) -> None:
        nonlocal failed
        if fut.exception() is not None:
            if not isinstance(fut.exception(), CostModelError):
                raise fut.exception()
            failed += 1
        bar.update(1)

    _in_pool(cfg.workers, lambda row: compiled.compile(row["mlir"]), todo, done)
    bar.close()
    return {**store.counts(con), "compiled": len(todo) - failed, "compile_failed": failed}


def _one(mlir: str, cfg: LabelConfig) -> Measurement | str:
    compiled = CompiledStore(Path(cfg.compiled_dir)) if cfg.compiled_dir else None
    try:
        return measure(mlir, None, cfg.repetitions, cfg.min_time_s, label_kind=cfg.label_kind, pin_cpu=cfg.pin_cpu,
                       compiled=compiled)
    except (HarnessError, IreeMissingError):  # the machine's fault, not the kernel's: stop, store nothing
        raise
    except CostModelError as exc:  # the kernel's own failure (the compiler's message): its label, not retried
        return str(exc)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="kernel", dynamic_ncols=True)
