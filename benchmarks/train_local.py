"""Backprop-free local learning (tpSGD) against backprop, DRTP and DFA on Fashion-MNIST.

    python benchmarks/train_local.py [--out-dir benchmarks/results] [--threads 1] [--seed 0] [--quick]
        [--full] [--models mlp,cnn,rnn] [--settings JSON[,JSON]] [--skip-rnn-windows]
    python benchmarks/train_local.py --tune [--models ...] [--full]    # the hyper-parameter search
    python benchmarks/train_local.py --seeds 0,1,2 [--models ...] [--full] [--skip-rnn-windows]  # spread

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
    Drawn to train_local_memory.png; accuracy curves to train_local_accuracy.png.
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
import json
import sys
import time
from pathlib import Path

import torch

from memfit.memory.measure import machine_info as _machine_info
from memfit.train.local.data import load_fashion_mnist, validation_split
from memfit.train.local.memory import TrainingMemoryMeter, optimizer_state_bytes
from memfit.train.local.models import ModelConfig, build_model
from memfit.train.local.plot import (
    plot_accuracy_curves,
    plot_memory_scaling,
    plot_seeds,
)
from memfit.train.local.rules import METHODS, make_rule
from memfit.train.local.seeds import aggregate_seeds, parse_seeds
from memfit.train.local.trainer import TrainConfig, train

MiB = 2**20
# recurrent local rules: detach the state every k steps; 1 = no backprop through time (the memory-lean
# setting of the accuracy table), 28 = full backprop through time inside each layer (never across layers)
RNN_WINDOWS = [1, 28]
# the rows of the rnn window table, each searched on its own: window 1 (the main table), window 1 with the
# GRU leak-path credit (leak.py: time weighting `last` only, window-1 memory), a short window, the whole row
RNN_VARIANTS = {"1": dict(rnn_window=1), "leak": dict(rnn_window=1, rnn_credit="leak"), "7": dict(rnn_window=7),
                "28": dict(rnn_window=28)}


def variant(settings: dict) -> str:
    """Which RNN_VARIANTS row a setting belongs to."""
    return "leak" if settings.get("rnn_credit") == "leak" else str(settings.get("rnn_window", 1))
# model -> (TrainConfig overrides shared by every method, epochs, training subset for the default run
# (None: all 60k); `--full` trains CNN and RNN on all 60k too)
ACCURACY_SETUPS = {
    "mlp": (dict(model="mlp", depth=3, width=256), 3, None),
    "cnn": (dict(model="cnn", depth=3, width=16), 2, 20000),
    "rnn": (dict(model="rnn", depth=2, width=128, rnn_cell="gru"), 2, 12000),
}
# The hyper-parameter search (`--tune`), run on a validation split held out of the training images (the test
# set is never looked at): every method gets the same grid of the knobs it has; backprop has no time
# weighting (it backpropagates through time), and only tpSGD has a local loss to choose.
TUNE_GRID = {
    "mlp": {"lr": [1e-3, 3e-3]},
    "cnn": {"lr": [1e-3, 3e-3]},
    "rnn": {"lr": [3e-3, 1e-2], "time_weighting": ["square", "linear", "last"],
            # leak credit runs with time weighting `last` only (the other combinations are skipped)
            "rnn_window": list(RNN_VARIANTS.values()),
            # a model knob, searched for every method: +2 on the GRU update-gate bias at init (slower state)
            "remember_bias": [0.0, 2.0]},
}
# tpSGD's local loss; contrast (cross-entropy of the scores a . P_c against every class's target) comes with
# its inverse temperature, the target scale (DRTP's and DFA's hidden gradients are linear in P, so under Adam
# a scale changes nothing for them: DFA rnn lr 1e-2 linear scored 0.7973 at scale 0.3 against 0.7984 at 1)
TPSGD_GRID = {"local_loss": [dict(local_loss="ce"), dict(local_loss="mse"),
                             dict(local_loss="contrast", target_scale=0.3),
                             dict(local_loss="contrast", target_scale=0.2)]}
# (the rnn_window knob also carries rnn_credit, see RNN_VARIANTS)
KNOBS_OF = {"bp": {"lr", "remember_bias"}, "drtp": {"lr", "time_weighting", "rnn_window", "remember_bias"},
            "dfa": {"lr", "time_weighting", "rnn_window", "remember_bias"},
            "tpsgd": {"lr", "time_weighting", "rnn_window", "local_loss", "remember_bias"}}
# what `--tune` chose (benchmarks/results/train_local_tune_{mlp-cnn,rnn}.json); `--settings` reads such files
_RNN_WINDOW_1 = {"bp": dict(lr=1e-2, remember_bias=0.0),
                 "tpsgd": dict(lr=1e-2, local_loss="contrast", target_scale=0.2, time_weighting="linear",
                               remember_bias=2.0),
                 "drtp": dict(lr=1e-2, time_weighting="square", remember_bias=2.0),
                 "dfa": dict(lr=1e-2, time_weighting="linear", remember_bias=0.0)}
SETTINGS: dict[str, dict] = {
    "mlp": {"bp": dict(lr=1e-3), "tpsgd": dict(lr=1e-3, local_loss="contrast", target_scale=0.2),
            "drtp": dict(lr=3e-3), "dfa": dict(lr=1e-3)},
    "cnn": {"bp": dict(lr=1e-3), "tpsgd": dict(lr=3e-3, local_loss="ce"), "drtp": dict(lr=1e-3),
            "dfa": dict(lr=1e-3)},
    "rnn": _RNN_WINDOW_1,
    "rnn_windows": {
        "1": {m: _RNN_WINDOW_1[m] for m in ("tpsgd", "drtp", "dfa")},  # the rnn setup is window 1
        "leak": {"tpsgd": dict(lr=1e-2, local_loss="contrast", target_scale=0.3, time_weighting="last",
                               remember_bias=0.0),
                 "drtp": dict(lr=1e-2, time_weighting="last", remember_bias=0.0),
                 "dfa": dict(lr=1e-2, time_weighting="last", remember_bias=2.0)},
        "7": {"tpsgd": dict(lr=1e-2, local_loss="contrast", target_scale=0.2, time_weighting="linear",
                            remember_bias=2.0),
              "drtp": dict(lr=1e-2, time_weighting="linear", remember_bias=0.0),
              "dfa": dict(lr=1e-2, time_weighting="linear", remember_bias=2.0)},
        "28": {"tpsgd": dict(lr=1e-2, local_loss="contrast", target_scale=0.3, time_weighting="last",
                             remember_bias=0.0),
               "drtp": dict(lr=1e-2, time_weighting="last", remember_bias=0.0),
               "dfa": dict(lr=1e-2, time_weighting="last", remember_bias=2.0)},
    },
}


def machine_info(threads: int, seed: int) -> dict:
    return _machine_info(threads, seed, device="cpu")


def run_one(data, model: str, method: str, settings: dict, epochs: int, n_train: int | None, seed: int,
            **extra) -> dict:
    overrides = ACCURACY_SETUPS[model][0]
    cfg = TrainConfig(dataset="fashion-mnist", method=method, epochs=epochs, batch_size=128, seed=seed,
                      max_train=n_train, **overrides, **settings, **extra)
    r = train(cfg, data=data).to_json()
    print(f"[{model} seed {seed}] {method} {settings} {extra or ''}: acc {r['test_accuracy']:.4f}, "
          f"{r['train_seconds']:.1f} s, "
          f"overhead {r['peak_overhead_bytes'] / MiB:.2f} MiB, total {r['peak_training_bytes'] / MiB:.2f} MiB",
          file=sys.stderr, flush=True)
    return r


def grid(model: str, method: str) -> list[dict]:
    space = {k: v for k, v in (TUNE_GRID[model] | TPSGD_GRID).items() if k in KNOBS_OF[method]}
    combos = [{}]
    for key, values in space.items():  # a dict value sets several knobs together
        combos = [c | (v if isinstance(v, dict) else {key: v}) for c in combos for v in values]
    # leak credit needs the loss at the last step only; rnn_credit "step" is the default, left out
    combos = [c for c in combos if c.get("rnn_credit") != "leak" or c.get("time_weighting") == "last"]
    return [c if c.get("rnn_credit") == "leak" else {k: v for k, v in c.items() if k != "rnn_credit"}
            for c in combos]


def tune_part(data, seed: int, full: bool, quick: bool, models: list[str]) -> dict:
    """Grid search on a 10,000-image validation split of the training set; best validation accuracy wins."""
    val = validation_split(data, 10000, seed)
    out = {"validation_examples": 10000, "grid": TUNE_GRID, "tpsgd_only": TPSGD_GRID, "models": {}}
    for model in models:
        _, epochs, n_train = ACCURACY_SETUPS[model]
        n_train = None if full else n_train
        if quick:
            epochs, n_train = 1, 3000
        runs = {}
        for method in METHODS:
            runs[method] = [{"settings": c, "validation_accuracy": run_one(val, model, method, c, epochs, n_train,
                                                                           seed)["test_accuracy"]}
                            for c in grid(model, method)]
        def best(rows: list[dict], which: str = "1") -> dict:
            rows = [r for r in rows if variant(r["settings"]) == which]
            chosen = dict(max(rows, key=lambda e: e["validation_accuracy"])["settings"])
            for key in RNN_VARIANTS[which]:
                chosen.pop(key, None)
            return chosen

        out["models"][model] = {
            "epochs": epochs, "train_examples": n_train or len(val.y_train), "runs": runs,
            "best": {m: best(r) for m, r in runs.items()},  # the main table: no backprop through time
        }
        if model == "rnn":
            out["models"][model]["best_by_window"] = {
                w: {m: best(r, w) for m, r in runs.items() if m != "bp"} for w in RNN_VARIANTS}
    return out


def summarize(runs: dict[str, dict], setup: dict) -> dict:
    """Each method against backprop: accuracy points, time, overhead and total memory ratios."""
    bp = runs["bp"]
    out = {
        "setup": setup,
        "methods": {
            m: {
                "settings": r["settings"],
                "test_accuracy": r["test_accuracy"],
                "accuracy_minus_bp_points": round(100 * (r["test_accuracy"] - bp["test_accuracy"]), 2),
                "train_seconds": r["train_seconds"],
                "time_vs_bp": round(r["train_seconds"] / bp["train_seconds"], 3),
                "peak_overhead_bytes": r["peak_overhead_bytes"],
                "overhead_vs_bp": round(r["peak_overhead_bytes"] / bp["peak_overhead_bytes"], 3),
                "peak_training_bytes": r["peak_training_bytes"],
                "total_vs_bp": round(r["peak_training_bytes"] / bp["peak_training_bytes"], 3),
                "peak_rss_bytes": r["peak_rss_bytes"],
                "memory": r["memory"],
                "curve": [round(c["test_accuracy"], 4) for c in r["curve"]],
            }
            for m, r in runs.items()
        },
    }
    fixed = bp["memory"]["param_bytes"] + bp["memory"]["optimizer_state_bytes"]
    out["weights_and_optimizer_share_of_bp_total"] = round(fixed / bp["peak_training_bytes"], 3)
    tp = out["methods"]["tpsgd"]
    out["targets"] = {
        "tpsgd_within_5_points_of_bp": tp["accuracy_minus_bp_points"] >= -5.0,
        "tpsgd_beats_drtp": tp["test_accuracy"] > out["methods"]["drtp"]["test_accuracy"],
        "tpsgd_beats_dfa": tp["test_accuracy"] > out["methods"]["dfa"]["test_accuracy"],
    }
    return out


def accuracy_part(data, seed: int, quick: bool, full: bool, settings: dict, models: list[str],
                  rnn_windows: bool) -> tuple[dict, list[dict]]:
    results, curves = {}, []
    for name in models:
        overrides, epochs, n_train = ACCURACY_SETUPS[name]
        n_train = None if full else n_train
        if quick:
            epochs, n_train = 1, 3000
        runs = {}
        for method in METHODS:
            r = run_one(data, name, method, settings[name][method], epochs, n_train, seed)
            runs[method] = r | {"settings": settings[name][method]}
            curves.append(r)
        setup = {**overrides, "epochs": epochs, "batch_size": 128, "train_examples": n_train or len(data.y_train),
                 "test_examples": len(data.y_test), "optimizer": "adam", "seed": seed}
        results[name] = summarize(runs, setup)
        if name == "rnn" and rnn_windows:
            results["rnn_windows"], extra = rnn_window_part(data, seed, epochs, n_train, settings["rnn_windows"],
                                                            runs)
            curves.extend(extra)
    return results, curves


def rnn_window_part(data, seed: int, epochs: int, n_train: int | None, settings: dict,
                    runs: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Accuracy and memory of the recurrent local rules when each layer backpropagates through time in windows
    of k steps (state detached every k steps; 28 = the whole row-by-row sequence, inside one layer only), each
    with the settings the search chose for that window. Window 1 rows are the main table's runs."""
    rows, extra, bp = [], [], runs["bp"]
    for which, knobs in RNN_VARIANTS.items():
        for method in ("tpsgd", "drtp", "dfa"):
            chosen = settings[which][method]
            if which == "1" and runs[method]["settings"] == chosen:
                r = runs[method]
            else:
                r = run_one(data, "rnn", method, chosen, epochs, n_train, seed, **knobs)
                extra.append(r | {"label": f"{method} window {which}"})
            rows.append({
                "method": method, "rnn_window": knobs["rnn_window"], "rnn_credit": knobs.get("rnn_credit", "step"),
                "variant": which, "settings": chosen,
                "test_accuracy": r["test_accuracy"],
                "accuracy_minus_bp_points": round(100 * (r["test_accuracy"] - bp["test_accuracy"]), 2),
                "train_seconds": r["train_seconds"], "peak_overhead_bytes": r["peak_overhead_bytes"],
                "overhead_vs_bp": round(r["peak_overhead_bytes"] / bp["peak_overhead_bytes"], 3),
                "total_vs_bp": round(r["peak_training_bytes"] / bp["peak_training_bytes"], 3),
                "curve": [round(c["test_accuracy"], 4) for c in r["curve"]],
            })
    return rows, extra


