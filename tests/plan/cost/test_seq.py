"""The sequence model learns from tokens and features, and survives a save/load round trip."""
import numpy as np
import pytest

from memfit.plan.cost import dataset, families
from memfit.plan.cost.fit import FitConfig, fit_seq
from memfit.plan.cost.metrics import spearman
from memfit.plan.cost.seq import Bundle


def synthetic(n: int, seed: int) -> dataset.Examples:
    """Generated kernels with a made-up latency that grows with FLOPs and bytes (no IREE needed)."""
    rows = [{"key": k.key(), "family": k.family, "shape_key": k.shape_key(), "mlir": k.mlir()}
            for k in families.generate(n, seed=seed)]
    ex = dataset.from_rows(rows)
    f = {name: ex.X[:, i] for i, name in enumerate(__import__("memfit.plan.cost.features",
                                                              fromlist=["NAMES"]).NAMES)}
    ex.Y[:, 0] = 1.0 + 2 ** f["log_flops"] / 5e4 + 2 ** f["log_bytes_io"] / 2e4
    ex.Y[:, 1] = 50 + 10 * f["n_ops"]
    return ex


def test_learns_and_round_trips(tmp_path):
    ex = synthetic(90, seed=0)
    tr, va = ex.subset(np.arange(0, 70)), ex.subset(np.arange(70, 90))
    bundle = fit_seq(tr, va, FitConfig(epochs=12, d=32, layers=2, patience=50, seeds=1), verbose=False)
    pred = dataset.from_log(bundle.predict_log(va.toks, va.X))
    assert spearman(pred[:, 0], va.Y[:, 0]) > 0.7
    path = tmp_path / "m.safetensors"
    bundle.save(str(path))
    again = Bundle.load(str(path))
    pred2 = dataset.from_log(again.predict_log(va.toks, va.X))
    assert np.allclose(pred2[:, 0], pred[:, 0], rtol=0.05)  # weights stored as float16
    assert again.vocab == bundle.vocab


@pytest.mark.parametrize("split", ["shapes", "families"])
def test_splits_hold_out_whole_groups(split):
    ex = synthetic(120, seed=1)
    tr, va, te = (dataset.shape_split(ex) if split == "shapes" else dataset.family_split(ex, "conv"))
    assert len(tr) and len(te) and not (set(tr) & set(te)) and not (set(va) & set(te))
    key = (lambda i: ex.shape_keys[i]) if split == "shapes" else (lambda i: ex.families[i])
    assert not ({key(i) for i in tr} & {key(i) for i in te})


def test_ensembles_of_two_runs_average_and_refuse_unlike_models(tmp_path):
    """Bundle.with_nets_of: the nets of a run from other seeds on the same split join an ensemble whose log
    prediction is the mean of both runs' (equal counts), the blend dropped; a model of other data is refused."""
    from memfit.plan.cost.errors import CostModelError

    ex = synthetic(90, seed=0)
    tr, va = ex.subset(np.arange(0, 70)), ex.subset(np.arange(70, 90))
    cfg = dict(epochs=2, d=32, layers=2, patience=50, seeds=1)
    a = fit_seq(tr, va, FitConfig(seed=0, **cfg), verbose=False)
    b = fit_seq(tr, va, FitConfig(seed=1, **cfg), verbose=False)
    a.blend = {"weight": 1.0, "shift": 0.1}
    both = a.with_nets_of(b)
    assert len(both.nets) == 2 and both.blend is None and both.info["seeds"] == 2 and len(a.nets) == 1
    a.blend = None
    za, zb, z = (m.predict_log(va.toks, va.X)[:, 0] for m in (a, b, both))
    assert not np.allclose(za, zb) and np.allclose(z, (za + zb) / 2, atol=1e-5)
    both.save(str(tmp_path / "e.safetensors"))
    assert len(Bundle.load(str(tmp_path / "e.safetensors")).nets) == 2
    other = synthetic(90, seed=5)
    c = fit_seq(other.subset(np.arange(0, 70)), other.subset(np.arange(70, 90)), FitConfig(seed=0, **cfg),
                verbose=False)
    with pytest.raises(CostModelError, match="differ"):
        a.with_nets_of(c)
