"""A cost model of the CPU optimizer step over local DRAM and CXL memory, fitted to published measurements.

Its numbers are *modelled*, never measured: they say what the fitted model predicts for a placement, on the
hardware the measurements came from, and are reported under keys that say so.

The data: the optimizer-step measurements of Liaw and Chen ("Analysis and Optimized CXL-Attached Memory
Allocation for Long-Context LLM Fine-Tuning", arXiv 2507.03305) as published by the first author in
github.com/DandinPower/numa-cpu-adam-bench (example/*.csv at 0d9dbb8): DeepSpeed's CPU Adam on fp32 tensors of
the sizes of Qwen2.5-7B's and Mistral-Nemo-12B's matrices, one process, `numactl --membind` to the local
node (0) or the CXL add-in card's node (3), and `--weighted-interleave 0,3` with weights 1:1. These are the
measurements behind the paper's "~4x slower once data exceeds ~20M elements".

The model, per update call over n elements whose bytes lie on nodes i in shares f_i:

    t = max_i(fixed_i) + n * [h * s_cache + (1 - h) * max_i(f_i * s_i)]

- `fixed_i` the tier's cost per update call, whatever its size (its latency: the first misses, the set-up);
- `s_i` (seconds per element streamed from node i; as a bandwidth, 28 bytes of Adam traffic per element
  divided by s_i: read parameter, gradient and both moments, write parameter and moments);
- the nodes of one call stream in parallel, so the slowest share bounds it (what interleaving shows:
  1:1 over local and CXL takes the CXL half's time, not the sum); but never below all of the traffic at the
  local rate (the most the measured cores streamed: spreading over devices is not assumed to lift it);
- `h` the share served from the CPU cache, `min(1, cache_elements / n)` in the benchmark (the same tensor
  updated over and over); in a training step the reuse distance is the whole optimizer state, so the
  trainer passes that instead (`working_set`).

Fitted (relative least squares over the 16 local and CXL points, the cache size by a grid search): local
274.6 GB/s and 0.059 ms a call, CXL 67.4 GB/s (4.08x slower) and 0.108 ms a call, cache 12.4M elements; RMS
relative error 8.6%. The 1:1 interleave points, not used in the fit, are predicted within 4.4% from 67M
elements up (+20% at 21M; the smallest point, 0.48 ms, sits above both pure placements and is not matched).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SOURCE = ("arXiv 2507.03305 (Liaw, Chen); measurements from github.com/DandinPower/numa-cpu-adam-bench "
          "example/*.csv @ 0d9dbb8: DeepSpeed CPU Adam, fp32, 1 process, local node 0 vs CXL node 3")
ADAM_BYTES_PER_ELEMENT = 28  # fp32: read p, g, m, v (16 B), write p, m, v (12 B)

# (elements, milliseconds) per placement, one process ("ngpus" 1), both models' matrix sizes.
MEASURED: dict[str, list[tuple[int, float]]] = {
    "local": [(1835008, 0.170526), (12845056, 0.806493), (67895296, 6.311845), (544997376, 54.825270),
              (5242880, 0.257940), (20971520, 1.538835), (73400320, 6.903475), (671088640, 67.625959)],
    "cxl": [(1835008, 0.183936), (12845056, 0.917714), (67895296, 23.753641), (544997376, 228.824446),
            (5242880, 0.444306), (20971520, 4.220534), (73400320, 25.723525), (671088640, 273.293186)],
    # held out: 1:1 interleave over local and CXL
    "interleave": [(1835008, 0.477450), (12845056, 0.753121), (67895296, 12.033218), (544997376, 106.752929),
                   (5242880, 0.372647), (20971520, 2.074928), (73400320, 13.258038), (671088640, 138.926295)],
}


@dataclass(frozen=True)
class TierCost:
    """A memory tier's fitted streaming cost."""

    name: str
    seconds_per_element: float
    fixed_seconds: float  # per update call: the tier's latency-like cost (the first lines' misses, set-up)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return ADAM_BYTES_PER_ELEMENT / self.seconds_per_element


