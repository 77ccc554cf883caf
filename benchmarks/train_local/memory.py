"""The memory-scaling part (b) of `python -m benchmarks.train_local`: measured peak memory of one or two training
steps per configuration (no convergence needed), each method against backprop.

probe() (the peaks of one configuration) and memory_part() (MLP width 1024 by depth and by batch, the
unfused tpSGD ablation, a 3-layer MLP and a 3-GRU-layer RNN with and without BPTT windows).
"""
from __future__ import annotations

import contextlib
import sys

import torch
from benchmarks.train_local.common import MiB

from memfit.memory.allocator import AllocatorMeter
from memfit.train.local.memory import TrainingMemoryMeter, optimizer_state_bytes
from memfit.train.local.models import ModelConfig, build_model
from memfit.train.local.rules import METHODS, make_rule
from memfit.train.local.trainer import make_optimizer_factory

# recurrent local rules: detach the state every k steps; 1 = no backprop through time (the memory-lean
# setting of the accuracy table), 28 = full backprop through time inside each layer (never across layers)
RNN_WINDOWS = [1, 28]


def probe(method: str, depth: int, width: int, batch: int, x: torch.Tensor, y: torch.Tensor, seed: int,
          steps: int = 2, fused: bool = True, model: str = "mlp", rnn_window: int = 1, **options) -> dict:
    """Peak memory of `steps` training steps (no convergence needed to measure peaks)."""
    net = build_model(ModelConfig(model, depth, width), (1, 28, 28), 10, seed)
    rule = make_rule(method, net, make_optimizer_factory("adam", 1e-3), 10, seed, fused=fused,
                     rnn_window=rnn_window, **options)
    meter = TrainingMemoryMeter(net)
    with meter:
        for s in range(steps):
            # clone: a slice is a view of the whole 60k-image storage, and the meter counts whole storages
            xb, yb = x[s * batch:(s + 1) * batch].clone(), y[s * batch:(s + 1) * batch].clone()
            # the last step under the allocator meter: by then Adam's state exists, as in any later step
            with AllocatorMeter() if s == steps - 1 else contextlib.nullcontext() as allocator:
                rule.train_step(xb, yb)
    report = meter.report(rule.optimizers, rule.extra_state_bytes)
    fixed = report.param_bytes + report.optimizer_state_bytes + report.extra_state_bytes
    # total: what a step needs at its peak, the allocator's step peak plus what every step keeps
    return {"allocator": allocator.peak_bytes, "overhead": report.peak_overhead_bytes,
            "total": allocator.peak_bytes + fixed, "saved_total": report.peak_training_bytes,
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
                rows.append({key: v, "method": m, "allocator_peak_bytes": p["allocator"],
                             "allocator_ratio": round(p["allocator"] / bp["allocator"], 3),
                             "overhead_bytes": p["overhead"], "total_bytes": p["total"],
                             "overhead_ratio": round(p["overhead"] / bp["overhead"], 3),
                             "total_ratio": round(p["total"] / bp["total"], 3),
                             "weights_optimizer_bytes": p["params"] + p["optimizer"]})
            print(f"[memory] {key}={v} (allocator peak in a step / saved+grads / total): " + ", ".join(
                f"{m} {p['allocator'] / MiB:.1f}/{p['overhead'] / MiB:.1f}/{p['total'] / MiB:.1f} MiB"
                for m, p in peaks.items()),
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
    rnn3 = {f"{m}_window{w}": probe(m, 4, 128, 128, x, y, seed, model="rnn", rnn_window=w)
            for m in ("tpsgd", "dfa") for w in RNN_WINDOWS}
    rnn3.update({f"{m}_leak": probe(m, 4, 128, 128, x, y, seed, model="rnn", rnn_credit="leak",
                                    time_weighting="last") for m in ("tpsgd", "dfa")})
    rnn3["bp"] = probe("bp", 4, 128, 128, x, y, seed, model="rnn")
    return {
        "width": width, "by_depth_at_batch_1024": depth_rows, "by_batch_at_depth_5": batch_rows,
        # the headline is the allocator's peak within a step (what the step really allocates); the saved-tensor
        # overhead (saved for backward + gradients alive) is kept beside it
        "target_5_layer_w1024_b1024": {"tpsgd_allocator_ratio": target["allocator_ratio"],
                                       "tpsgd_allocator_peak_bytes": target["allocator_peak_bytes"],
                                       "bp_allocator_peak_bytes": bp5["allocator_peak_bytes"],
                                       "at_most_one_third": target["allocator_ratio"] <= 1 / 3,
                                       "tpsgd_overhead_ratio": target["overhead_ratio"],
                                       "tpsgd_total_ratio": target["total_ratio"],
                                       "bp_overhead_bytes": bp5["overhead_bytes"],
                                       "tpsgd_overhead_bytes": target["overhead_bytes"],
                                       "tpsgd_unfused_overhead_bytes": unfused["overhead"],
                                       "tpsgd_unfused_allocator_ratio": round(unfused["allocator"]
                                                                              / bp5["allocator_peak_bytes"], 3),
                                       "tpsgd_unfused_overhead_ratio": round(unfused["overhead"]
                                                                             / bp5["overhead_bytes"], 3)},
        "mlp3_w256_b256": {
            m: {"overhead_bytes": p["overhead"], "total_bytes": p["total"],
                "weights_optimizer_share_of_total": round((p["params"] + p["optimizer"]) / p["total"], 3)}
            for m, p in mlp3.items()
        } | {"tpsgd_total_ratio": round(mlp3["tpsgd"]["total"] / mlp3["bp"]["total"], 3)},
        "rnn_3_gru_layers_b128": {k: {"allocator_peak_bytes": v["allocator"],
                                      "allocator_vs_bp": round(v["allocator"] / rnn3["bp"]["allocator"], 3),
                                      "overhead_bytes": v["overhead"],
                                      "overhead_vs_bp": round(v["overhead"] / rnn3["bp"]["overhead"], 3)}
                                  for k, v in rnn3.items()},
    }
