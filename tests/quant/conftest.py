"""Shared fixtures: a slice of Fashion-MNIST and tiny trained ViT / DeiT / Swin models (seconds to build)."""
from __future__ import annotations

import pytest
import torch

from memfit.train.local.data import Dataset


@pytest.fixture(scope="session")
def fmnist_small() -> Dataset:
    """2,000 training and 500 test images of Fashion-MNIST (skips if the Debian package is missing)."""
    from memfit.train.local.data import load_fashion_mnist
    from memfit.train.local.errors import DatasetMissingError

    try:
        d = load_fashion_mnist()
    except DatasetMissingError as exc:
        pytest.skip(str(exc))
    return Dataset(d.name, d.x_train[:2000], d.y_train[:2000], d.x_test[:500], d.y_test[:500], d.num_classes)


@pytest.fixture(scope="session")
def tiny_models(fmnist_small) -> dict[str, tuple[torch.nn.Module, object]]:
    """arch -> (tiny model, its ModelSpec, its TrainViTResult): 80 steps (Swin, slower per step: 40)."""
    from memfit.quant.train import TrainViTConfig, train_vit

    out = {}
    for arch in ("vit", "deit", "swin"):
        model, result = train_vit(TrainViTConfig(arch=arch, tiny=True, epochs=2, batch_size=50,
                                                 max_steps=40 if arch == "swin" else 80,
                                                 lr=3e-3), fmnist_small)
        out[arch] = (model, result.spec, result)
    return out