SEED_NOTE = ("every seed uses the same settings (SETTINGS in benchmarks/train_local.py, chosen by the seed-0 "
             "validation search, or --settings); they are not re-tuned per seed")
SEED_CONTROLS = ("the seed sets the weight init (torch.manual_seed in build_model), the projection / feedback "
                 "matrices P_i and B_i (seed + 1000 (i + 1)), the seeded training subset (CNN 20k, RNN 12k; the "
                 "MLP trains on all 60k, so only its order changes) and the shuffling order of every epoch; the "
                 "test set is always the same 10,000 images")


def per_seed_accuracies(results: dict) -> dict[str, dict]:
    """accuracy_part's results of one seed -> setup name -> {"setup", "settings", "accuracy": method -> acc};
    the rnn window rows become their own setups, with the window-1 bp run as their bp."""
    out = {}
    for name, res in results.items():
        if name == "rnn_windows":
            continue
        setup = {k: v for k, v in res["setup"].items() if k != "seed"}
        out[name] = {"setup": setup, "settings": {m: r["settings"] for m, r in res["methods"].items()},
                     "accuracy": {m: r["test_accuracy"] for m, r in res["methods"].items()}}
    bp = results.get("rnn", {}).get("methods", {}).get("bp")
    for row in results.get("rnn_windows", []):
        if row["variant"] == "1":  # the same runs as the rnn setup
            continue
        name = "rnn_leak" if row["variant"] == "leak" else f"rnn_window_{row['variant']}"
        entry = out.setdefault(name, {"setup": {**out["rnn"]["setup"], "rnn_window": row["rnn_window"],
                                                "rnn_credit": row["rnn_credit"]},
                                      "settings": {"bp": bp["settings"]},
                                      "accuracy": {"bp": bp["test_accuracy"]}})
        entry["settings"][row["method"]] = row["settings"]
        entry["accuracy"][row["method"]] = row["test_accuracy"]
    return out


