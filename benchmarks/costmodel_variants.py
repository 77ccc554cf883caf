"""Variants of a trained cost model's residual trees and blend, scored on held-out shapes against the recipe's own.

The nets of the model given (`--nets-from`; trained on this seed's shape split, early-stopped on its validation
split) are kept; for each variant the roofline-residual trees are fitted on the training split (early-stopped on
validation, the parameters of gbm.ResidualGBM) and the blend's nets weight and log shift chosen on validation
(as train.fit_blend does), then the 607-odd test kernels are scored once. Each variant's test MAPE is compared
with the recipe's (the same code with the model's own columns: it reproduces the model's blend) by a paired
bootstrap over the test kernels (benchmarks.common.paired_bootstrap).

    OMP_NUM_THREADS=1 python -m benchmarks.costmodel_variants --db costmodel.db --nets-from zen4.safetensors \\
        [--configs vtile_configs] --out benchmarks/results/costmodel_variants_zen4.json

Variants: `working_set` (the trees also read WORKING_SET: the dominant op's operand bytes against this host's L1,
L2 and L3, the B panel K x tile against L1 and L2, the 64x64 workgroups of its output), `huber` (the trees' loss),
`leaves_7` / `leaves_31` (tree size), `calibration` (log true = a + b log blend, b and a chosen on validation),
`family_shift` (a log shift per family chosen on validation), and with --configs `oracle_tile` (the trees read
IREE's own vector tile from the cached configuration dumps of benchmarks.costmodel_vtile_rules instead of the
modelled one: what better tile rules could buy at most; `predict` cannot compile to read it).
Prints one JSON object (--json; a table otherwise); --out also writes it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import emit, header, paired_bootstrap

WORKING_SET = ("ws_log", "ws_l1", "ws_l2", "ws_l3", "a_log", "b_log", "c_log", "panel_log", "panel_l1", "panel_l2",
               "wg_log", "conv_in_log", "max_t_log", "ws_over_l2_log")
WEIGHTS = np.round(np.linspace(0.0, 1.0, 11), 3)
SHIFTS = np.round(np.linspace(-0.3, 0.1, 41), 3)


def working_set(fn, l1: int = 32 << 10, l2: int = 1 << 20, l3: int = 32 << 20, rules=None) -> list[float]:
    """WORKING_SET of a function: its op of most work (FLOPs of a contraction, else iterations), the bytes of
    its operands (log2 and against each cache level), and for a contraction its operands apart, the B panel a
    row tile streams (K x the modelled inner tile) and the 64x64 tiles of its M x N."""
    from memfit.plan.cost import vtiles
    from memfit.plan.cost.gemm import gemm_view, kind
    from memfit.plan.cost.ops import bytes_of, linalg_ops

    ops = linalg_ops(fn)
    f = dict.fromkeys(WORKING_SET, 0.0)
    if not ops:
        return [0.0] * len(WORKING_SET)

    def work(o):
        if gemm_view(o)[0]:
            return o.flops()
        return float(math.prod(o.domain) if o.domain else (o.outs[0].elements if o.outs else 0))

    main = max(ops, key=work)
    bs = [t.elements * bytes_of(t.dtype) for t in (*main.ins, *main.outs)]
    ws = sum(bs)
    f.update(ws_log=math.log2(ws + 1), ws_l1=float(ws > l1), ws_l2=float(ws > l2), ws_l3=float(ws > l3),
             ws_over_l2_log=math.log2(max(ws, 1) / l2), max_t_log=math.log2(max(bs) + 1))
    if gemm_view(main)[0]:
        m, n, k, _ = gemm_view(main)
        inner = vtiles.tile(main, rules or vtiles.SHIPPED)[0]   # by the model's rules (run passes them)
        panel = k * inner * bytes_of(main.ins[0].dtype)
        f.update(a_log=math.log2(bs[0] + 1), b_log=math.log2(bs[1] + 1), c_log=math.log2(bs[-1] + 1),
                 panel_log=math.log2(panel + 1), panel_l1=float(panel > l1), panel_l2=float(panel > l2),
                 wg_log=math.log2(max(m * n / (64 * 64), 1)))
        if kind(main) in ("conv_nhwc", "conv_nchw", "depthwise"):
            f["conv_in_log"] = math.log2(bs[0] + 1)
    return [f[name] for name in WORKING_SET]


def choose_blend(nets: np.ndarray, trees: np.ndarray, true: np.ndarray, va: np.ndarray) -> tuple[np.ndarray, dict]:
    """The nets' weight (ties to the nets) then the log shift (ties to the smallest) of lowest validation MAPE;
    the blended log latency of every kernel and the choice. Only the `va` rows are read."""
    def mape(z):
        return float(np.mean(np.abs(np.exp(z[va]) / true[va] - 1)))

    scores = {w: mape(w * nets + (1 - w) * trees) for w in WEIGHTS}
    w = min(scores, key=lambda x: (scores[x], -x))
    z = w * nets + (1 - w) * trees
    c = min(SHIFTS, key=lambda x: (mape(z + x), abs(x)))
    return z + c, {"weight": float(w), "shift": float(c)}


def calibrate(z: np.ndarray, true: np.ndarray, va: np.ndarray) -> tuple[np.ndarray, dict]:
    """log true = a + b z, b on a grid around 1 and a around the median offset, lowest validation MAPE."""
    y = np.log(true)
    best = None
    for b in np.linspace(0.9, 1.15, 51):
        a0 = float(np.median(y[va] - b * z[va]))
        for a in a0 + np.linspace(-0.2, 0.1, 31):
            s = float(np.mean(np.abs(np.exp(a + b * z[va]) / true[va] - 1)))
            if best is None or s < best[0]:
                best = (s, a, b)
    return best[1] + best[2] * z, {"a": float(best[1]), "b": float(best[2])}


def family_shift(z: np.ndarray, true: np.ndarray, families: np.ndarray, va: np.ndarray) -> tuple[np.ndarray, dict]:
    """A log shift per family (in [-0.3, 0.3]), each of lowest MAPE on that family's validation rows."""
    out, shifts = z.copy(), {}
    grid = np.round(np.linspace(-0.3, 0.3, 61), 3)
    for fam in sorted(set(families.tolist())):
        mv = va[families[va] == fam]
        c = 0.0 if not len(mv) else float(min(grid, key=lambda x: (
            np.mean(np.abs(np.exp(z[mv] + x) / true[mv] - 1)), abs(x))))
        out[families == fam] += c
        shifts[fam] = c
    return out, {"shifts": shifts}


