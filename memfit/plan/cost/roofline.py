"""The analytical baseline: latency = call overhead + max(FLOPs / peak FLOP rate of the element type,
compulsory bytes / peak memory bandwidth), with the peaks and the overhead measured on this machine by
IREE itself (large matmuls per element type, a large element-wise copy, a tiny kernel)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memfit.plan.cost.features import flops_bytes
from memfit.plan.cost.kernels import elementwise
from memfit.plan.cost.kernels import contraction
from memfit.plan.cost.parse import Function

PEAK_MATMUL = 512
BW_ELEMS = 1 << 22


@dataclass
class Peaks:
    flops: dict[str, float]     # FLOP/s per element type
    bytes_per_s: float
    overhead_us: float

    def predict_us(self, fn: Function) -> float:
        flops, nbytes = flops_bytes(fn)
        dtype = fn.args[0].dtype if fn.args else "f32"
        rate = self.flops.get(dtype, self.flops["f32"])
        return self.overhead_us + max(flops / rate, nbytes / self.bytes_per_s) * 1e6


def calibration_kernels() -> dict[str, str]:
    """name -> MLIR of the kernels whose measured latency gives the peaks."""
    mm = {"M": PEAK_MATMUL, "K": PEAK_MATMUL, "N": PEAK_MATMUL}
    out = {f"matmul_{dt}": contraction("matmul", dt, mm) for dt in ("f32", "bf16", "i8")}
    out["copy_f32"] = elementwise("f32", [BW_ELEMS], ["scale"], fused=True)
    out["tiny"] = elementwise("f32", [16], ["relu"], fused=True)
    return out


def measure_peaks(repetitions: int = 5) -> Peaks:
    from memfit.plan.cost.label import measure

    lat = {name: measure(mlir, None, repetitions, 0.1).latency_us for name, mlir in calibration_kernels().items()}
    flop = 2.0 * PEAK_MATMUL ** 3
    overhead = lat["tiny"]
    return Peaks(flops={dt: flop / ((lat[f"matmul_{dt}"] - overhead) * 1e-6) for dt in ("f32", "bf16", "i8")},
                 bytes_per_s=BW_ELEMS * 8 / ((lat["copy_f32"] - overhead) * 1e-6), overhead_us=overhead)


def fit_peaks(fns: list[Function], latency_us: np.ndarray, q: float = 0.95) -> Peaks:
    """Peaks read off the training labels instead of calibration kernels: the q-quantile of achieved FLOP/s
    per element type and of achieved bytes/s, and the (1-q)-quantile latency as the call overhead. On a
    loaded machine the calibration kernels under-read the peaks; this is the roofline at its best."""
    fb = np.array([flops_bytes(f) for f in fns])
    lat = np.asarray(latency_us, float)
    overhead = float(np.quantile(lat, 1 - q))
    t = np.maximum(lat - overhead, 1e-3) * 1e-6
    dtypes = np.array([f.args[0].dtype if f.args else "f32" for f in fns])
    flops = {}
    for dt in ("f32", "bf16", "i8"):
        m = (dtypes == dt) & (fb[:, 0] > 0)
        flops[dt] = float(np.quantile(fb[m, 0] / t[m], q)) if m.any() else 1e11
    return Peaks(flops=flops, bytes_per_s=float(np.quantile(fb[:, 1] / t, q)), overhead_us=overhead)
