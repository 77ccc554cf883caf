"""`memfit costmodel`: generate, label, train, predict, measure, eval (and tune: rank compilation choices)."""
from __future__ import annotations

import argparse
import json
import shutil
import sys


JSON_HELP = "print one JSON object on stdout"


def register(subparsers) -> None:
    p = subparsers.add_parser("costmodel", help="a learned cost model of MLIR kernels on IREE llvm-cpu",
                              description="memfit costmodel generate|label|train|predict|measure|eval|tune|train-ranker")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    g = sub.add_parser("generate", help="draw N kernels into a dataset (SQLite)")
    g.add_argument("--n", type=int, required=True, help="kernels to draw")
    g.add_argument("--out", required=True, help="dataset file (created, or extended)")
    g.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    g.add_argument("--family", help="draw kernels of this family only (added to the file's other kernels)")
    lb = sub.add_parser("label", help="compile and time every unlabelled kernel with IREE (resumable)")
    lb.add_argument("--db", required=True, help="dataset file (from generate)")
    lb.add_argument("--workers", type=int, default=1, help="parallel labels (default 1: timings disturb "
                                                           "each other on a small machine)")
    lb.add_argument("--repetitions", type=int, default=5, help="timed repetitions per kernel (default 5)")
    lb.add_argument("--min-time", type=float, default=0.05, help="seconds per repetition (default 0.05)")
    lb.add_argument("--limit", type=int, help="label at most this many now")
    lb.add_argument("--family", help="label only this family now")
    lb.add_argument("--label-kind", default=None, choices=("real_median", "real_min", "cpu_median", "cpu_min"),
                    help="which time is the label (default cpu_median: the least disturbed by other jobs; "
                         "docs/costmodel.md)")
    lb.add_argument("--pin-cpu", type=int, metavar="CPU", help="time under taskset on this core")
    lb.add_argument("--noise", type=int, default=0, metavar="K",
                    help="also time K labelled kernels 3 more times each, free and pinned to one core: the "
                         "noise floor of every label kind")
    lb.add_argument("--compiled", metavar="DIR", help="keep the compiled modules in DIR and reuse them (compile "
                                                       "once, time later: see --compile-only)")
    lb.add_argument("--compile-only", action="store_true",
                    help="only compile the kernels still to label into --compiled DIR (no timing, so --workers "
                         "can be the core count); then run label again with --compiled DIR on a quiet machine")
    lb.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = sub.add_parser("train", help="train the sequence model (and the baselines) on held-out shapes")
    t.add_argument("--db", required=True, help="labelled dataset file")
    t.add_argument("--out", help="model file (default: the one shipped in the package)")
    t.add_argument("--epochs", type=int, default=40, help="training epochs of the sequence model (default 40)")
    t.add_argument("--seed", type=int, default=0, help="the held-out shapes' split and the fits (default 0)")
    t.add_argument("--families", action="store_true", help="also hold out each family in turn")
    from memfit.plan.cost.vtiles import DEFAULT_RULES, RULES, RULES_HELP

    t.add_argument("--vtile-rules", choices=tuple(RULES), default=DEFAULT_RULES, help=RULES_HELP)
    t.add_argument("--json", action="store_true", help=JSON_HELP)
    for name, hlp in (("predict", "predict a function's figures (no compile: works without IREE)"),
                      ("measure", "compile and time a function with IREE (checks a prediction)")):
        q = sub.add_parser(name, help=hlp)
        q.add_argument("file", help="an .mlir file")
        q.add_argument("--function", help="default: the module's only public function")
        q.add_argument("--json", action="store_true", help=JSON_HELP)
        if name == "predict":
            q.add_argument("--model", help="model file (default: the shipped one)")
        else:
            q.add_argument("--repetitions", type=int, default=5, help="timed repetitions (default 5)")
    e = sub.add_parser("eval", help="MAPE, Spearman, Kendall per family on the held-out shapes, and a plot")
    e.add_argument("--db", required=True, help="labelled dataset file")
    e.add_argument("--model", help="model file (default: the shipped one)")
    e.add_argument("--plot", help="PNG of predicted against measured latency")
    e.add_argument("--seed", type=int, default=0, help="the held-out shapes' split (default 0)")
    e.add_argument("--json", action="store_true", help=JSON_HELP)
    tn = sub.add_parser("tune", help="rank candidate tile sizes of a matmul by the model (--measure: time all)")
    tn.add_argument("file", help="an .mlir file with one matmul")
    tn.add_argument("--function", help="default: the module's only public function")
    tn.add_argument("--model", help="model file (default: the shipped one)")
    tn.add_argument("--measure", action="store_true", help="also compile and time every candidate (IREE)")
    tn.add_argument("--out", help="write the picked program here")
    tn.add_argument("--ranker", help="tile ranker file (default: the shipped one)")
    tn.add_argument("--no-ranker", action="store_true", help="rank by the sequence model's latency instead")
    tn.add_argument("--json", action="store_true", help=JSON_HELP)
    tr = sub.add_parser("train-ranker", help="train the tile ranker on the dataset's tuning candidates")
    tr.add_argument("--db", required=True, help="labelled dataset file (its tuned_matmul candidates)")
    tr.add_argument("--out", help="ranker file (default: the one shipped in the package)")
    tr.add_argument("--objective", choices=("relative", "lambdarank"), default="relative",
                    help="relative: regression on each candidate's log latency less its shape's mean (default); "
                         "lambdarank: LightGBM's listwise ranking")
    tr.add_argument("--features", choices=("compact", "all"), default="compact",
                    help="compact: shape, tile, padding, divisibility (the shipped ranker); all: every tile feature")
    tr.add_argument("--target", choices=("median", "min"), default="median",
                    help="train on the median repetition (the label) or the fastest one")
    tr.add_argument("--seed", type=int, default=0, help="the held-out shapes' split and the fit (default 0)")
    tr.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memfit.errors import refuse
    from memfit.plan.cost.errors import CostModelError

    try:
        return {"generate": _generate, "label": _label, "train": _train, "predict": _predict,
                "measure": _measure, "eval": _eval, "tune": _tune,
                "train-ranker": _train_ranker}[args.action](args)
    except (CostModelError, FileNotFoundError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError) as exc:
        return refuse(args, exc)
    except KeyboardInterrupt:  # only label has anything saved to resume
        from memfit.errors import interrupted

        return interrupted(args, "interrupted: labels so far are saved; run the same command to resume"
                           if args.action == "label" else "interrupted")


