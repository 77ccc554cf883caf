"""Backprop-free local learning (tpSGD) against backprop, DRTP and DFA on Fashion-MNIST.

    python -m benchmarks.train_local [--out-dir benchmarks/results] [--threads 1] [--seed 0] [--quick]
        [--full] [--models mlp,cnn,rnn] [--settings JSON[,JSON]] [--skip-rnn-windows]
    python -m benchmarks.train_local --tune [--models ...] [--full]    # the hyper-parameter search
    python -m benchmarks.train_local --seeds 0,1,2 [--models ...] [--full] [--skip-rnn-windows]  # spread

(a) accuracy: a 3-layer MLP (784-256-256-10), a small CNN (2 conv blocks of 16 channels + linear head) and a
    small RNN (1 GRU layer of 128 reading the image row by row, + linear head); same seed, same epochs, same
    optimizer (Adam) and data for every method of a model, each with the settings a validation-split search
    chose for it (`--tune`; same grid for every method, see TUNE_GRID). Test accuracy, training time and
    measured peak memory (saved-for-backward + gradients alive = overhead; + weights, Adam state and
    projections = total), each method against backprop. By default CNN and RNN train on a seeded subset of
    the 60,000 training images (stated in the JSON); `--full` uses all 60,000 (train_local_full.json). The
    test set is always all 10,000. For the RNN the local rules also run with backprop through time inside
    each layer over windows of 7 and 28 steps, and with the GRU leak-path credit (rnn_credit leak, window-1
    memory), next to the no-BPTT default (rnn_window 1); each of these rows is searched on its own.
(b) memory scaling, one or two steps per configuration (peaks need no convergence): MLP width 1024,
    depth 2..8 at batch 1024, and batch 64..4096 at depth 5; overhead and total of each method divided
    by backprop's, plus tpSGD through plain autograd (no fused step) at 5 layers / batch 1024.
    Drawn to train_local.memory.png; accuracy curves to train_local.png (with --full: train_local_full.*).
(c) `--seeds S,S,..`: the accuracy part (a) once per seed, every method with the SAME settings (SETTINGS, from
    the seed-0 validation search; not re-tuned per seed). The seed sets the weight init, the projections /
    feedback matrices, the training subset (CNN, RNN) and the data order. Per setup and method: per-seed test
    accuracies, mean, sample std; tpSGD minus each other method, paired by seed (mean, std, 95% t-interval,
    wins) -> <out-dir>/train_local_seeds[_MODELS][_full].json and a PNG of mean +- std (no memory part: the
    peaks do not depend on the seed).
JSON goes to stdout and <out-dir>/train_local.json. Needs `apt-get install -y dataset-fashion-mnist`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import emit, header, pin_threads, png_beside
from benchmarks.train_local.accuracy import accuracy_part
from benchmarks.train_local.common import ACCURACY_SETUPS
from benchmarks.train_local.memory import memory_part
from benchmarks.train_local.search import load_settings, tune_part
from benchmarks.train_local.seeds import seeds_part
from memfit.train.local.data import load_fashion_mnist
from memfit.train.local.plot import (
    plot_accuracy_curves,
    plot_memory_scaling,
    plot_seeds,
)
from memfit.train.local.seeds import parse_seeds


def finish(out: dict, start: float, path: Path) -> int:
    """Stamp the wall time, print the JSON and write it to `path`."""
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    emit(out, path)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 epoch on 3,000 images, fewer memory points")
    ap.add_argument("--full", action="store_true", help="train CNN and RNN on all 60,000 images too")
    ap.add_argument("--models", default="mlp,cnn,rnn", help="comma-separated subset of mlp,cnn,rnn")
    ap.add_argument("--tune", action="store_true",
                    help="only run the hyper-parameter search on a validation split -> train_local_tune.json")
    ap.add_argument("--settings", default=None, metavar="JSON[,JSON]",
                    help="use the choices of --tune outputs (comma-separated)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-rnn-windows", action="store_true", help="no rnn window (truncated BPTT) table")
    ap.add_argument("--seeds", default=None, metavar="S,S,..",
                    help="accuracy part once per seed with the same settings -> train_local_seeds.json "
                         "(mean, std, paired differences; no memory part); default: the single --seed run")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in ACCURACY_SETUPS for m in models):
        print(f"error: --models takes a comma-separated subset of {', '.join(ACCURACY_SETUPS)}", file=sys.stderr)
        return 2
    seeds = None
    if args.seeds is not None:
        try:
            seeds = parse_seeds(args.seeds)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.tune:
            print("error: --seeds evaluates fixed settings on the test set; run --tune without it",
                  file=sys.stderr)
            return 2
    pin_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_fashion_mnist()
    start = time.perf_counter()
    suffix = "_full" if args.full else ""
    out: dict = {"benchmark": "train_local", "dataset": "fashion-mnist", "machine": header(args.threads, args.seed,
                                                                                          device="cpu")}
    part = "" if models == list(ACCURACY_SETUPS) else "_" + "-".join(models)
    if args.tune:
        out["tune"] = tune_part(data, args.seed, args.full, args.quick, models)
        return finish(out, start, out_dir / f"train_local_tune{part}{suffix}.json")
    if seeds is not None:
        out["benchmark"] = "train_local_seeds"
        out["machine"]["seed"] = seeds
        out["settings_source"] = args.settings or "SETTINGS in benchmarks/train_local/common.py (from --tune, seed 0)"
        out |= seeds_part(data, seeds, args.quick, args.full, load_settings(args.settings), models,
                          not args.skip_rnn_windows)
        path = out_dir / f"train_local_seeds{part}{suffix}.json"
        out["plot"] = str(plot_seeds(out["setups"], png_beside(path)))
        return finish(out, start, path)
    # a memory-only run gets its own file: it must not replace the accuracy results
    path = out_dir / (f"train_local_memory{suffix}.json" if args.skip_accuracy else f"train_local{suffix}.json")
    if not args.skip_accuracy:
        settings = load_settings(args.settings)
        out["settings_source"] = args.settings or "SETTINGS in benchmarks/train_local/common.py (from --tune)"
        out["accuracy"], curves = accuracy_part(data, args.seed, args.quick, args.full, settings, models,
                                                not args.skip_rnn_windows)
        out["accuracy_plot"] = str(plot_accuracy_curves(curves, png_beside(path),
                                                        "Fashion-MNIST test accuracy (" + ", ".join(models) + ")"))
    if not args.skip_memory:
        out["memory_scaling"] = memory_part(data, args.seed, args.quick)
        out["memory_plot"] = str(plot_memory_scaling(out["memory_scaling"]["by_depth_at_batch_1024"],
                                                     out["memory_scaling"]["by_batch_at_depth_5"],
                                                     png_beside(path, "memory")))
    return finish(out, start, path)


if __name__ == "__main__":
    sys.exit(main())
