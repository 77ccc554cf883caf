"""`python -m benchmarks.train_local --seeds`: the aggregation over seeds and that a seed really changes the run."""
import importlib
import statistics
import sys

import pytest


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("benchmarks.train_local")


def test_aggregation_is_computed_from_the_per_seed_values(bench):
    acc = {"tpsgd": [0.80, 0.83, 0.84], "bp": [0.86, 0.87, 0.90], "drtp": [0.50, 0.52, 0.49],
           "dfa": [0.81, 0.82, 0.83]}
    out = bench.aggregate_seeds([0, 1, 2], acc)
    for m, values in acc.items():
        assert out["methods"][m]["per_seed"] == values
        assert out["methods"][m]["mean"] == pytest.approx(statistics.mean(values), abs=1e-4)
        assert out["methods"][m]["std"] == pytest.approx(statistics.stdev(values), abs=1e-4)  # sample std
    assert set(out["tpsgd_minus"]) == {"bp", "drtp", "dfa"}
    dfa = out["tpsgd_minus"]["dfa"]
    diffs = [-1.0, 1.0, 1.0]  # points, tpsgd - dfa per seed
    assert dfa["per_seed_points"] == pytest.approx(diffs)
    assert dfa["mean_points"] == pytest.approx(statistics.mean(diffs), abs=0.01)
    assert dfa["std_points"] == pytest.approx(statistics.stdev(diffs), abs=0.01)
    assert (dfa["wins"], dfa["ties"], dfa["n"]) == (2, 0, 3)
    half = 4.3027 * statistics.stdev(diffs) / 3 ** 0.5  # t(0.975, 2 dof)
    assert dfa["ci95_points"] == pytest.approx([statistics.mean(diffs) - half, statistics.mean(diffs) + half],
                                               abs=0.01)
    bp = out["tpsgd_minus"]["bp"]
    assert bp["per_seed_points"] == pytest.approx([-6.0, -4.0, -6.0]) and bp["wins"] == 0
    # ahead on the mean but the interval holds 0: not called met
    assert out["targets"]["tpsgd_beats_dfa"].startswith("within seed noise (mean above 0")
    assert out["targets"]["tpsgd_beats_drtp"] == "met"
    assert out["targets"]["tpsgd_within_5_points_of_bp"].startswith("within seed noise (mean below -5")


def test_clear_gaps_are_met_and_not_met_and_one_seed_has_no_interval(bench):
    out = bench.aggregate_seeds([0, 1, 2], {"tpsgd": [0.70, 0.71, 0.72], "bp": [0.90, 0.90, 0.91],
                                            "dfa": [0.80, 0.80, 0.82]})
    assert out["targets"] == {"tpsgd_within_5_points_of_bp": "not met", "tpsgd_beats_dfa": "not met"}
    one = bench.aggregate_seeds([0], {"tpsgd": [0.8], "dfa": [0.7]})
    assert one["methods"]["tpsgd"]["std"] is None and one["tpsgd_minus"]["dfa"]["ci95_points"] is None
    assert one["targets"]["tpsgd_beats_dfa"].startswith("single seed")


def test_rnn_window_rows_become_setups_with_the_window_1_bp(bench):
    def method(acc: float) -> dict:
        return {"settings": {"lr": 1e-2}, "test_accuracy": acc}

    results = {
        "rnn": {"setup": {"model": "rnn", "seed": 3, "train_examples": 12000},
                "methods": {"tpsgd": method(0.75), "bp": method(0.83), "drtp": method(0.67), "dfa": method(0.79)}},
        "rnn_windows": [{"variant": v, "rnn_window": 1 if v in ("1", "leak") else int(v),
                         "rnn_credit": "leak" if v == "leak" else "step", "method": m, "settings": {"lr": 1e-2},
                         "test_accuracy": acc}
                        for v in ("1", "leak", "28") for m, acc in (("tpsgd", 0.80), ("drtp", 0.72), ("dfa", 0.81))],
    }
    out = bench.per_seed_accuracies(results)
    assert set(out) == {"rnn", "rnn_leak", "rnn_window_28"}
    assert "seed" not in out["rnn"]["setup"]
    assert out["rnn"]["accuracy"] == {"tpsgd": 0.75, "bp": 0.83, "drtp": 0.67, "dfa": 0.79}
    assert out["rnn_leak"]["accuracy"] == {"bp": 0.83, "tpsgd": 0.80, "drtp": 0.72, "dfa": 0.81}
    assert out["rnn_leak"]["setup"]["rnn_credit"] == "leak" and out["rnn_window_28"]["setup"]["rnn_window"] == 28


def test_a_seed_changes_the_run_and_the_same_seed_repeats_it(bench, digits):
    settings = bench.SETTINGS["mlp"]["tpsgd"]
    runs = {seed: bench.run_one(digits, "mlp", "tpsgd", settings, 1, 300, seed) for seed in (0, 1)}
    again = bench.run_one(digits, "mlp", "tpsgd", settings, 1, 300, 0)
    assert again["curve"] == runs[0]["curve"]  # deterministic: seed 0 reproduces seed 0
    assert runs[0]["curve"][0]["train_loss"] != runs[1]["curve"][0]["train_loss"]


def test_seeds_part_aggregates_its_own_runs(bench, digits):
    out = bench.seeds_part(digits, [0, 1], quick=True, full=False, settings=bench.SETTINGS, models=["mlp"],
                           rnn_windows=False)
    assert out["seeds"] == [0, 1] and "not re-tuned" in out["settings_note"]
    mlp = out["setups"]["mlp"]
    assert set(mlp["methods"]) == {"tpsgd", "bp", "drtp", "dfa"}
    assert mlp["settings"]["tpsgd"] == bench.SETTINGS["mlp"]["tpsgd"]  # the same settings for every seed
    for r in mlp["methods"].values():
        assert len(r["per_seed"]) == 2 and all(0.0 <= a <= 1.0 for a in r["per_seed"])
        assert r["mean"] == pytest.approx(statistics.mean(r["per_seed"]), abs=1e-4)
        assert r["std"] == pytest.approx(statistics.stdev(r["per_seed"]), abs=1e-4)
    # different seeds give different runs (init, projections and order all move)
    assert len({tuple(r["per_seed"]) for r in mlp["methods"].values()}) > 1
    assert any(r["per_seed"][0] != r["per_seed"][1] for r in mlp["methods"].values())
    tp = mlp["methods"]["tpsgd"]["per_seed"]
    for other, diff in mlp["tpsgd_minus"].items():
        expected = [100 * (a - b) for a, b in zip(tp, mlp["methods"][other]["per_seed"])]
        assert diff["per_seed_points"] == pytest.approx(expected, abs=0.01)
        assert diff["wins"] == sum(d > 0 for d in expected)


@pytest.mark.parametrize("argv,needle", [
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--seeds", "1,1"], "distinct"),
    (["--seeds", "0,1", "--tune"], "run --tune without it"),
])
def test_bad_seeds_are_a_message_and_exit_2(bench, monkeypatch, capsys, argv, needle):
    monkeypatch.setattr(sys, "argv", ["python -m benchmarks.train_local", *argv])
    assert bench.main() == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
