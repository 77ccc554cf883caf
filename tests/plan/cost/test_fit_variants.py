"""The sequence model's variants: an ensemble of seeds, the MAPE loss, and the roofline residual base."""
import numpy as np
import pytest

from memfit.plan.cost import dataset
from memfit.plan.cost.features import NAMES
from memfit.plan.cost.fit import FitConfig, fit_seq
from memfit.plan.cost.metrics import mape, spearman
from memfit.plan.cost.roofline import LogBase, Peaks
from memfit.plan.cost.seq import Bundle
from tests.plan.cost.test_seq import synthetic

PEAKS = Peaks(flops={"f32": 4e10, "bf16": 2e10, "i8": 8e10}, bytes_per_s=1.5e10, overhead_us=3.0)


def test_log_base_matches_the_roofline_on_the_parsed_function():
    ex = synthetic(60, seed=3)
    want = np.log([PEAKS.predict_us(f) for f in ex.roofline_inputs])  # from the parsed MLIR
    got = LogBase.of(PEAKS).log_us(ex.X)                                # from the feature vector alone
    assert np.allclose(got, want, rtol=0, atol=1e-6)


def roofline_labelled(n: int, seed: int) -> dataset.Examples:
    """Latency exactly the roofline of the peaks above, times 1.5 for kernels with transcendentals."""
    ex = synthetic(n, seed)
    trans = ex.X[:, list(NAMES).index("n_transcendental")] > 0
    ex.Y[:, 0] = np.array([PEAKS.predict_us(f) for f in ex.roofline_inputs]) * np.where(trans, 1.5, 1.0)
    return ex


def test_ensemble_round_trips_and_averages(tmp_path):
    ex = synthetic(80, seed=0)
    tr, va = ex.subset(np.arange(0, 64)), ex.subset(np.arange(64, 80))
    b = fit_seq(tr, va, FitConfig(epochs=4, d=16, layers=1, patience=50, seeds=2), verbose=False)
    assert len(b.nets) == 2 and len(b.info["val_latency_mape_each"]) == 2
    one = [Bundle([n], b.vocab, b.norm, b.feature_names, {}, b.base).predict_log(va.toks, va.X) for n in b.nets]
    both = b.predict_log(va.toks, va.X)
    assert not np.allclose(one[0], one[1])            # the seeds differ
    assert np.allclose(both, (one[0] + one[1]) / 2, atol=1e-5)
    path = tmp_path / "ens.safetensors"
    b.save(str(path))
    again = Bundle.load(str(path))
    assert len(again.nets) == 2
    assert np.allclose(again.predict_log(va.toks, va.X)[:, 0], both[:, 0], atol=0.05)  # float16 weights


@pytest.mark.parametrize("loss", ["smooth_l1", "mape"])
def test_roofline_base_is_learned_as_a_residual(tmp_path, loss):
    ex = roofline_labelled(120, seed=5)
    tr, va = ex.subset(np.arange(0, 90)), ex.subset(np.arange(90, 120))
    cfg = dict(epochs=15, d=16, layers=1, patience=50, loss=loss)
    b = fit_seq(tr, va, FitConfig(base="roofline", **cfg), verbose=False)
    assert b.base is not None and b.info["base"] == "roofline"
    pred = dataset.from_log(b.predict_log(va.toks, va.X))[:, 0]
    assert spearman(pred, va.Y[:, 0]) > 0.9
    b.save(str(tmp_path / "b.safetensors"))
    again = Bundle.load(str(tmp_path / "b.safetensors"))
    assert again.base == b.base
    assert np.allclose(dataset.from_log(again.predict_log(va.toks, va.X))[:, 0], pred, rtol=0.05)
    # the base is part of the prediction: without it the output is far off
    bare = Bundle(b.nets, b.vocab, b.norm, b.feature_names, {}, None)
    assert mape(dataset.from_log(bare.predict_log(va.toks, va.X))[:, 0], va.Y[:, 0]) > 2 * mape(pred, va.Y[:, 0])


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="loss"):
        FitConfig(loss="mse")
    with pytest.raises(ValueError, match="base"):
        FitConfig(base="linear")
