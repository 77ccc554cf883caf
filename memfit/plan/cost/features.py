"""Hand-built features of a kernel, read from its MLIR text alone (what LightGBM and the sequence model's
global input see, and what the roofline computes from): FLOPs, bytes, op counts, the dominant op's
dimensions and alignment, element type."""
from __future__ import annotations

import math
import re

from memfit.plan.cost import paths, vtiles
from memfit.plan.cost.gemm import OP_KINDS
from memfit.plan.cost.gemm import gemm_view as _mnk
from memfit.plan.cost.gemm import kind as _kind
from memfit.plan.cost.ops import TRANSCENDENTAL, LinalgOp, bytes_of, linalg_ops
from memfit.plan.cost.parse import Function

DTYPES = ("f32", "bf16", "i8")
NAMES = ("log_flops", "log_bytes_io", "log_bytes_ops", "log_intensity", "n_ops", *[f"n_{k}" for k in OP_KINDS],
         "n_transcendental", "n_scalar_ops", *[f"dtype_{d}" for d in DTYPES], "log_m", "log_n", "log_k",
         "n_mod16", "k_mod16", "m_mod16", "kh", "stride", "dilation", "log_out_elems", "out_rank",
         "log_inner_dim", "inner_mod16", "n_args", "log_max_reduce", "has_config", "log_tile_m", "log_tile_n",
         "log_tile_k")
# Appended after NAMES (features.full_vector; dataset.Examples.X holds both): the work of each op in elements,
# so that element-wise chains, reductions and convolutions are described by more than their FLOPs and the
# function's bytes. The sequence network reads NAMES only (the columns it was first trained on); the roofline
# residual trees (gbm.ResidualGBM) read all.
EXTRA_NAMES = ("log_work_elems", "log_trans_elems", "log_convert_elems", "log_reduce_elems", "log_parallel_elems",
               "reduce_inner", "log_c_in", "log_c_out", "kw", "log_spatial", "log_bytes_out", "log_inner_in",
               "log_bytes_per_op")
# Then paths.PATH_NAMES: what decides the code path IREE takes (powers of two dividing the vectorised loops, a
# strided contiguous axis, an outer-axis reduction). Default columns are only appended, so a model file reads the
# leading columns it was trained on (Bundle.feature_names, ResidualGBM.n_features); the pipe columns come after
# the vtile ones, so a `--base pipes` model trained before them is refused by check_columns (a clear error).
# Then vtiles.VTILE_NAMES: the vector tile IREE is modelled to give the dominant contraction, and what it costs,
# and vtiles.LAYOUT_NAMES: whether that tile ends in a part-filled vector and how its input is strided.
# DEFAULT_NAMES: the 72 columns a model reads by default (the nets with FitConfig(features="all"), the residual
# trees, the LightGBM baseline); models trained before the vtile columns read the first 62, those trained before
# the layout columns the first 70, and still load. Then
# PIPE_NAMES: the work of each pipe of roofline.PipeBase (contraction FLOPs; element-wise arithmetic), computed
# into every row but read by the nets and trees only with the pipe base (columns(), `--base pipes`: tried, not
# shipped).
DEFAULT_NAMES = (*NAMES, *EXTRA_NAMES, *paths.PATH_NAMES, *vtiles.VTILE_NAMES, *vtiles.LAYOUT_NAMES)
PIPE_NAMES = ("log_contract_flops", "log_arith_elems")
ALL_NAMES = (*DEFAULT_NAMES, *PIPE_NAMES)
_CONVERT = {"extf", "truncf", "extsi", "trunci", "sitofp", "fptosi", "uitofp"}
_VEC = re.compile(r"vector_common_parallel\s*=\s*\[(\d+),\s*(\d+)")
_RED = re.compile(r"vector_reduction\s*=\s*\[[^\]]*?(\d+)\]")


def features(fn: Function) -> dict[str, float]:
    ops = linalg_ops(fn)
    flops = sum(o.flops() for o in ops)
    io = sum(t.elements * bytes_of(t.dtype) for t in (*fn.args, *fn.results))
    op_bytes = sum(o.bytes() for o in ops)
    f: dict[str, float] = {n: 0.0 for n in NAMES}
    f.update(log_flops=math.log2(flops + 1), log_bytes_io=math.log2(io + 1), log_bytes_ops=math.log2(op_bytes + 1),
             log_intensity=math.log2((flops + 1) / (io + 1)), n_ops=len(ops), n_args=len(fn.args))
    for o in ops:
        f[f"n_{_kind(o)}"] += 1
        for sop, n in o.scalar_ops.items():
            f["n_scalar_ops"] += n
            f["n_transcendental"] += n if sop in TRANSCENDENTAL else 0
        if o.reductions and o.domain:
            f["log_max_reduce"] = max(f["log_max_reduce"], math.log2(o.domain[-1] + 1))
    dtype = fn.args[0].dtype if fn.args else "f32"
    if f"dtype_{dtype}" in f:
        f[f"dtype_{dtype}"] = 1.0
    contractions = [o for o in ops if _mnk(o)[0]]
    if contractions:
        main = max(contractions, key=lambda o: o.flops())
        m, n, k, kh = _mnk(main)
        f.update(log_m=math.log2(m), log_n=math.log2(n), log_k=math.log2(k), n_mod16=float(n % 16 == 0),
                 k_mod16=float(k % 16 == 0), m_mod16=float(m % 16 == 0), kh=kh, stride=main.strides,
                 dilation=main.dilations)
    if fn.results:
        out = fn.results[0]
        f.update(log_out_elems=math.log2(out.elements + 1), out_rank=len(out.shape),
                 log_inner_dim=math.log2(out.shape[-1] + 1) if out.shape else 0.0,
                 inner_mod16=float(bool(out.shape) and out.shape[-1] % 16 == 0))
    vec, red = _VEC.search(fn.body), _RED.search(fn.body)
    if vec:  # an explicit lowering config (the tuning candidates): its vector tile sizes
        f.update(has_config=1.0, log_tile_m=math.log2(int(vec.group(1)) + 1), log_tile_n=math.log2(int(vec.group(2)) + 1),
                 log_tile_k=math.log2(int(red.group(1)) + 1) if red else 0.0)
    return f


