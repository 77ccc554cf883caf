"""What every part of `python -m benchmarks.train_local` shares: the model setups, the chosen settings, one run.

ACCURACY_SETUPS (model -> shape, epochs, training subset), RNN_VARIANTS (the rows of the rnn window table),
SETTINGS (what `--tune` chose, the default of every accuracy run) and run_one() (one training run of one
method, logged to stderr).
"""
from __future__ import annotations

import sys

from memfit.train.local.trainer import TrainConfig, train

MiB = 2**20
# the rows of the rnn window table, each searched on its own: window 1 (the main table), window 1 with the
# GRU leak-path credit (leak.py: time weighting `last` only, window-1 memory), a short window, the whole row
RNN_VARIANTS = {"1": {"rnn_window": 1}, "leak": {"rnn_window": 1, "rnn_credit": "leak"}, "7": {"rnn_window": 7},
                "28": {"rnn_window": 28}}


def variant(settings: dict) -> str:
    """Which RNN_VARIANTS row a setting belongs to."""
    return "leak" if settings.get("rnn_credit") == "leak" else str(settings.get("rnn_window", 1))


# model -> (TrainConfig overrides shared by every method, epochs, training subset for the default run
# (None: all 60k); `--full` trains CNN and RNN on all 60k too)
ACCURACY_SETUPS = {
    "mlp": ({"model": "mlp", "depth": 3, "width": 256}, 3, None),
    "cnn": ({"model": "cnn", "depth": 3, "width": 16}, 2, 20000),
    "rnn": ({"model": "rnn", "depth": 2, "width": 128, "rnn_cell": "gru"}, 2, 12000),
}
# what `--tune` chose (benchmarks/results/train_local_tune_{mlp-cnn,rnn}.json); `--settings` reads such files
_RNN_WINDOW_1 = {"bp": {"lr": 1e-2, "remember_bias": 0.0},
                 "tpsgd": {"lr": 1e-2, "local_loss": "contrast", "target_scale": 0.2, "time_weighting": "linear",
                           "remember_bias": 2.0},
                 "drtp": {"lr": 1e-2, "time_weighting": "square", "remember_bias": 2.0},
                 "dfa": {"lr": 1e-2, "time_weighting": "linear", "remember_bias": 0.0}}
SETTINGS: dict[str, dict] = {
    "mlp": {"bp": {"lr": 1e-3}, "tpsgd": {"lr": 1e-3, "local_loss": "contrast", "target_scale": 0.2},
            "drtp": {"lr": 3e-3}, "dfa": {"lr": 1e-3}},
    "cnn": {"bp": {"lr": 1e-3}, "tpsgd": {"lr": 3e-3, "local_loss": "ce"}, "drtp": {"lr": 1e-3},
            "dfa": {"lr": 1e-3}},
    "rnn": _RNN_WINDOW_1,
    "rnn_windows": {
        "1": {m: _RNN_WINDOW_1[m] for m in ("tpsgd", "drtp", "dfa")},  # the rnn setup is window 1
        "leak": {"tpsgd": {"lr": 1e-2, "local_loss": "contrast", "target_scale": 0.3, "time_weighting": "last",
                           "remember_bias": 0.0},
                 "drtp": {"lr": 1e-2, "time_weighting": "last", "remember_bias": 0.0},
                 "dfa": {"lr": 1e-2, "time_weighting": "last", "remember_bias": 2.0}},
        "7": {"tpsgd": {"lr": 1e-2, "local_loss": "contrast", "target_scale": 0.2, "time_weighting": "linear",
                        "remember_bias": 2.0},
              "drtp": {"lr": 1e-2, "time_weighting": "linear", "remember_bias": 0.0},
              "dfa": {"lr": 1e-2, "time_weighting": "linear", "remember_bias": 2.0}},
        "28": {"tpsgd": {"lr": 1e-2, "local_loss": "contrast", "target_scale": 0.3, "time_weighting": "last",
                         "remember_bias": 0.0},
               "drtp": {"lr": 1e-2, "time_weighting": "last", "remember_bias": 0.0},
               "dfa": {"lr": 1e-2, "time_weighting": "last", "remember_bias": 2.0}},
    },
}


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


def budget(model: str, full: bool, quick: bool) -> tuple[int, int | None]:
    """(epochs, training examples; None = all 60,000) of a model's setup: `--full` trains on all of them,
    `--quick` on 3,000 for one epoch."""
    _, epochs, n_train = ACCURACY_SETUPS[model]
    if quick:
        return 1, 3000
    return epochs, None if full else n_train
