"""The analytical baseline: latency = call overhead + max(FLOPs / peak FLOP rate of the element type,
compulsory bytes / peak memory bandwidth), with the peaks and the overhead measured on this machine by
IREE itself (large matmuls per element type, a large element-wise copy, a tiny kernel)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memfit.plan.cost.errors import CostModelError
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


@dataclass
class LogBase:
    """A roofline read off the hand-built features alone (features.NAMES: log2 FLOPs, log2 bytes in and
    out, the dtype one-hot), so a model can predict its latency as a residual of it without the parsed
    function: log(overhead + max(FLOPs / rate of the dtype, bytes / bandwidth)), in log-microseconds."""

    flops: dict[str, float]
    bytes_per_s: float
    overhead_us: float

    @classmethod
    def of(cls, p: Peaks) -> "LogBase":
        return cls(dict(p.flops), p.bytes_per_s, p.overhead_us)

    def log_us(self, X: np.ndarray) -> np.ndarray:
        from memfit.plan.cost.features import DTYPES, NAMES

        X = np.atleast_2d(np.asarray(X, float))
        col = {n: X[:, i] for i, n in enumerate(NAMES)}
        flops, nbytes = np.exp2(col["log_flops"]) - 1, np.exp2(col["log_bytes_io"]) - 1
        rate = np.full(len(X), self.flops["f32"])
        for dt in DTYPES:  # X's dtype one-hot; a kernel of none of them is rated as f32
            rate = np.where(col[f"dtype_{dt}"] > 0.5, self.flops.get(dt, self.flops["f32"]), rate)
        return np.log(self.overhead_us + np.maximum(flops / rate, nbytes / self.bytes_per_s) * 1e6)


def fit_log_base(X: np.ndarray, latency_us: np.ndarray, steps: int = 600) -> LogBase:
    """The roofline's five constants (overhead, a FLOP rate per dtype, a bandwidth) fitted to training labels
    by least absolute log error, from the feature vectors (LogBase.log_us). Unlike fit_peaks' quantiles,
    which read a compute-bound kernel's bytes/s as bandwidth, this is a regression: the base a residual model
    starts from. Torch does the descent (this runs where the sequence model trains)."""
    import torch

    from memfit.plan.cost.features import DTYPES, NAMES

    X = np.asarray(X, float)
    y = np.log(np.maximum(np.asarray(latency_us, float), 1e-3))
    col = {n: X[:, i] for i, n in enumerate(NAMES)}
    lf = torch.tensor(col["log_flops"] * np.log(2))                  # (n,) ln FLOPs
    lb = torch.tensor(col["log_bytes_io"] * np.log(2))               # (n,) ln bytes
    onehot = torch.tensor(np.stack([col[f"dtype_{d}"] for d in DTYPES], 1))  # (n, 3)
    onehot[onehot.sum(1) == 0, 0] = 1.0                               # no known dtype: rated as f32
    t = torch.tensor(y)
    # start: overhead the 5% latency quantile, rates and bandwidth the median achieved ones (in /us)
    lo = torch.tensor(float(np.quantile(y, 0.05)), dtype=torch.float64, requires_grad=True)
    lr = torch.full((len(DTYPES),), float(np.median(col["log_flops"] * np.log(2) - y)), dtype=torch.float64,
                    requires_grad=True)
    lbw = torch.tensor(float(np.median(col["log_bytes_io"] * np.log(2) - y)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([lo, lr, lbw], lr=0.05)
    for _ in range(steps):
        pred = torch.logaddexp(lo, torch.maximum(lf - onehot @ lr, lb - lbw))  # ln(overhead + max(...)) us
        loss = (pred - t).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rates = {d: float(np.exp(v)) * 1e6 for d, v in zip(DTYPES, lr.detach().numpy())}
    return LogBase(rates, float(np.exp(lbw.item())) * 1e6, float(np.exp(lo.item())))


@dataclass
class PipeBase:
    """A roofline with a pipe per kind of work, read off the feature vector (features.ALL_NAMES):
    log(overhead + max(compute, bytes in and out / bandwidth)), compute = contraction FLOPs / FLOP rate of the
    dtype + element-wise arithmetic / its rate + transcendentals / theirs + conversions / theirs, in
    log-microseconds. Why: LogBase divides every FLOP by one contraction rate (a transcendental counted as 8),
    so fitted to the training labels it read element-wise chains 1.6x slow, softmax and layer norm 1.5x fast
    (mean log residual per family, Intel host, 2076 training kernels), the error the nets and trees must undo
    and cannot on a family they never saw. Stored with kind "pipes" (base_of reads it back)."""

    flops: dict[str, float]     # contraction FLOP/s per dtype
    arith_per_s: float          # element-wise arithmetic (iterations x ops)
    trans_per_s: float          # transcendentals (exp, tanh, rsqrt, div ...)
    convert_per_s: float        # type conversions
    bytes_per_s: float
    overhead_us: float
    kind: str = "pipes"

    @staticmethod
    def _work(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, 4) work of each pipe, (n,) bytes, (n, 3) dtype one-hot (none: f32) of feature rows."""
        from memfit.plan.cost.features import ALL_NAMES, DTYPES

        X = np.atleast_2d(np.asarray(X, float))
        if X.shape[1] < len(ALL_NAMES):
            raise CostModelError(f"the pipe roofline reads {len(ALL_NAMES)} feature columns, the rows have "
                                 f"{X.shape[1]}")
        col = {n: X[:, i] for i, n in enumerate(ALL_NAMES)}
        work = np.exp2(np.stack([col[n] for n in ("log_contract_flops", "log_arith_elems", "log_trans_elems",
                                                  "log_convert_elems")], 1)) - 1
        onehot = np.stack([col[f"dtype_{d}"] for d in DTYPES], 1)
        onehot[onehot.sum(1) == 0, 0] = 1.0
        return work, np.exp2(col["log_bytes_io"]) - 1, onehot

    def log_us(self, X: np.ndarray) -> np.ndarray:
        from memfit.plan.cost.features import DTYPES

        work, nbytes, onehot = self._work(X)
        rate = onehot @ np.array([self.flops.get(d, self.flops["f32"]) for d in DTYPES])
        compute = work[:, 0] / rate + work[:, 1] / self.arith_per_s + work[:, 2] / self.trans_per_s \
            + work[:, 3] / self.convert_per_s
        return np.log(self.overhead_us + np.maximum(compute, nbytes / self.bytes_per_s) * 1e6)


