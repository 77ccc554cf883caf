"""Datasets for local-learning experiments: Fashion-MNIST (Debian IDX files) and scikit-learn digits.

Everything is loaded once into float32 tensors; images keep their (C, H, W) shape and each model views them
as it needs (MLP: flat, CNN: image, RNN: rows as time steps).
"""
from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetMissingError, LocalTrainingError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DATASETS = ("fashion-mnist", "digits")


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # (N, 1, H, W) float32, standardised with train statistics
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor  # (M, 1, H, W)
    y_test: torch.Tensor  # (M,)
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzip IDX file (magic: 0x00 0x00 dtype ndim, then ndim big-endian uint32 sizes, then data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # not gzip (BadGzipFile), cut short, or corrupt
        raise DatasetMissingError(f"{path} is not a readable gzip IDX file ({exc}); reinstall with "
                                  f"`{FASHION_MNIST_INSTALL}` or fetch the file again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetMissingError(f"{path} is not an unsigned-byte IDX file; reinstall with `{FASHION_MNIST_INSTALL}`")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetMissingError(f"{path} is truncated ({data.size} bytes for shape {tuple(dims)})")
    return data.reshape(tuple(dims))


def load_fashion_mnist(root: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST from the IDX gzip files of the Debian package `dataset-fashion-mnist`."""
    root = Path(root or os.environ.get("MEMFIT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    files = {
        "x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (root / name).is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). "
            f"Install it with `{FASHION_MNIST_INSTALL}`, or point --data-dir at a folder with the IDX .gz files."
        )
    arrays = {key: _read_idx(root / name) for key, name in files.items()}
    return _from_uint8(
        "fashion-mnist", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], scale=255.0
    )


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split stratified with `seed`; for fast tests."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8) values 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    return _from_uint8("digits", x_tr, y_tr, x_te, y_te, scale=16.0)


def _from_uint8(name: str, x_tr, y_tr, x_te, y_te, scale: float) -> Dataset:
    x_train = torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.float32) / scale).unsqueeze(1)  # (N, 1, H, W)
    x_test = torch.from_numpy(np.ascontiguousarray(x_te, dtype=np.float32) / scale).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()  # train statistics only: no peeking at the test set
    return Dataset(
        name=name,
        x_train=(x_train - mean) / std,
        y_train=torch.from_numpy(np.asarray(y_tr, dtype=np.int64)),
        x_test=(x_test - mean) / std,
        y_test=torch.from_numpy(np.asarray(y_te, dtype=np.int64)),
        num_classes=int(max(int(np.max(y_tr)), int(np.max(y_te))) + 1),
    )


def load_dataset(name: str, seed: int = 0, data_dir: str | os.PathLike | None = None) -> Dataset:
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "digits":
        return load_digits(seed)
    raise LocalTrainingError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def subset(data: Dataset, max_train: int | None, seed: int = 0) -> Dataset:
    """Keep a seeded random `max_train` training examples (test set untouched), for quick runs."""
    if max_train is None or max_train >= len(data.y_train):
        return data
    if max_train <= 0:
        raise LocalTrainingError(f"--max-train must be positive, got {max_train}")
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:max_train]
    return Dataset(data.name, data.x_train[idx], data.y_train[idx], data.x_test, data.y_test, data.num_classes)


def validation_split(data: Dataset, n_val: int, seed: int = 0) -> Dataset:
    """Hold out a seeded `n_val` training examples as the evaluation set (for hyper-parameter search, so the
    test set is never looked at); the rest stays the training set. Returns a Dataset named '<name>-val'."""
    n = len(data.y_train)
    if not 0 < n_val < n:
        raise LocalTrainingError(f"validation size must be in 1..{n - 1} (got {n_val})")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))  # not the subset() order
    val, train = idx[:n_val], idx[n_val:]
    return Dataset(f"{data.name}-val", data.x_train[train], data.y_train[train], data.x_train[val],
                   data.y_train[val], data.num_classes)
