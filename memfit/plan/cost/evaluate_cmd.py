"""`memfit costmodel eval`: the shipped (or given) model and the baselines on the dataset's held-out
shapes (the split is a hash of each shape, so it is the same whichever dataset file holds the kernels)."""
from __future__ import annotations

from pathlib import Path

from memfit.plan.cost import dataset
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.evaluate import plot, report
from memfit.plan.cost.predict import load_model
from memfit.plan.cost.train import load, peaks_of


def held_out(db: str | Path, model: str | None = None, seed: int = 0):
    """The model's latency predictions (us) on a data set's held-out-shapes test kernels: (train, validation and
    test Examples, the data set's meta, the predictions)."""
    from memfit.plan.cost.predict import vtile_rules

    bundle = load_model(model)
    ex, meta = load(db, vtile_rules(bundle))  # the columns as the model reads them
    train_set, val_set, test = (ex.subset(i) for i in dataset.shape_split(ex, seed))
    return train_set, val_set, test, meta, dataset.from_log(bundle.predict_log(test.toks, test.X))[:, 0]


def evaluate(db: str | Path, model: str | None = None, plot_path: str | None = None, seed: int = 0) -> dict:
    train_set, val_set, test, meta, seq = held_out(db, model, seed)
    preds = {"seq": seq}
    try:
        from memfit.plan.cost.gbm import GBM

        preds["lightgbm"] = GBM(seed=seed).fit(train_set, val_set).predict(test)[:, 0]
    except CostModelError:  # LightGBM not installed: the other models still report
        pass
    peaks = peaks_of(meta)
    if peaks is not None:
        import numpy as np

        preds["roofline"] = np.array([peaks.predict_us(f) for f in test.roofline_inputs])
    rep = report(preds, test.Y[:, 0], test.families)
    if plot_path:
        plot(plot_path, preds, test.Y[:, 0], test.families, f"held-out shapes: {len(test)} kernels")
    return {"kernels": len(train_set) + len(val_set) + len(test), "test_kernels": len(test), "report": rep}
