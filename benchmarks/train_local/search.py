"""The hyper-parameter search of `python -m benchmarks.train_local --tune`, and reading its outputs back.

TUNE_GRID / TPSGD_GRID / KNOBS_OF (which knobs each method searches), grid() (the combinations of one
method), tune_part() (the search on a validation split) and load_settings() (`--settings`: the choices of
one or more --tune outputs, else SETTINGS).
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.train_local.common import (
    ACCURACY_SETUPS,
    RNN_VARIANTS,
    SETTINGS,
    budget,
    run_one,
    variant,
)

from memfit.train.local.data import validation_split
from memfit.train.local.rules import METHODS

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
TPSGD_GRID = {"local_loss": [{"local_loss": "ce"}, {"local_loss": "mse"},
                             {"local_loss": "contrast", "target_scale": 0.3},
                             {"local_loss": "contrast", "target_scale": 0.2}]}
# (the rnn_window knob also carries rnn_credit, see RNN_VARIANTS)
KNOBS_OF = {"bp": {"lr", "remember_bias"}, "drtp": {"lr", "time_weighting", "rnn_window", "remember_bias"},
            "dfa": {"lr", "time_weighting", "rnn_window", "remember_bias"},
            "tpsgd": {"lr", "time_weighting", "rnn_window", "local_loss", "remember_bias"}}


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
        epochs, n_train = budget(model, full, quick)
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
