"""Datasets: digits and synthetic in memory, and tiny downloadable datasets written in their real on-disk formats.

The CIFAR fixtures are the python-pickle batches of https://www.cs.toronto.edu/~kriz/cifar.html (what
`cifar-10-python.tar.gz` unpacks to); the MNIST-family fixtures are IDX files as torchvision reads them from
`<Name>/raw/`. Only a handful of images each, so that parsing, layout and normalisation can be checked exactly.
"""

import gzip
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from gradalign.config import DATASETS
from gradalign.data import (
    DatasetCorruptError,
    DatasetNotFoundError,
    load_dataset,
)
from gradalign.partition import describe_partition


# -- digits ---------------------------------------------------------------------------------------------------------
def test_digits_shapes_split_and_standardisation():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_test.shape[1:] == (1, 8, 8)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0.19 < len(ds.x_test) / 1797 < 0.21
    # standardised with the training statistics
    assert abs(ds.x_train.mean().item()) < 1e-4
    assert ds.x_train.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # stratified: every class keeps ~20% of its examples in the test set
    counts_train = torch.bincount(ds.y_train, minlength=10).double()
    counts_test = torch.bincount(ds.y_test, minlength=10).double()
    assert torch.all((counts_test / (counts_train + counts_test) - 0.2).abs() < 0.02)
    assert ds.natural_partition is None


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = load_dataset("digits")
    # Standardisation is affine and pixel values span 0..16: map back to the raw values and compare as sets of rows.
    ours = torch.cat([ds.x_train, ds.x_test]).flatten(1).double()
    raw = torch.round(16 * (ours - ours.min()) / (ours.max() - ours.min())).int()
    assert sorted(map(tuple, raw.tolist())) == sorted(map(tuple, bunch.data.astype(int).tolist()))
    assert sorted(torch.cat([ds.y_train, ds.y_test]).tolist()) == sorted(bunch.target.tolist())


def test_digits_split_is_the_same_for_every_seed_and_memoised():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=7)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert load_dataset("digits") is load_dataset("digits")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


# -- synthetic ------------------------------------------------------------------------------------------------------
def test_synthetic_shapes_and_natural_partition():
    ds = load_dataset("synthetic", seed=1, num_clients=6)
    assert ds.input_shape == (60,) and ds.num_classes == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    assert 1000 < len(ds.x_train) + len(ds.x_test) < 20000
    parts = ds.natural_partition
    assert len(parts) == 6
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(ds.x_train)))
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    with pytest.raises(ValueError):
        parts[0][0] = 5  # shared by the cache: read-only
    assert len(load_dataset("synthetic").natural_partition) == 10  # default