def _generate(args) -> int:
    from memfit.plan.cost import families, store
    from memfit.plan.cost.errors import CostModelError

    if args.n < 1:
        raise CostModelError(f"--n must be at least 1 kernel (got {args.n})")
    if args.n > 1_000_000:  # each kernel is a compile and a timing: a typo's extra zeros would never finish
        raise CostModelError(f"--n at most 1000000 kernels (got {args.n})")
    if args.family is not None and args.family not in families.FAMILIES:
        raise CostModelError(f"unknown family {args.family!r}; choose one of {', '.join(families.FAMILIES)}")
    con = store.connect(args.out)
    new = store.add_kernels(con, families.generate(args.n, seed=args.seed, family=args.family))
    # every draw that went into the file, in order (`seed` stays the first draw's, as files before had it)
    draws = [*store.meta(con).get("draws", []), {"n": args.n, "seed": args.seed, "family": args.family, "new": new}]
    store.set_meta(con, seed=store.meta(con).get("seed", args.seed), draws=draws)
    print(f"{args.out}: {new} new kernels ({store.counts(con)['kernels']} in all)")
    return 0


def _label(args) -> int:
    from pathlib import Path

    from memfit.plan.cost import label, store
    from memfit.plan.cost.errors import CostModelError
    from memfit.plan.cost.families import FAMILIES, TUNED
    from memfit.plan.cost.roofline import measure_peaks

    from memfit.plan.cost.iree import DEFAULT_LABEL_KIND

    # refused before any kernel is timed: --repetitions 0 marked each kernel it reached as failed in the dataset
    if not Path(args.db).is_file():  # labelling a new, empty file would 'succeed' with 0 kernels
        raise CostModelError(f"no dataset at {args.db}: run `memfit costmodel generate --out {args.db}` first")
    for flag, value, least in (("--workers", args.workers, 1), ("--repetitions", args.repetitions, 1),
                               ("--limit", args.limit, 0), ("--noise", args.noise, 0)):
        if value is not None and value < least:
            raise CostModelError(f"{flag} must be at least {least} (got {value})")
    if not args.min_time > 0 or args.min_time == float("inf"):
        raise CostModelError(f"--min-time must be a positive number of seconds (got {args.min_time})")
    if args.family is not None and args.family not in (*FAMILIES, TUNED):  # tuned_matmul: the tile candidates
        raise CostModelError(f"unknown family {args.family!r}; choose one of {', '.join((*FAMILIES, TUNED))}")
    if args.pin_cpu is not None:  # taskset's refusal was stored as every kernel's label, never retried
        allowed = _cpus()
        if args.pin_cpu not in allowed:
            raise CostModelError(f"--pin-cpu {args.pin_cpu}: this process may run only on CPUs "
                                 f"{_cpu_list(allowed)}; pick one of those")
        if shutil.which("taskset") is None:  # the timings would run unpinned while the data set records the pin
            raise CostModelError("--pin-cpu needs the taskset command (util-linux), which is not on PATH: install it "
                                 "or label without --pin-cpu")
    if args.compiled:  # a file there was a NotADirectoryError traceback when the first module was stored
        compiled = Path(args.compiled).absolute()
        above = next((p for p in (compiled, *compiled.parents) if p.exists()), None)
        if above is not None and not above.is_dir():
            raise CostModelError(f"--compiled {args.compiled}: {'it' if above == compiled else above} is a file, "
                                 f"not a directory")
    if args.compile_only and not args.compiled:
        raise CostModelError("--compile-only needs --compiled DIR (where the modules are kept for the timing run)")
    if args.compile_only and args.noise:
        raise CostModelError("--noise times kernels: run it with the timing run, not with --compile-only")
    cfg = label.LabelConfig(args.workers, args.repetitions, args.min_time, args.limit, args.family,
                            args.label_kind or DEFAULT_LABEL_KIND, args.pin_cpu, args.compiled, args.compile_only)
    counts = label.label_all(args.db, cfg, progress=not args.no_progress)
    if args.compile_only:
        print(json.dumps(counts))  # nothing timed: no peaks, no noise
        return 0
    con = store.connect(args.db)
    if "peaks" not in store.meta(con):
        store.set_meta(con, peaks=measure_peaks().__dict__)
    out = {**counts, "peaks": store.meta(con)["peaks"]}
    if args.noise:
        from memfit.plan.cost import noise

        # every label kind, free and pinned to the last core this process may use, 3 rounds: docs/costmodel.md's
        # noise table
        noise.remeasure(args.db, args.noise, 3, (None, max(_cpus())), progress=not args.no_progress)
        out["noise"] = noise.floor(con)
    print(json.dumps(out))
    return 0