def _trees(X: np.ndarray, resid: np.ndarray, tr: np.ndarray, va: np.ndarray, seed: int = 0, leaves: int = 15,
           objective: str = "l1") -> np.ndarray:
    import lightgbm as lgb

    params = {"objective": objective, "metric": "l1", "learning_rate": 0.03, "num_leaves": leaves,
              "min_data_in_leaf": 5, "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8,
              "lambda_l2": 1.0, "seed": seed, "num_threads": 1, "verbose": -1}
    d = lgb.Dataset(X[tr], resid[tr])
    b = lgb.train(params, d, 3000, valid_sets=[lgb.Dataset(X[va], resid[va], reference=d)],
                  callbacks=[lgb.early_stopping(100, verbose=False)])
    return b.predict(X, num_iteration=b.best_iteration)


def oracle_columns(ex, configs: Path, rules=None) -> tuple[np.ndarray, int, int]:
    """ex.X's vector-tile columns (and the layout columns after them) with IREE's own tile (cached dumps) where a
    kernel's contraction has one; the kernels replaced and how many of them the modelled tile (by `rules`, the
    model's; default SHIPPED) had wrong."""
    from benchmarks.costmodel_vtile_rules import iree_tile
    from memfit.plan.cost import vtiles
    from memfit.plan.cost.features import DEFAULT_NAMES
    from memfit.plan.cost.gemm import gemm_view
    from memfit.plan.cost.ops import linalg_ops

    rules = rules or vtiles.SHIPPED
    X = ex.X.copy()
    at = DEFAULT_NAMES.index(vtiles.VTILE_NAMES[0])
    have = wrong = 0
    for i, (key, fn) in enumerate(zip(ex.keys, ex.roofline_inputs)):
        path = configs / f"{key}.mlir"
        text = path.read_text() if path.exists() else ""
        t = iree_tile(text) if text else None
        ops = [o for o in linalg_ops(fn) if gemm_view(o)[0]] if t else []
        if not ops:
            continue
        op = max(ops, key=lambda o: o.flops())   # vtiles' dominant contraction, as costmodel_vtile_rules reads it
        have += 1
        wrong += tuple(t) != vtiles.tile(op, rules)
        f = vtiles.features_of(*t, op.flops() / 2, vtiles.gathered(op, t[0], rules))
        X[i, at:at + len(vtiles.VTILE_NAMES)] = [f[n] for n in vtiles.VTILE_NAMES]
        lt = at + len(vtiles.VTILE_NAMES)   # the layout columns follow (features.DEFAULT_NAMES)
        X[i, lt:lt + len(vtiles.LAYOUT_NAMES)] = vtiles.layout_of(op, t[0])
    return X, have, wrong


