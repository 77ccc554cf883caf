"""The accuracy part (a) of `python -m benchmarks.train_local`: every method of every model trained once and set
against backprop.

accuracy_part() (the main table, one seed), rnn_window_part() (the RNN local rules with backprop through time
inside each layer over windows, and with the leak-path credit) and summarize() (each method against
backprop: accuracy points, time, overhead and total memory ratios).
"""
from __future__ import annotations

from benchmarks.train_local.common import ACCURACY_SETUPS, RNN_VARIANTS, budget, run_one

from memfit.train.local.rules import METHODS


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
        overrides = ACCURACY_SETUPS[name][0]
        epochs, n_train = budget(name, full, quick)
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