def _cpus() -> set[int]:
    """The CPUs this process may run on (its affinity: a container's or taskset's share, not the machine's)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def _cpu_list(cpus: set[int]) -> str:
    """CPUs as taskset and /proc write them: '0-3,8'."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _train(args) -> int:
    from memfit.plan.cost.families import FAMILIES
    from memfit.plan.cost.fit import FitConfig
    from memfit.plan.cost.train import DEFAULT_MODEL, TrainConfig, train

    from memfit.plan.cost.errors import CostModelError

    if args.epochs < 1:
        raise CostModelError(f"--epochs must be at least 1 (got {args.epochs})")
    # the default, in the package, may be read-only; the model written over the dataset would lose every label
    _check_output(str(args.out or DEFAULT_MODEL), "--out", inputs=(("--db", args.db),))
    cfg = TrainConfig(FitConfig(epochs=args.epochs, seed=args.seed), families=FAMILIES if args.families else (),
                      vtile_rules=args.vtile_rules)
    result = train(args.db, args.out or DEFAULT_MODEL, cfg, verbose=True)
    result.pop("shapes_predictions")
    if args.json:
        print(json.dumps(result))
    else:
        from memfit.plan.cost.evaluate import table

        print(table({k: v for k, v in result["shapes"].items() if not k.startswith("_")}))
        print(f"model: {result['model']} ({result['model_bytes']} bytes)")
    return 0