def test_synthetic_deterministic_by_seed():
    a = load_dataset("synthetic", seed=3, num_clients=4)
    b = load_dataset("synthetic", seed=3, num_clients=4, data_dir="elsewhere")
    c = load_dataset("synthetic", seed=4, num_clients=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape != c.x_train.shape or not torch.equal(a.x_train, c.x_train)


def test_synthetic_heterogeneity_zero_means_identical_clients():
    tv = {}
    for h in (0.0, 1.0):
        ds = load_dataset("synthetic", seed=0, num_clients=10, heterogeneity=h)
        tv[h] = describe_partition(ds.y_train, ds.natural_partition, 10)["label_tv"]
        means = torch.stack([ds.x_train[torch.from_numpy(p.copy())].mean(0) for p in ds.natural_partition])
        spread = (means - means.mean(0)).norm(dim=1).mean().item()
        if h == 0:
            assert spread < 0.5  # only sampling noise between clients
        else:
            assert spread > 2.0  # each client's features have their own mean
    assert tv[0.0] < 0.1 < 0.5 < tv[1.0]


@pytest.mark.parametrize("kw", [dict(num_clients=0), dict(heterogeneity=-1.0), dict(heterogeneity=float("nan"))])
def test_synthetic_refuses_bad_arguments(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        load_dataset("synthetic", **kw)


# -- CIFAR in the real pickle format ----------------------------------------------------------------------------------
def _cifar_batch(path, images, labels, key="labels"):
    """One batch file as in cifar-10-python.tar.gz: a pickled dict with a (N, 3072) uint8 'data' array, each row
    the red, green and blue 32x32 planes in row-major order, and a list of labels."""
    entry = {
        "batch_label": os.path.basename(path),
        key: [int(v) for v in labels],
        "data": images.reshape(len(images), 3072),
        "filenames": [f"img_{i}.png" for i in range(len(images))],
    }
    if key == "fine_labels":
        entry["coarse_labels"] = [int(v) // 5 for v in labels]
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _write_cifar10(root, rng, per_batch=2, n_test=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x = rng.integers(0, 256, size=(5 * per_batch, 3, 32, 32), dtype=np.uint8)
    train_y = np.arange(5 * per_batch) % 10
    for i in range(5):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        _cifar_batch(folder / f"data_batch_{i + 1}", train_x[sl], train_y[sl])
    test_x = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    test_y = np.array([9, 0, 4][:n_test])
    _cifar_batch(folder / "test_batch", test_x, test_y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {
                "label_names": [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ],
                "num_cases_per_batch": per_batch,
                "num_vis": 3072,
            },
            f,
            protocol=2,
        )
    return train_x, train_y, test_x, test_y


def _expected(train_x, test_x):
    """Per-channel standardisation of [0, 1]-scaled pixels with the training set's statistics, in float64."""
    tr, te = train_x.astype(np.float64) / 255, test_x.astype(np.float64) / 255
    mean = tr.mean(axis=(0, 2, 3), keepdims=True)
    std = tr.std(axis=(0, 2, 3), keepdims=True)
    return (tr - mean) / std, (te - mean) / std


def test_cifar10_parses_the_real_pickle_format(tmp_path):
    train_x, train_y, test_x, test_y = _write_cifar10(tmp_path, np.random.default_rng(0))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == train_y.tolist() and ds.y_test.tolist() == test_y.tolist()
    exp_train, exp_test = _expected(train_x, test_x)
    np.testing.assert_allclose(ds.x_train.numpy(), exp_train, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), exp_test, rtol=0, atol=1e-5)
    per_channel = ds.x_train.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)


def test_cifar10_reader_agrees_with_torchvision(tmp_path):
    """Our parse of the batches equals torchvision's CIFAR10 parse of the same files.

    torchvision insists on the md5 sums of the official files, which a small fixture cannot have: only that check
    is switched off here (in a subclass); its parsing code runs unchanged.
    """
    from torchvision.datasets import CIFAR10

    class UncheckedCIFAR10(CIFAR10):
        def _check_integrity(self):
            return True

        def _load_meta(self):
            self.classes = []

    _write_cifar10(tmp_path, np.random.default_rng(1))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    tv_train, tv_test = (UncheckedCIFAR10(str(tmp_path), train=train) for train in (True, False))
    assert ds.y_train.tolist() == list(tv_train.targets) and ds.y_test.tolist() == list(tv_test.targets)
    # torchvision keeps HWC uint8 images; ours are standardised CHW floats
    exp_train, exp_test = _expected(tv_train.data.transpose(0, 3, 1, 2), tv_test.data.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(ds.x_train.numpy(), exp_train, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), exp_test, rtol=0, atol=1e-5)


def test_cifar10_archive_in_place_is_unpacked_offline(tmp_path):
    src = tmp_path / "src"
    train_x, train_y, test_x, _ = _write_cifar10(src, np.random.default_rng(2))
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_dataset("cifar10", data_dir=root, download=False)
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in os.listdir(root) if p.startswith(".")], "no temporary leftovers"
    assert ds.y_train.tolist() == train_y.tolist()
    np.testing.assert_allclose(ds.x_test.numpy(), _expected(train_x, test_x)[1], rtol=0, atol=1e-5)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(3)
    train_x = rng.integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8)
    _cifar_batch(folder / "train", train_x, [0, 17, 99, 42, 5, 63], key="fine_labels")
    _cifar_batch(folder / "test", train_x[:2], [99, 1], key="fine_labels")
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.num_classes == 100
    assert ds.y_train.tolist() == [0, 17, 99, 42, 5, 63] and ds.y_test.tolist() == [99, 1]
    assert ds.x_train.shape == (6, 3, 32, 32)