def seeds_part(data, seeds: list[int], quick: bool, full: bool, settings: dict, models: list[str],
               rnn_windows: bool) -> dict:
    """The accuracy part once per seed with fixed settings, then mean, sample std and paired differences."""
    per_seed, seconds = [], []
    for seed in seeds:
        results, _ = accuracy_part(data, seed, quick, full, settings, models, rnn_windows)
        per_seed.append(per_seed_accuracies(results))
        seconds.append(round(sum(r["train_seconds"] for res in results.values() if isinstance(res, dict)
                                 for r in res["methods"].values()) + sum(
            r["train_seconds"] for r in results.get("rnn_windows", []) if r["variant"] != "1"), 1))
    setups = {}
    for name, first in per_seed[0].items():
        acc = {m: [p[name]["accuracy"][m] for p in per_seed] for m in first["accuracy"]}
        setups[name] = {"setup": first["setup"], "settings": first["settings"]} | aggregate_seeds(seeds, acc)
    return {"seeds": seeds, "settings_note": SEED_NOTE, "seed_controls": SEED_CONTROLS,
            "train_seconds_per_seed": seconds, "setups": setups}


def probe(method: str, depth: int, width: int, batch: int, x: torch.Tensor, y: torch.Tensor, seed: int,
          steps: int = 2, fused: bool = True, model: str = "mlp", rnn_window: int = 1, **options) -> dict:
    """Peak memory of `steps` training steps (no convergence needed to measure peaks)."""
    net = build_model(ModelConfig(model, depth, width), (1, 28, 28), 10, seed)
    rule = make_rule(method, net, lambda p: torch.optim.Adam(p, lr=1e-3), 10, seed, fused=fused,
                     rnn_window=rnn_window, **options)
    meter = TrainingMemoryMeter(net)
    with meter:
        for s in range(steps):
            # clone: a slice is a view of the whole 60k-image storage, and the meter counts whole storages
            rule.train_step(x[s * batch:(s + 1) * batch].clone(), y[s * batch:(s + 1) * batch].clone())
    report = meter.report(rule.optimizers, rule.extra_state_bytes)
    return {"overhead": report.peak_overhead_bytes, "total": report.peak_training_bytes,
            "saved": report.peak_saved_bytes, "params": report.param_bytes,
            "optimizer": optimizer_state_bytes(rule.optimizers), "projections": rule.extra_state_bytes}