def _check_output(path: str | None, option: str, suffixes: tuple[str, ...] | None = None,
                  inputs: tuple[tuple[str, str | None], ...] = ()) -> None:
    """An output path that cannot be written, or that names one of the command's `inputs` ((option, path) pairs:
    the output would be written over it), refused before the work (training, tuning) that ends in writing it."""
    from memfit.errors import distinct_output, output_path
    from memfit.plan.cost.errors import CostModelError

    if path:
        try:
            output_path(path, option, suffixes)
            distinct_output(path, option, *inputs)
        except ValueError as exc:
            raise CostModelError(str(exc)) from None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _predict(args) -> int:
    from memfit.plan.cost.predict import predict

    out = predict(_read(args.file), args.function, args.model)
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def _measure(args) -> int:
    from memfit.plan.cost.label import measure

    from memfit.plan.cost.iree import DEFAULT_LABEL_KIND

    if args.repetitions < 1:
        from memfit.plan.cost.errors import CostModelError

        raise CostModelError(f"--repetitions must be at least 1 (got {args.repetitions})")
    m = measure(_read(args.file), args.function, args.repetitions)
    # latency_us is measured as the labels are (the median CPU time per call: what the real time is when the
    # process has a core to itself); the real-time median of this run is printed beside it
    out = {"latency_us": m.latency_us, "label_kind": DEFAULT_LABEL_KIND,
           "real_median_us": m.figures["real_median_us"], "spread": m.spread,
           "instructions": m.figures["instructions"], "vector_fma": m.figures["vector_fma"],
           "spills": m.figures["spills"], "figures": m.figures}
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items() if k != "figures"))
    return 0


def _eval(args) -> int:
    from memfit.plan.cost.evaluate_cmd import evaluate

    from memfit.errors import PLOT_SUFFIXES

    _check_output(args.plot, "--plot", PLOT_SUFFIXES)
    result = evaluate(args.db, args.model, args.plot, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        from memfit.plan.cost.evaluate import table

        print(table(result["report"]))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _tune(args) -> int:
    from memfit.plan.cost.tune import tune

    # before the tuning (with --measure, minutes of compiling); the picked program written over the input file
    # (or a model file) would replace it
    _check_output(args.out, "--out", inputs=(("the input", args.file), ("--model", args.model),
                                             ("--ranker", args.ranker)))
    out = tune(_read(args.file), args.function, args.model, args.measure, args.ranker, not args.no_ranker)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out["pick_program"])
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "pick_program"}))
    else:
        measured = out.get("measured_us", {})
        for r in out["ranking"]:
            m = measured.get(r["candidate"])
            note = "" if not args.measure else (f"   measured {m:10.1f} us" if m is not None else
                                                "   did not compile")
            print(f"{r['candidate']:<16} predicted {r['predicted_us']:10.1f} us{note}")
        print(f"ranked by the {out['ranked_by']}")
        print(f"pick: {out['pick']} (IREE default predicted {out['predicted_default_us']:.1f} us)")
        if args.measure:
            o = out["outcome"]
            print(f"measured: pick {o['pick_us']:.1f} us, default {o['default_us']:.1f} us "
                  f"({o['speedup_over_default']:.2f}x), best {o['best']} {o['best_us']:.1f} us "
                  f"(pick {100 * o['gap_to_best']:.1f}% slower)")
    return 0


def _train_ranker(args) -> int:
    from memfit.plan.cost.rank_eval import train_ranker
    from memfit.plan.cost.ranker import COMPACT, DEFAULT_RANKER, SMALL, RankerConfig

    # the default, in the package, may be read-only; the ranker written over the dataset would lose every label
    _check_output(str(args.out or DEFAULT_RANKER), "--out", inputs=(("--db", args.db),))
    cfg = RankerConfig(objective=args.objective, features=COMPACT if args.features == "compact" else None,
                       seed=args.seed, **SMALL)
    out = train_ranker(args.db, args.out or DEFAULT_RANKER, cfg, args.target, args.seed)
    if args.json:
        print(json.dumps(out))
    else:
        t = out["test"]
        print(f"ranker: {out['ranker']} ({out['train_shapes']} training shapes)")
        print(f"held-out shapes: {out['test_shapes']}; pick within 5% of the measured best on "
              f"{100 * t['within_5pct_of_best']:.0f}%, median gap {100 * t['median_gap_to_best']:.1f}%, "
              f"{t['geomean_speedup_over_default']:.2f}x IREE's default, within-shape Spearman "
              f"{t['within_shape_spearman_mean']:.3f}")
    return 0