def _work(op: LinalgOp) -> float:
    """Loop iterations of an op: its domain (generic), or multiply-adds (contractions), or its output."""
    if op.domain:
        return float(math.prod(op.domain))
    if _mnk(op)[0]:
        return op.flops() / 2
    return float(op.outs[0].elements) if op.outs else 0.0


def extra(fn: Function) -> dict[str, float]:
    """EXTRA_NAMES of a function (see there)."""
    ops = linalg_ops(fn)
    f = {n: 0.0 for n in EXTRA_NAMES}
    work = trans = convert = 0.0
    for o in ops:
        w = _work(o)
        work += w
        trans += w * sum(n for sop, n in o.scalar_ops.items() if sop in TRANSCENDENTAL)
        convert += w * sum(n for sop, n in o.scalar_ops.items() if sop in _CONVERT)
    f.update(log_work_elems=math.log2(work + 1), log_trans_elems=math.log2(trans + 1),
             log_convert_elems=math.log2(convert + 1), log_bytes_per_op=math.log2(
                 sum(o.bytes() for o in ops) / max(len(ops), 1) + 1))
    reducing = [o for o in ops if o.reductions and len(o.iterators) == len(o.domain)]
    if reducing:
        r = max(reducing, key=_work)
        red = math.prod(d for d, it in zip(r.domain, r.iterators) if it == "reduction")
        par = math.prod(d for d, it in zip(r.domain, r.iterators) if it == "parallel")
        f.update(log_reduce_elems=math.log2(red + 1), log_parallel_elems=math.log2(par + 1),
                 reduce_inner=float(r.iterators[-1] == "reduction"))
    convs = [o for o in ops if _kind(o) in ("conv_nhwc", "conv_nchw", "depthwise")]
    if convs:
        c = max(convs, key=lambda o: o.flops())
        k, out, w = _kind(c), c.outs[0].shape, c.ins[1].shape
        if k == "conv_nhwc":      # filter HWCF
            cin, cout, kw = w[2], w[3], w[1]
        elif k == "conv_nchw":    # filter FCHW
            cin, cout, kw = w[1], w[0], w[3]
        else:                     # depthwise, filter HWC
            cin, cout, kw = w[2], w[2], w[1]
        spatial = out[2] * out[3] if k == "conv_nchw" else out[1] * out[2]
        f.update(log_c_in=math.log2(cin), log_c_out=math.log2(cout), kw=kw, log_spatial=math.log2(spatial))
    if fn.results:
        f["log_bytes_out"] = math.log2(sum(t.elements * bytes_of(t.dtype) for t in fn.results) + 1)
    if fn.args and fn.args[0].shape:
        f["log_inner_in"] = math.log2(fn.args[0].shape[-1] + 1)
    return f


def pipes(fn: Function) -> dict[str, float]:
    """PIPE_NAMES: log2(1 + FLOPs of the contractions: matmuls, convolutions), and log2(1 + arithmetic of the
    other ops: iterations x arith/math ops of the body that are neither transcendental nor conversions, which
    EXTRA_NAMES' log_trans_elems and log_convert_elems count; a body of none, a copy or a transpose, counts one
    op an iteration). Fills count nothing."""
    contract = arith = 0.0
    for o in linalg_ops(fn):
        if _mnk(o)[0]:
            contract += o.flops()
        elif o.short != "fill":
            n = sum(c for sop, c in o.scalar_ops.items()
                    if sop not in TRANSCENDENTAL and sop not in _CONVERT and sop not in ("constant", "select"))
            arith += _work(o) * (n if o.scalar_ops else 1)
    return {"log_contract_flops": math.log2(contract + 1), "log_arith_elems": math.log2(arith + 1)}


def columns(base: str | None) -> tuple[str, ...]:
    """The leading columns of ALL_NAMES that a model with this roofline base (FitConfig.base, or a stored
    base's "kind") reads: DEFAULT_NAMES, and PIPE_NAMES after them only with the pipe base ("pipes")."""
    return ALL_NAMES if base == "pipes" else DEFAULT_NAMES


def flops_bytes(fn: Function) -> tuple[float, float]:
    """(FLOPs, compulsory bytes: the function's inputs and outputs) for the roofline."""
    ops = linalg_ops(fn)
    return (sum(o.flops() for o in ops),
            float(sum(t.elements * bytes_of(t.dtype) for t in (*fn.args, *fn.results))))


def vector(fn: Function) -> list[float]:
    f = features(fn)
    return [float(f[n]) for n in NAMES]


def full_vector(fn: Function, vtile_rules: vtiles.Rules = vtiles.SHIPPED) -> list[float]:
    """ALL_NAMES: NAMES, EXTRA_NAMES, paths.PATH_NAMES, vtiles.VTILE_NAMES and LAYOUT_NAMES (the tile by
    `vtile_rules`: the model's, Bundle.vtile_rules), then PIPE_NAMES (what dataset.Examples.X and `predict`
    hold)."""
    e, p = extra(fn), pipes(fn)
    return (vector(fn) + [float(e[n]) for n in EXTRA_NAMES] + paths.vector(fn) + vtiles.columns(fn, vtile_rules)
            + [float(p[n]) for n in PIPE_NAMES])