def memory_part(data, seed: int, quick: bool) -> dict:
    width = 1024
    depths = [2, 3, 5, 8] if quick else [2, 3, 4, 5, 6, 7, 8]
    batches = [64, 1024, 4096] if quick else [64, 128, 256, 512, 1024, 2048, 4096]
    x, y = data.x_train[: 2 * max(batches)], data.y_train[: 2 * max(batches)]

    def rows_for(key: str, values: list[int], depth_of, batch_of) -> list[dict]:
        rows = []
        for v in values:
            peaks = {m: probe(m, depth_of(v), width, batch_of(v), x, y, seed) for m in METHODS}
            bp = peaks["bp"]
            for m, p in peaks.items():
                rows.append({key: v, "method": m, "overhead_bytes": p["overhead"], "total_bytes": p["total"],
                             "overhead_ratio": round(p["overhead"] / bp["overhead"], 3),
                             "total_ratio": round(p["total"] / bp["total"], 3),
                             "weights_optimizer_bytes": p["params"] + p["optimizer"]})
            print(f"[memory] {key}={v}: " + ", ".join(
                f"{m} {p['overhead'] / MiB:.1f}/{p['total'] / MiB:.1f} MiB" for m, p in peaks.items()),
                file=sys.stderr, flush=True)
        return rows

    depth_rows = rows_for("depth", depths, lambda d: d, lambda d: 1024)
    batch_rows = rows_for("batch", batches, lambda b: 5, lambda b: b)
    target = next(r for r in batch_rows if r["batch"] == 1024 and r["method"] == "tpsgd")
    bp5 = next(r for r in batch_rows if r["batch"] == 1024 and r["method"] == "bp")
    # ablation: the same tpSGD step through plain autograd (Linear and ReLU save their own tensors)
    unfused = probe("tpsgd", 5, width, 1024, x, y, seed, fused=False)
    mlp3 = {m: probe(m, 3, 256, 256, x, y, seed) for m in ("bp", "tpsgd")}
    # a 3-GRU-layer RNN (depth 4, state 128, batch 128): local rules with and without BPTT inside each layer
    rnn3 = {f"{m}_window{w}": probe(m, 4, 128, 128, x, y, seed, steps=1, model="rnn", rnn_window=w)["overhead"]
            for m in ("tpsgd", "dfa") for w in RNN_WINDOWS}
    rnn3.update({f"{m}_leak": probe(m, 4, 128, 128, x, y, seed, steps=1, model="rnn", rnn_credit="leak",
                                    time_weighting="last")["overhead"] for m in ("tpsgd", "dfa")})
    rnn3["bp"] = probe("bp", 4, 128, 128, x, y, seed, steps=1, model="rnn")["overhead"]
    return {
        "width": width, "by_depth_at_batch_1024": depth_rows, "by_batch_at_depth_5": batch_rows,
        "target_5_layer_w1024_b1024": {"tpsgd_overhead_ratio": target["overhead_ratio"],
                                       "tpsgd_total_ratio": target["total_ratio"],
                                       "at_most_one_third": target["overhead_ratio"] <= 1 / 3,
                                       "bp_overhead_bytes": bp5["overhead_bytes"],
                                       "tpsgd_overhead_bytes": target["overhead_bytes"],
                                       "tpsgd_unfused_overhead_bytes": unfused["overhead"],
                                       "tpsgd_unfused_overhead_ratio": round(unfused["overhead"]
                                                                             / bp5["overhead_bytes"], 3)},
        "mlp3_w256_b256": {
            m: {"overhead_bytes": p["overhead"], "total_bytes": p["total"],
                "weights_optimizer_share_of_total": round((p["params"] + p["optimizer"]) / p["total"], 3)}
            for m, p in mlp3.items()
        } | {"tpsgd_total_ratio": round(mlp3["tpsgd"]["total"] / mlp3["bp"]["total"], 3)},
        "rnn_3_gru_layers_b128_overhead": {k: {"bytes": v, "vs_bp": round(v / rnn3["bp"], 3)}
                                           for k, v in rnn3.items()},
    }