def test_missing_files_name_the_directory_and_the_remedy(tmp_path):
    for name, folder, hint in (
        ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
        ("mnist", os.path.join("MNIST", "raw"), "train-images-idx3-ubyte.gz"),
        ("fashion_mnist", os.path.join("FashionMNIST", "raw"), "t10k-labels-idx1-ubyte.gz"),
        ("emnist", os.path.join("EMNIST", "raw"), "gzip.zip"),
    ):
        with pytest.raises(FileNotFoundError) as info:
            load_dataset(name, data_dir=tmp_path / "nowhere", download=False)
        assert isinstance(info.value, DatasetNotFoundError)
        message = str(info.value)
        assert repr(name) in message
        assert str(tmp_path / "nowhere" / folder) in message
        assert "--download" in message and "download=True" in message and hint in message
    assert not (tmp_path / "nowhere").exists(), "a failed offline load creates nothing"


def test_truncated_batch_is_reported_as_corrupt(tmp_path):
    _write_cifar10(tmp_path, np.random.default_rng(4))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetCorruptError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_labels_out_of_range_are_reported(tmp_path):
    _write_cifar10(tmp_path, np.random.default_rng(5))
    folder = tmp_path / "cifar-10-batches-py"
    _cifar_batch(folder / "test_batch", np.zeros((1, 3, 32, 32), np.uint8), [10])
    with pytest.raises(DatasetCorruptError, match="labels outside"):
        load_dataset("cifar10", data_dir=tmp_path)


# -- MNIST family in the real IDX format -------------------------------------------------------------------------------
def _idx(array: np.ndarray) -> bytes:
    """IDX file: magic 0x00 0x00 0x08 (unsigned byte) <ndim>, one big-endian uint32 per dimension, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_mnist_like(raw, names, rng, n_train=5, n_test=3, num_classes=10, compress=False):
    raw.mkdir(parents=True, exist_ok=True)
    data = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, num_classes, n_train)),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, num_classes, n_test)),
    }
    for split, (images, labels) in data.items():
        for kind, array in (("images", images), ("labels", labels.astype(np.uint8))):
            blob = _idx(array)
            name = names[split, kind]
            if compress:
                (raw / (name + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (raw / name).write_bytes(blob)
    return data


MNIST_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_parses_idx_files(tmp_path, name, folder):
    data = _write_mnist_like(tmp_path / folder / "raw", MNIST_NAMES, np.random.default_rng(6))
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.y_train.tolist() == data["train"][1].tolist() and ds.y_test.tolist() == data["test"][1].tolist()
    exp_train, exp_test = _expected(data["train"][0][:, None], data["test"][0][:, None])
    np.testing.assert_allclose(ds.x_train.numpy(), exp_train, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), exp_test, rtol=0, atol=1e-5)


def test_mnist_gz_files_in_place_are_unpacked_offline(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    data = _write_mnist_like(raw, MNIST_NAMES, np.random.default_rng(7), compress=True)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert (raw / "train-images-idx3-ubyte").is_file()
    assert ds.y_test.tolist() == data["test"][1].tolist()


def test_emnist_balanced_from_zip_and_upright(tmp_path):
    names = {
        (s, k): f"emnist-balanced-{s}-{k}-{'idx3' if k == 'images' else 'idx1'}-ubyte"
        for s in ("train", "test")
        for k in ("images", "labels")
    }
    staging = tmp_path / "staging"
    data = _write_mnist_like(staging, names, np.random.default_rng(8), num_classes=47, compress=True)
    raw = tmp_path / "data" / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    with zipfile.ZipFile(raw / "gzip.zip", "w") as z:  # the layout of EMNIST's gzip.zip
        for f in os.listdir(staging):
            z.write(staging / f, arcname=f"gzip/{f}")
    ds = load_dataset("emnist", data_dir=tmp_path / "data")
    assert ds.num_classes == 47
    assert ds.y_train.tolist() == data["train"][1].tolist()
    # EMNIST stores images transposed; the loader turns them upright
    exp_train, _ = _expected(data["train"][0].transpose(0, 2, 1)[:, None], data["test"][0][:, None])
    np.testing.assert_allclose(ds.x_train.numpy(), exp_train, rtol=0, atol=1e-5)


def test_broken_archive_is_reported_as_corrupt(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(DatasetCorruptError, match="cifar-10|archive"):
        load_dataset("cifar10", data_dir=tmp_path)
