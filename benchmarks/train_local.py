"""Backprop-free local learning (tpSGD) against backprop, DRTP and DFA on Fashion-MNIST.

    python benchmarks/train_local.py [--out-dir benchmarks/results] [--threads 1] [--seed 0] [--quick]

(a) accuracy: a 3-layer MLP (784-256-256-10), a small CNN (2 conv blocks of 16 channels + linear head) and a
    small RNN (1 GRU layer of 128 reading the image row by row, + linear head); same seed, same epochs,
    same optimizer (Adam) and learning rate for every method of a model. Test accuracy, training time and
    measured peak memory (saved-for-backward + gradients alive = overhead; + weights, Adam state and
    projections = total), each method against backprop. CNN and RNN train on a seeded subset of the
    60,000 training images to fit the time budget (stated in the JSON); the test set is always all 10,000.
(b) memory scaling, one or two steps per configuration (peaks need no convergence): MLP width 1024,
    depth 2..8 at batch 1024, and batch 64..4096 at depth 5; overhead and total of each method divided
    by backprop's. Drawn to train_local_memory.png; accuracy curves to train_local_accuracy.png.
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
from memfit.train.local.data import load_fashion_mnist
from memfit.train.local.memory import TrainingMemoryMeter, optimizer_state_bytes
from memfit.train.local.models import ModelConfig, build_model
from memfit.train.local.plot import plot_accuracy_curves, plot_memory_scaling
from memfit.train.local.rules import METHODS, make_rule
from memfit.train.local.trainer import TrainConfig, train

MiB = 2**20
# model -> (TrainConfig overrides, epochs, training subset or None for all 60k)
ACCURACY_SETUPS = {
    "mlp": (dict(model="mlp", depth=3, width=256, lr=1e-3), 3, None),
    "cnn": (dict(model="cnn", depth=3, width=16, lr=1e-3), 2, 20000),
    "rnn": (dict(model="rnn", depth=2, width=128, lr=3e-3, rnn_cell="gru"), 2, 12000),
}


def machine_info(threads: int, seed: int) -> dict:
    return _machine_info(threads, seed, device="cpu")


def accuracy_part(data, seed: int, quick: bool) -> tuple[dict, list[dict]]:
    results, curves = {}, []
    for name, (overrides, epochs, n_train) in ACCURACY_SETUPS.items():
        if quick:
            epochs, n_train = 1, 3000
        runs = {}
        for method in METHODS:
            cfg = TrainConfig(dataset="fashion-mnist", method=method, epochs=epochs, batch_size=128, seed=seed,
                              max_train=n_train, **overrides)
            r = train(cfg, data=data).to_json()
            print(f"[{name}] {method}: acc {r['test_accuracy']:.4f}, {r['train_seconds']:.1f} s, overhead "
                  f"{r['peak_overhead_bytes'] / MiB:.2f} MiB, total {r['peak_training_bytes'] / MiB:.2f} MiB",
                  file=sys.stderr, flush=True)
            runs[method] = r
            curves.append(r)
        bp = runs["bp"]
        results[name] = {
            "setup": {**overrides, "epochs": epochs, "batch_size": 128, "train_examples": n_train or 60000,
                      "test_examples": len(data.y_test), "optimizer": "adam", "local_loss": "ce"},
            "methods": {
                m: {
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
        results[name]["weights_and_optimizer_share_of_bp_total"] = round(fixed / bp["peak_training_bytes"], 3)
        tp = results[name]["methods"]["tpsgd"]
        results[name]["targets"] = {
            "tpsgd_within_5_points_of_bp": tp["accuracy_minus_bp_points"] >= -5.0,
            "tpsgd_beats_drtp": tp["test_accuracy"] > results[name]["methods"]["drtp"]["test_accuracy"],
            "tpsgd_beats_dfa": tp["test_accuracy"] > results[name]["methods"]["dfa"]["test_accuracy"],
        }
    return results, curves


def probe(method: str, depth: int, width: int, batch: int, x: torch.Tensor, y: torch.Tensor, seed: int,
          steps: int = 2) -> dict:
    """Peak memory of `steps` training steps of an MLP (no convergence needed to measure peaks)."""
    net = build_model(ModelConfig("mlp", depth, width), (1, 28, 28), 10, seed)
    rule = make_rule(method, net, lambda p: torch.optim.Adam(p, lr=1e-3), 10, seed)
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
    mlp3 = {m: probe(m, 3, 256, 256, x, y, seed) for m in ("bp", "tpsgd")}
    return {
        "width": width, "by_depth_at_batch_1024": depth_rows, "by_batch_at_depth_5": batch_rows,
        "target_5_layer_w1024_b1024": {"tpsgd_overhead_ratio": target["overhead_ratio"],
                                       "tpsgd_total_ratio": target["total_ratio"],
                                       "at_most_one_third": target["overhead_ratio"] <= 1 / 3},
        "mlp3_w256_b256": {
            m: {"overhead_bytes": p["overhead"], "total_bytes": p["total"],
                "weights_optimizer_share_of_total": round((p["params"] + p["optimizer"]) / p["total"], 3)}
            for m, p in mlp3.items()
        } | {"tpsgd_total_ratio": round(mlp3["tpsgd"]["total"] / mlp3["bp"]["total"], 3)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 epoch on 3,000 images, fewer memory points")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_fashion_mnist()
    start = time.perf_counter()
    out: dict = {"benchmark": "train_local", "dataset": "fashion-mnist", "machine": machine_info(args.threads,
                                                                                                args.seed)}
    if not args.skip_accuracy:
        out["accuracy"], curves = accuracy_part(data, args.seed, args.quick)
        out["accuracy_plot"] = str(plot_accuracy_curves(curves, out_dir / "train_local_accuracy.png",
                                                        "Fashion-MNIST test accuracy (mlp, cnn, rnn)"))
    if not args.skip_memory:
        out["memory_scaling"] = memory_part(data, args.seed, args.quick)
        out["memory_plot"] = str(plot_memory_scaling(out["memory_scaling"]["by_depth_at_batch_1024"],
                                                     out["memory_scaling"]["by_batch_at_depth_5"],
                                                     out_dir / "train_local_memory.png"))
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(out, indent=2)
    (out_dir / "train_local.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
