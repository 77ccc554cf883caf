"""Train and compare: the sequence model against the LightGBM and roofline baselines, on held-out shapes
(the split the shipped model is trained on) and on each held-out family."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memfit.plan.cost import dataset, store
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.evaluate import report
from memfit.plan.cost.fit import FitConfig, fit_seq
from memfit.plan.cost.roofline import Peaks, base_of, fit_base, fit_log_base, fit_peaks
from memfit.plan.cost.seq import Bundle

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "assets" / "costmodel" / "llvm_cpu_host.safetensors"
# Every shipped model, one a labelling host (each one's info["host_cpu"] names it): predict takes the one trained
# on this CPU where there is one, else DEFAULT_MODEL (and warns). llvm_cpu_host: an Intel Sapphire-Rapids-class
# Xeon's labels; llvm_cpu_host_zen4: an AMD EPYC Zen 4's (the same 3000 kernels, docs/costmodel.md).
SHIPPED_MODELS = tuple(sorted(DEFAULT_MODEL.parent.glob("llvm_cpu_host*.safetensors")))
# The labelling CPU's family and model (/proc/cpuinfo) where the model name and flags do not tell generations apart
# (a VM's "AMD EPYC" is Zen 4 or Zen 5 alike): predict takes such a file only on that family and model.
SHIPPED_CPU_IDS = {"llvm_cpu_host_zen4.safetensors": ("25", "17")}


@dataclass
class TrainConfig:
    fit: FitConfig = field(default_factory=FitConfig)
    baselines: bool = True
    blend: bool = True               # blend the nets with roofline-residual trees (weight chosen on validation)
    families: tuple[str, ...] = ()   # also hold out each of these families in turn
    family_epochs: int = 12
    # sizes of the residual trees; with several, the blend's validation MAPE picks one. The shipped recipe uses 15
    # (15 and 31 with the pipe base: 18.7% on validation against 19.5%, 19.5% on the test shapes against 19.1%)
    leaves: tuple[int, ...] = (15,)
    # residual trees of each kind of kernel too (gbm.ResidualGBM's by_kind), averaged with the shared trees
    by_kind: bool = False
    # the vector-tile columns' rules (vtiles.RULES; vtiles.DEFAULT_RULES, "odd_n", the shipped Intel model's);
    # a model records the ones it was trained with
    vtile_rules: str = "odd_n"
    # the held-out-shapes split's seed (None: fit.seed's); another fit.seed over the same split retrains the nets
    # and trees from other seeds on the same test kernels, so that two runs' paired difference can be repeated
    split_seed: int | None = None
    # train and validate on the first N kernels of the file only (in the order drawn), test on all of its held-out
    # shapes: models trained on more or fewer labels are scored on the same test kernels (a learning curve)
    train_first: int | None = None


def load(db: str | Path, vtile_rules: str | None = None) -> tuple[dataset.Examples, dict]:
    if not Path(db).exists():
        raise CostModelError(f"no dataset at {db}: run `memfit costmodel generate --out {db}` and `label` first")
    con = store.connect(db)
    rows = store.labelled(con)
    if len(rows) < 20:
        raise CostModelError(f"{db} has {len(rows)} labelled kernels; label at least 20 (memfit costmodel label)")
    return dataset.from_rows(rows, vtile_rules), store.meta(con)


def peaks_of(meta: dict) -> Peaks | None:
    p = meta.get("peaks")
    return Peaks(**p) if p else None


def fit_blend(bundle: Bundle, tr: dataset.Examples, va: dataset.Examples, seed: int = 0,
              weights: np.ndarray = np.linspace(0.0, 1.0, 11),
              shifts: np.ndarray = np.linspace(-0.3, 0.1, 41), leaves: tuple[int, ...] = (15,),
              by_kind: bool = False) -> dict:
    """Roofline-residual trees (gbm.ResidualGBM, on the nets' own roofline base) and the nets' share of the
    blended log latency, the weight with the lowest validation MAPE (1: the nets alone), then the log shift
    of the blend with the lowest validation MAPE. With several `leaves`, trees of each size are fitted and the
    size whose blend scores lowest on validation is kept. Sets bundle.blend and returns the validation MAPE of
    each weight (unshifted) for the size kept."""
    from memfit.plan.cost.gbm import ResidualGBM
    from memfit.plan.cost.metrics import mape

    bundle.blend = None
    base = bundle.base or fit_base("roofline", tr.X, tr.Y[:, 0])
    nets = bundle.predict_log(va.toks, va.X)[:, 0]
    best_fit = None
    for n_leaves in leaves:
        g = ResidualGBM(base, seed=seed, num_leaves=n_leaves, by_kind=by_kind).fit(tr, va)
        trees = g.predict_log(va.X)
        scores = {round(float(w), 3): mape(np.exp(w * nets + (1 - w) * trees), va.Y[:, 0]) for w in weights}
        best = min(scores, key=lambda w: (scores[w], -w))  # ties go to the nets
        # then one log shift of the blend (MAPE charges an over-estimate more than an under-estimate of the
        # same ratio, so its best constant sits below the median the trees and nets aim at)
        blended = best * nets + (1 - best) * trees
        by_shift = {round(float(c), 3): mape(np.exp(blended + c), va.Y[:, 0]) for c in shifts}
        shift = min(by_shift, key=lambda c: (by_shift[c], abs(c)))
        if best_fit is None or by_shift[shift] < best_fit[4][best_fit[3]]:
            best_fit = (n_leaves, g, scores, shift, by_shift, best)
    n_leaves, g, scores, shift, by_shift, best = best_fit
    if best < 1.0 or shift != 0.0:
        bundle.blend = {**g.to_json(), "weight": best, "shift": shift}
    bundle.info.update(blend_weight=best, blend_shift=shift, blend_val_mape=by_shift[shift],
                       nets_val_mape=scores.get(1.0), trees_val_mape=scores.get(0.0), trees_leaves=n_leaves,
                       trees_by_kind=sorted(g.kind_trees))
    return scores


def compare(ex: dataset.Examples, split: tuple, meta: dict, fit_cfg: FitConfig, baselines: bool = True,
            verbose: bool = True, blend: bool = True, leaves: tuple[int, ...] = (15,),
            by_kind: bool = False) -> tuple[Bundle, dict, dict]:
    """Fit on split[0] (validate on split[1]); latency predictions of every model on split[2]. With `blend`,
    "seq" is the nets blended with roofline-residual trees (fit_blend), and "seq_nets" the nets alone."""
    tr, va, te = (ex.subset(i) for i in split)
    bundle = fit_seq(tr, va, fit_cfg, verbose)
    preds = {}
    if blend:
        nets_only = bundle.predict_log(te.toks, te.X)[:, 0]
        scores = fit_blend(bundle, tr, va, fit_cfg.seed, leaves=leaves, by_kind=by_kind)
        if verbose:
            print("blend, validation MAPE by the nets' weight: " +
                  ", ".join(f"{w:g} {m:.3f}" for w, m in scores.items()), file=sys.stderr)
        preds["seq_nets"] = np.exp(nets_only)
        if bundle.blend is not None:
            from memfit.plan.cost.gbm import ResidualGBM

            preds["seq_trees"] = np.exp(ResidualGBM.from_json(bundle.blend).predict_log(te.X))
    all_pred = dataset.from_log(bundle.predict_log(te.toks, te.X))
    preds = {"seq": all_pred[:, 0], **preds}
    counts = {"seq": {t: _count_err(all_pred[:, j], te.Y[:, j]) for j, t in enumerate(dataset.TARGETS[1:], 1)}}
    if baselines:
        from memfit.plan.cost.gbm import GBM

        g = GBM(seed=fit_cfg.seed, base=fit_cfg.base).fit(tr, va).predict(te)
        preds["lightgbm"] = g[:, 0]
        counts["lightgbm"] = {t: _count_err(g[:, j], te.Y[:, j]) for j, t in enumerate(dataset.TARGETS[1:], 1)}
        peaks = peaks_of(meta)
        if peaks is not None:
            preds["roofline"] = np.array([peaks.predict_us(f) for f in te.roofline_inputs])
        fitted = fit_peaks(tr.roofline_inputs, tr.Y[:, 0])
        preds["roofline_fit"] = np.array([fitted.predict_us(f) for f in te.roofline_inputs])
        # the roofline's constants fitted to the training labels by least log error: the base the sequence
        # model's residual starts from, and the strongest analytical baseline
        preds["roofline_lsq"] = np.exp(fit_log_base(tr.X, tr.Y[:, 0]).log_us(te.X))
        # the roofline with a pipe per kind of work (roofline.PipeBase), fitted the same way
        preds["roofline_pipes"] = np.exp(base_of(fit_base("pipes", tr.X, tr.Y[:, 0])).log_us(te.X))
    rep = report(preds, te.Y[:, 0], te.families)
    rep["_static"] = counts
    return bundle, rep, {"true": te.Y[:, 0].tolist(), "families": te.families,
                         **{k: v.tolist() for k, v in preds.items()}}


def _count_err(pred, true) -> dict:
    """Static counts: MAPE over kernels where the count is non-zero, and the mean absolute error."""
    nz = true > 0
    return {"mape_nonzero": float(np.mean(np.abs(pred[nz] - true[nz]) / true[nz])) if nz.any() else None,
            "mae": float(np.mean(np.abs(pred - true)))}


def _first_only(split: tuple, keys: list[str], first: set[str]) -> tuple:
    """The split with its training and validation kernels cut to `first`; the test kernels unchanged."""
    tr, va, te = split
    keep = lambda idx: np.array([i for i in idx if keys[i] in first], dtype=idx.dtype)  # noqa: E731
    return keep(tr), keep(va), te


def train(db: str | Path, out: str | Path, cfg: TrainConfig, verbose: bool = True) -> dict:
    ex, meta = load(db, cfg.vtile_rules)
    split_seed = cfg.fit.seed if cfg.split_seed is None else cfg.split_seed
    split = dataset.shape_split(ex, split_seed)
    if cfg.train_first is not None:
        if cfg.families:  # the held-out families are trained on every other family's kernels, not on the first N
            raise CostModelError("train_first cuts the held-out-shapes split; it does not apply to held-out families")
        con = store.connect(db)
        try:
            split = _first_only(split, ex.keys, store.first_keys(con, cfg.train_first))
        finally:
            con.close()
        if len(split[0]) < 20 or len(split[1]) == 0:  # as load() asks of the whole file; the trees need validation
            raise CostModelError(f"the first {cfg.train_first} kernels hold {len(split[0])} training and "
                                 f"{len(split[1])} validation kernels; take more (at least 20 training, 1 validation)")
    if verbose:
        print(f"{len(ex)} kernels: {len(split[0])} train, {len(split[1])} validation, {len(split[2])} test "
              "(held-out shapes)", file=sys.stderr)
    bundle, rep, preds = compare(ex, split, meta, cfg.fit, cfg.baselines, verbose, cfg.blend, cfg.leaves, cfg.by_kind)
    bundle.info.update(iree_version=meta.get("iree_version"), host_cpu=meta.get("host_cpu"),
                       label_kind=meta.get("label_kind", "real_median"),
                       split="shapes", split_seed=split_seed, test_kernels=len(split[2]), test=rep["seq"]["all"])
    if cfg.train_first is not None:
        bundle.info["train_first"] = cfg.train_first
    if cfg.vtile_rules != "shipped":  # a file without the key is read with the shipped rules (every earlier model)
        bundle.info["vtile_rules"] = cfg.vtile_rules
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    bundle.save(str(out))
    result = {"kernels": len(ex), "shapes": rep, "shapes_predictions": preds, "model": str(out),
              "model_bytes": Path(out).stat().st_size}
    if cfg.families:
        result["families"] = family_holdouts(ex, meta, cfg, verbose)
    return result


def family_holdouts(ex: dataset.Examples, meta: dict, cfg: TrainConfig, verbose: bool = True) -> dict:
    """Each family of cfg.families held out in turn (trained on the others). The tuning candidates are left
    out: tiled f32 matmuls in the training set would make 'matmul held out' untrue."""
    from memfit.plan.cost.families import TUNED

    keep = np.flatnonzero(np.array(ex.families) != TUNED)
    ex = ex.subset(keep)
    out = {}
    for fam in cfg.families:
        fcfg = FitConfig(**{**cfg.fit.__dict__, "epochs": cfg.family_epochs})
        _, frep, _ = compare(ex, dataset.family_split(ex, fam, cfg.fit.seed), meta, fcfg, cfg.baselines, verbose,
                             cfg.blend, cfg.leaves, cfg.by_kind)
        out[fam] = {k: v["all"] for k, v in frep.items() if not k.startswith("_")}
        if verbose:
            print(f"held-out family {fam}: " + ", ".join(f"{k} MAPE {v['mape']:.3f} Spearman {v['spearman']:.3f}"
                                                       for k, v in out[fam].items()), file=sys.stderr)
    return out