def run(args: argparse.Namespace) -> dict:
    from memfit.plan.cost import dataset, store
    from memfit.plan.cost.features import DEFAULT_NAMES
    from memfit.plan.cost.predict import load_model, vtile_rules
    from memfit.plan.cost.roofline import base_of
    from memfit.plan.cost.train import load

    from memfit.plan.cost.vtiles import rules_named

    bundle = load_model(args.nets_from)
    ex, meta = load(args.db, vtile_rules(bundle))
    rules = rules_named(vtile_rules(bundle))   # the tile the model's columns were computed by
    tr, va, te = dataset.shape_split(ex, args.seed)
    true = ex.Y[:, 0]
    fam = np.array(ex.families)
    idx = np.concatenate([va, te])
    nets = np.full(len(ex), np.nan)
    model = np.full(len(ex), np.nan)
    model[idx] = bundle.predict_log([ex.toks[i] for i in idx], ex.X[idx])[:, 0]
    blend, bundle.blend = bundle.blend, None
    nets[idx] = bundle.predict_log([ex.toks[i] for i in idx], ex.X[idx])[:, 0]
    bundle.blend = blend
    base = bundle.base
    base_log = base_of(base).log_us(ex.X)
    resid = np.log(np.maximum(true, 1e-3)) - base_log
    nd = len(DEFAULT_NAMES)
    X = ex.X[:, :nd]
    out: dict[str, dict] = {}
    ref_err: list[np.ndarray] = []

    def record(name: str, z: np.ndarray, choice: dict) -> None:
        err = np.abs(np.exp(z[te]) / true[te] - 1)
        entry = {"val_mape": float(np.mean(np.abs(np.exp(z[va]) / true[va] - 1))), "test_mape": float(err.mean()),
                 **choice}
        if ref_err:
            d = (err - ref_err[0]) * 100
            lo, hi = paired_bootstrap(d, 10000, 0)
            entry.update(diff_points=float(d.mean()), ci95_points=[lo, hi])
        else:
            ref_err.append(err)
        out[name] = entry
        print(f"{name}: validation {entry['val_mape']:.4f}, test {entry['test_mape']:.4f}", file=sys.stderr)

    t0 = base_log + _trees(X, resid, tr, va, args.seed)
    z0, c0 = choose_blend(nets, t0, true, va)
    record("recipe", z0, c0)
    model_err = np.abs(np.exp(model[te]) / true[te] - 1)
    variants = ["working_set", "huber", "leaves_7", "leaves_31", "calibration", "family_shift"]
    if args.configs:
        variants.append("oracle_tile")
    info: dict = {}
    for v in variants:
        if v == "working_set":
            W = np.array([working_set(fn, rules=rules) for fn in ex.roofline_inputs])
            z, c = choose_blend(nets, base_log + _trees(np.hstack([X, W]), resid, tr, va, args.seed), true, va)
        elif v == "huber":
            z, c = choose_blend(nets, base_log + _trees(X, resid, tr, va, args.seed, objective="huber"), true, va)
        elif v.startswith("leaves_"):
            z, c = choose_blend(nets, base_log + _trees(X, resid, tr, va, args.seed, leaves=int(v[7:])), true, va)
        elif v == "calibration":
            z, c = calibrate(z0, true, va)
        elif v == "family_shift":
            z, c = family_shift(z0, true, fam, va)
        else:
            Xo, have, wrong = oracle_columns(ex, Path(args.configs), rules)
            info["oracle_tile"] = {"kernels_with_iree_tile": have, "modelled_tile_differs": wrong}
            z, c = choose_blend(nets, base_log + _trees(Xo[:, :nd], resid, tr, va, args.seed), true, va)
        record(v, z, c)
    con = store.connect(args.db)
    return {"benchmark": "costmodel_variants",
            **header(1, args.seed, iree_version=meta.get("iree_version"), host_cpu=meta.get("host_cpu"),
                     label_kind=store.label_kind(con)),
            "nets_from": args.nets_from, "split": {"train": len(tr), "validation": len(va), "test": len(te)},
            "model_test_mape": float(model_err.mean()),
            "recipe_reproduces_model": bool(np.allclose(np.exp(z0[te]), np.exp(model[te]), rtol=1e-6)),
            "variants": out, **info}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--nets-from", required=True, help="the trained model whose nets are kept")
    ap.add_argument("--configs", help="cached configuration dumps (benchmarks.costmodel_vtile_rules): oracle_tile")
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (the model's own)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    result = run(args)
    if args.json or args.out:
        emit(result, args.out)
    else:
        for name, v in result["variants"].items():
            diff = (f"  {v['diff_points']:+.2f} ({v['ci95_points'][0]:+.2f}..{v['ci95_points'][1]:+.2f})"
                    if "diff_points" in v else "")
            print(f"{name:14s} validation {v['val_mape']:.4f} test {v['test_mape']:.4f}{diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
