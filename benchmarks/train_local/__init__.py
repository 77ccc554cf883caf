"""Backprop-free local learning (tpSGD) against backprop, DRTP and DFA: `python -m benchmarks.train_local`.

The suite's parts: `common` (model setups, the tuned SETTINGS, one training run), `accuracy` (part a),
`memory` (part b), `seeds` (part c, the spread over seeds), `search` (`--tune`) and `cli` (the command line;
its docstring is `--help`). What tests reach is re-exported here.
"""
from benchmarks.train_local.cli import main
from benchmarks.train_local.common import SETTINGS, run_one
from benchmarks.train_local.seeds import per_seed_accuracies, seeds_part
from memfit.train.local.seeds import aggregate_seeds

__all__ = ["SETTINGS", "aggregate_seeds", "main", "per_seed_accuracies", "run_one", "seeds_part"]
