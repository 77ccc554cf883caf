"""Dataset loading: the IDX reader on a file we write, the real package when installed, clear errors."""
import gzip
import struct

import numpy as np
import pytest
import torch

from memfit.train.local.data import FASHION_MNIST_DIR, load_dataset, load_fashion_mnist, subset
from memfit.train.local.errors import DatasetMissingError, LocalTrainingError


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(tmp_path, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 1, 2][:n_test]))
    return tmp_path


def test_idx_reader_round_trips(tmp_path):
    data = load_fashion_mnist(fake_fashion(tmp_path))
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28)
    assert data.y_train.tolist() == [0, 1, 2, 3, 4, 5] and data.y_test.tolist() == [9, 0, 1, 2]
    assert data.num_classes == 10
    assert abs(float(data.x_train.mean())) < 1e-5  # standardised with train statistics


def test_missing_dataset_names_the_install_command(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_truncated_idx_is_reported(tmp_path):
    fake_fashion(tmp_path)
    raw = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(DatasetMissingError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_unknown_dataset():
    with pytest.raises(LocalTrainingError, match="fashion-mnist, digits"):
        load_dataset("cifar")


def test_digits_split_and_subset(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    small = subset(digits, 100, seed=0)
    assert len(small.y_train) == 100 and small.x_test is digits.x_test


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="needs `apt-get install -y dataset-fashion-mnist`")
def test_real_fashion_mnist():
    data = load_fashion_mnist()
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(data.y_test.numpy()).tolist() == [1000] * 10


def test_validation_split_holds_out_train_examples(digits):
    from memfit.train.local.data import validation_split

    val = validation_split(digits, 200, seed=0)
    assert len(val.y_test) == 200 and len(val.y_train) == len(digits.y_train) - 200
    assert val.name == "digits-val"
    # every image of the new train and eval sets comes from the original training set, none twice
    rows = torch.cat([val.x_train, val.x_test]).flatten(1)
    assert torch.equal(rows.sort(0).values, digits.x_train.flatten(1).sort(0).values)
    assert torch.equal(validation_split(digits, 200, seed=0).y_test, val.y_test)  # seeded
    with pytest.raises(LocalTrainingError):
        validation_split(digits, 0)


@pytest.mark.parametrize("damage", ["not gzip", "cut short"])
def test_a_corrupt_idx_file_is_a_dataset_error_not_a_gzip_traceback(tmp_path, damage):
    """A file that is not gzip (BadGzipFile) or whose stream ends early (EOFError) was a traceback from gzip."""
    fake_fashion(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"garbage\n" if damage == "not gzip" else path.read_bytes()[:40])
    with pytest.raises(DatasetMissingError, match="not a readable gzip IDX file"):
        load_fashion_mnist(tmp_path)