def fit_pipe_base(X: np.ndarray, latency_us: np.ndarray, steps: int = 1500) -> PipeBase:
    """PipeBase's eight constants fitted to training labels by least absolute log error (as fit_log_base)."""
    import torch

    from memfit.plan.cost.features import DTYPES

    work, nbytes, onehot = PipeBase._work(X)
    y = np.log(np.maximum(np.asarray(latency_us, float), 1e-3))
    lw = torch.tensor(np.log(np.maximum(work, 1e-300)))                   # (n, 4) ln work (very negative: none)
    lb = torch.tensor(np.log(np.maximum(nbytes, 1.0)))                    # (n,) ln bytes
    oh = torch.tensor(onehot)                                             # (n, 3)
    t = torch.tensor(y)
    has = work > 0
    med = lambda a: float(np.median(a)) if len(a) else 0.0  # noqa: E731
    # start: overhead the 5% latency quantile, each rate the median achieved one (per us) where the pipe works
    lo = torch.tensor(float(np.quantile(y, 0.05)), dtype=torch.float64, requires_grad=True)
    lr = torch.full((len(DTYPES),), med(np.log(work[has[:, 0], 0]) - y[has[:, 0]]), dtype=torch.float64,
                    requires_grad=True)
    start = [med(np.log(work[has[:, j], j]) - y[has[:, j]]) for j in (1, 2, 3)]
    lp = torch.tensor(start, dtype=torch.float64, requires_grad=True)    # arith, trans, convert
    lbw = torch.tensor(med(np.log(np.maximum(nbytes, 1.0)) - y), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([lo, lr, lp, lbw], lr=0.05)
    for _ in range(steps):
        terms = torch.stack([lw[:, 0] - oh @ lr, lw[:, 1] - lp[0], lw[:, 2] - lp[1], lw[:, 3] - lp[2]], 1)
        compute = torch.logsumexp(terms, 1)                               # ln of the summed pipe times (us)
        pred = torch.logaddexp(lo, torch.maximum(compute, lb - lbw))
        loss = (pred - t).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    e = lambda v: float(np.exp(v)) * 1e6  # noqa: E731  per us -> per s
    ar, tr, cv = (e(v) for v in lp.detach().numpy())
    return PipeBase({d: e(v) for d, v in zip(DTYPES, lr.detach().numpy())}, ar, tr, cv, e(lbw.item()),
                    float(np.exp(lo.item())))


BASES = {"roofline": LogBase, "pipes": PipeBase}


def base_of(d: dict) -> LogBase | PipeBase:
    """The base a model file stores (Bundle.base, ResidualGBM's): a dict of LogBase's fields (files without a
    "kind", the first encoding), or of PipeBase's with kind "pipes". An unknown kind is refused: it was
    written by a later version."""
    kind = d.get("kind", "roofline")
    if kind not in BASES:
        raise CostModelError(f"cost model base of kind {kind!r} is not known to this version; retrain the model "
                             "(memfit costmodel train) or update memfit")
    return LogBase(**{k: v for k, v in d.items() if k != "kind"}) if kind == "roofline" else PipeBase(**d)


def fit_base(kind: str, X: np.ndarray, latency_us: np.ndarray) -> dict:
    """A base of `kind` ("roofline": LogBase, "pipes": PipeBase) fitted to training labels, as the dict a
    model file stores (base_of reads it back)."""
    from dataclasses import asdict

    if kind == "roofline":
        return asdict(fit_log_base(X, latency_us))
    if kind == "pipes":
        return asdict(fit_pipe_base(X, latency_us))
    raise ValueError(f"unknown base {kind!r}")
