"""The spread over seeds of `python -m benchmarks.train_local --seeds` (part (c)): the accuracy part once per seed
with the same settings, then per setup and method the per-seed accuracies, mean, sample std and tpSGD's
paired differences (aggregate_seeds in memfit.train.local.seeds).
"""
from __future__ import annotations

from benchmarks.train_local.accuracy import accuracy_part

from memfit.train.local.seeds import aggregate_seeds

SEED_NOTE = ("every seed uses the same settings (SETTINGS in benchmarks/train_local/common.py, chosen by the seed-0 "
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
