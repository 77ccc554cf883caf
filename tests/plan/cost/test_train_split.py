"""train(): the held-out-shapes split's seed apart from the training seed (TrainConfig.split_seed), so that a
rerun from other seeds is scored on the same test kernels."""
import numpy as np

from memfit.plan.cost import dataset, families, store
from memfit.plan.cost.fit import FitConfig
from memfit.plan.cost.train import TrainConfig, load, train


def test_split_seed_keeps_the_test_kernels_of_another_training_seed(tmp_path):
    db = tmp_path / "d.db"
    con = store.connect(db)
    specs = families.generate(60, seed=7)
    store.add_kernels(con, specs)
    for i, s in enumerate(specs):  # made-up labels: only which kernels are tested is checked
        store.put_label(con, s.key(), latency_us=10.0 + i, spread=0.1,
                        figures={"instructions": 100 + i, "vector_fma": i, "spills": 0})
    ex, _ = load(db)
    test0, test3 = (sorted(ex.Y[dataset.shape_split(ex, s)[2], 0]) for s in (0, 3))
    assert test0 != test3   # the seeds' own splits differ

    def tested(seed, split_seed):
        cfg = TrainConfig(FitConfig(epochs=1, seeds=1, seed=seed), baselines=False, blend=False,
                          split_seed=split_seed)
        res = train(db, tmp_path / f"m{seed}_{split_seed}.safetensors", cfg, verbose=False)
        return sorted(res["shapes_predictions"]["true"])

    assert np.allclose(tested(3, 0), test0)
    assert np.allclose(tested(3, None), test3)   # by default the training seed's split, as before


def test_train_first_cuts_training_and_validation_to_the_first_kernels_drawn_and_keeps_every_test_kernel(tmp_path):
    db = tmp_path / "d.db"
    con = store.connect(db)
    specs = families.generate(120, seed=5)
    store.add_kernels(con, specs)
    for i, s in enumerate(specs):  # the label is the kernel's place in the draw, so a prediction's origin shows
        store.put_label(con, s.key(), latency_us=10.0 + i, spread=0.1,
                        figures={"instructions": 100 + i, "vector_fma": i, "spills": 0})
    ex, _ = load(db)
    tr, va, te = dataset.shape_split(ex, 0)
    first = {s.key() for s in specs[:50]}
    assert store.first_keys(con, 50) == first
    cfg = TrainConfig(FitConfig(epochs=1, seeds=1, seed=0), baselines=False, blend=False, train_first=50)
    res = train(db, tmp_path / "m.safetensors", cfg, verbose=False)
    assert np.allclose(sorted(res["shapes_predictions"]["true"]), sorted(ex.Y[te, 0]))  # all the test kernels
    from memfit.plan.cost.predict import load_model

    info = load_model(str(tmp_path / "m.safetensors")).info
    n_first = sum(ex.keys[i] in first for i in (*tr, *va))
    assert 0 < n_first < len(tr) + len(va)
    assert info["train_kernels"] + info["val_kernels"] == n_first and info["train_first"] == 50


def test_train_first_too_few_to_train_is_refused_with_the_counts(tmp_path):
    import pytest

    from memfit.plan.cost.errors import CostModelError

    db = tmp_path / "d.db"
    con = store.connect(db)
    specs = families.generate(120, seed=5)
    store.add_kernels(con, specs)
    for i, s in enumerate(specs):
        store.put_label(con, s.key(), latency_us=10.0 + i, spread=0.1,
                        figures={"instructions": 100 + i, "vector_fma": i, "spills": 0})
    cfg = TrainConfig(FitConfig(epochs=1, seeds=1, seed=0), baselines=False, blend=False, train_first=3)
    with pytest.raises(CostModelError, match="first 3 kernels hold"):
        train(db, tmp_path / "m.safetensors", cfg, verbose=False)
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(CostModelError, match="held-out families"):
        train(db, tmp_path / "m.safetensors", TrainConfig(FitConfig(epochs=1, seeds=1), families=("conv",),
                                                          train_first=60), verbose=False)