def load_settings(paths: str | None) -> dict:
    """SETTINGS, or the choices of one or more (comma-separated) --tune outputs."""
    if paths is None:
        return SETTINGS
    models: dict = {}
    for path in paths.split(","):
        tuned = json.loads(Path(path).read_text())
        models |= tuned.get("tune", tuned)["models"]
    chosen = {model: models[model]["best"] if model in models else SETTINGS[model] for model in ACCURACY_SETUPS}
    by_window = models.get("rnn", {}).get("best_by_window")
    chosen["rnn_windows"] = ({str(w): v for w, v in by_window.items()} if by_window else SETTINGS["rnn_windows"])
    return chosen


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
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_fashion_mnist()
    start = time.perf_counter()
    suffix = "_full" if args.full else ""
    out: dict = {"benchmark": "train_local", "dataset": "fashion-mnist", "machine": machine_info(args.threads,
                                                                                                args.seed)}
    part = "" if models == list(ACCURACY_SETUPS) else "_" + "-".join(models)
    if args.tune:
        out["tune"] = tune_part(data, args.seed, args.full, args.quick, models)
        out["wall_seconds"] = round(time.perf_counter() - start, 1)
        text = json.dumps(out, indent=2)
        (out_dir / f"train_local_tune{part}{suffix}.json").write_text(text)
        print(text)
        return 0
    if seeds is not None:
        out["benchmark"] = "train_local_seeds"
        out["machine"]["seed"] = seeds
        out["settings_source"] = args.settings or "SETTINGS in benchmarks/train_local.py (from --tune, seed 0)"
        out |= seeds_part(data, seeds, args.quick, args.full, load_settings(args.settings), models,
                          not args.skip_rnn_windows)
        out["plot"] = str(plot_seeds(out["setups"], out_dir / f"train_local_seeds{part}{suffix}.png"))
        out["wall_seconds"] = round(time.perf_counter() - start, 1)
        text = json.dumps(out, indent=2)
        (out_dir / f"train_local_seeds{part}{suffix}.json").write_text(text)
        print(text)
        return 0
    if not args.skip_accuracy:
        settings = load_settings(args.settings)
        out["settings_source"] = args.settings or "SETTINGS in benchmarks/train_local.py (from --tune)"
        out["accuracy"], curves = accuracy_part(data, args.seed, args.quick, args.full, settings, models,
                                                not args.skip_rnn_windows)
        out["accuracy_plot"] = str(plot_accuracy_curves(curves, out_dir / f"train_local_accuracy{suffix}.png",
                                                        "Fashion-MNIST test accuracy (" + ", ".join(models) + ")"))
    if not args.skip_memory:
        out["memory_scaling"] = memory_part(data, args.seed, args.quick)
        out["memory_plot"] = str(plot_memory_scaling(out["memory_scaling"]["by_depth_at_batch_1024"],
                                                     out["memory_scaling"]["by_batch_at_depth_5"],
                                                     out_dir / "train_local_memory.png"))
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(out, indent=2)
    (out_dir / f"train_local{suffix}.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