@dataclass(frozen=True)
class CostModel:
    local: TierCost
    cxl: TierCost
    cache_elements: float
    seconds_per_cached_element: float
    rms_relative_error: float

    def update_seconds(self, n: float, shares: Mapping[str, float], working_set: float | None = None) -> float:
        """Modelled seconds of one Adam update over n fp32 elements with `shares` {tier: fraction} of its bytes
        per tier ("local", "cxl", or "cxl:K" for the K-th of several CXL devices, each streaming in parallel
        with the others). `working_set`: elements touched between two updates of the same data."""
        return self.traffic_seconds(n, {t: f * n * ADAM_BYTES_PER_ELEMENT for t, f in shares.items()}, working_set)

    def traffic_seconds(self, n: float, traffic: Mapping[str, float], working_set: float | None = None) -> float:
        """The same with the update's memory traffic given in bytes per tier (any mix of tensors and dtypes):
        fixed + n * h * cached cost + (1 - h) * the slowest tier's bytes / its bandwidth."""
        if n <= 0:
            return 0.0
        reuse = n if working_set is None else max(working_set, n)
        h = min(1.0, self.cache_elements / reuse)
        slowest = max((b / self.tier(t).bandwidth_bytes_per_s for t, b in traffic.items()), default=0.0)
        # No faster than all of it from local DRAM: the fitted local rate is the most these cores were seen to
        # stream, and nothing measured says spreading over more devices lifts that ceiling.
        slowest = max(slowest, sum(traffic.values()) / self.local.bandwidth_bytes_per_s)
        fixed = max((self.tier(t).fixed_seconds for t, b in traffic.items() if b > 0), default=0.0)
        return fixed + n * h * self.seconds_per_cached_element + (1 - h) * slowest

    def tier(self, name: str) -> TierCost:
        return self.local if name == "local" else self.cxl  # "cxl", "cxl:K": a device of the fitted kind

    def stream_seconds(self, nbytes: float, tier: str) -> float:
        """Seconds to stream nbytes once from a tier at its fitted bandwidth (no cache reuse)."""
        return nbytes / self.tier(tier).bandwidth_bytes_per_s

    def validation(self) -> list[dict]:
        """The held-out 1:1 interleave points against the model's prediction."""
        out = []
        for n, ms in sorted(MEASURED["interleave"]):
            pred = self.update_seconds(n, {"local": 0.5, "cxl": 0.5}) * 1e3
            out.append({"elements": n, "measured_ms": ms, "modelled_ms": round(pred, 4),
                        "error": round(pred / ms - 1, 4)})
        return out

    def to_json(self) -> dict:
        return {"source": SOURCE, "local_gb_per_s": round(self.local.bandwidth_bytes_per_s / 1e9, 2),
                "cxl_gb_per_s": round(self.cxl.bandwidth_bytes_per_s / 1e9, 2),
                "cache_elements": round(self.cache_elements),
                "local_fixed_ms": round(self.local.fixed_seconds * 1e3, 4),
                "cxl_fixed_ms": round(self.cxl.fixed_seconds * 1e3, 4),
                "rms_relative_error": round(self.rms_relative_error, 4), "held_out_interleave": self.validation()}


def fit(measured: Mapping[str, Sequence[tuple[int, float]]] = MEASURED) -> CostModel:
    """Least squares on relative error: for each candidate cache size, the two tiers' fixed times, the cached
    cost and the two tiers' streaming costs are linear; keep the cache size with the smallest error (all
    costs >= 0)."""
    best = None
    for cache in np.geomspace(1e6, 5e7, 200):
        rows, target = [], []
        for tier_ix, tier in enumerate(("local", "cxl")):
            for n, ms in measured[tier]:
                over = max(0.0, n - cache)
                row = [float(tier_ix == 0), float(tier_ix == 1), min(n, cache), over if tier_ix == 0 else 0.0,
                       over if tier_ix == 1 else 0.0]
                rows.append(np.array(row) / (ms * 1e-3))
                target.append(1.0)
        a = np.array(rows)
        x, *_ = np.linalg.lstsq(a, np.array(target), rcond=None)
        if (x < 0).any():
            continue
        err = float(np.sqrt(np.mean((a @ x - 1) ** 2)))
        if best is None or err < best[0]:
            best = (err, cache, x)
    if best is None:
        raise ValueError("no non-negative fit of the CXL cost model to these measurements")
    err, cache, (fixed_local, fixed_cxl, cached, s_local, s_cxl) = best
    # The fitted form bills n - cache at the streaming cost; as shares of n (update_seconds) that is the same
    # model with h = cache / n, exactly, for n >= cache.
    return CostModel(TierCost("local", float(s_local), float(fixed_local)),
                     TierCost("cxl", float(s_cxl), float(fixed_cxl)), float(cache), float(cached), err)


_MODEL: CostModel | None = None


def default_model() -> CostModel:
    global _MODEL
    if _MODEL is None:
        _MODEL = fit()
    return _MODEL
