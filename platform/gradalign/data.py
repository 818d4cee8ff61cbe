"""Datasets as whole in-memory tensors.

The algorithms draw their own (per-client) batches by indexing, so a dataset is just four tensors: no DataLoader,
no per-item transforms. Images are [N, C, H, W] float32, scaled to [0, 1] and standardised per channel with the
training set's mean and std; labels are int64.

- `digits`: scikit-learn's bundled 8x8 digits; needs no download (the default for quick runs and tests).
- `synthetic`: FedProx-style Synthetic(h, h), generated; comes with its natural split over clients.
- `mnist1d`: MNIST-1D's length-40 signals [N, 1, 40], generated offline (no download) and cached in data_dir; as the
  generator scales them (one mean and std over the whole set), not standardised again. See `gradalign.mnist1d_data`.
- `mnist`, `fashion_mnist`, `emnist` (balanced split, 47 classes), `cifar10`, `cifar100`: the files torchvision
  downloads, read from `data_dir`. Without them (and without download=True) loading raises DatasetNotFoundError
  naming the directory and how to fill it.

Loads are memoised per process (functools.lru_cache): a second call with the same arguments returns the same
`Dataset`, whose tensors are shared; treat them as read-only.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gradalign import mnist1d_data
from gradalign.config import DATASETS
from gradalign.dataset_files import FILES, DatasetCorruptError, DatasetNotFoundError, read_cifar, read_mnist_like

NUM_CLASSES = {
    "digits": 10,
    "synthetic": 10,
    "mnist": 10,
    "fashion_mnist": 10,
    "emnist": 47,
    "cifar10": 10,
    "cifar100": 100,
    "mnist1d": 10,
}
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
"""The digits train/test split is the same for every run seed, so that test metrics are comparable across seeds."""
SYNTHETIC_DIM = 60
SYNTHETIC_TRAIN_FRACTION = 0.8


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split held in memory. Shared between callers when memoised: do not modify in place."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple
    name: str
    natural_partition: list[np.ndarray] | None = None
    """For `synthetic`: the training indices of each generating client (read-only arrays); None otherwise."""

    def __repr__(self) -> str:
        split = "none" if self.natural_partition is None else f"{len(self.natural_partition)} clients"
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, natural_partition={split})"
        )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike = "data",
    download: bool = False,
    seed: int = 0,
    num_clients: int | None = None,
    heterogeneity: float = 1.0,
    num_samples: int | None = None,
) -> Dataset:
    """Load dataset `name` (one of `gradalign.config.DATASETS`).

    `seed`, `num_clients` and `heterogeneity` only matter for `synthetic` (num_clients=None means 10); the other
    datasets have fixed splits. `data_dir` and `download` only matter for the downloadable datasets and for
    `mnist1d`, cached in data_dir; `num_samples` only for `mnist1d` (None: the canonical 5,000, split 4,000/1,000).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if name == "mnist1d":
        n = mnist1d_data.check_num_samples(num_samples)
        return _mnist1d(n, os.path.abspath(os.path.expanduser(os.fspath(data_dir))))
    if num_samples is not None:
        raise ValueError(f"num_samples={num_samples!r}: only mnist1d is generated with a size to choose, not {name!r}")
    if name == "digits":
        return _digits()
    if name == "synthetic":
        m = 10 if num_clients is None else num_clients
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"num_clients={num_clients!r}: synthetic needs a positive number of clients")
        if (
            isinstance(heterogeneity, bool)
            or not isinstance(heterogeneity, (int, float, np.number))
            or not (math.isfinite(heterogeneity) and heterogeneity >= 0)
        ):
            raise ValueError(f"heterogeneity={heterogeneity!r}: must be a finite number >= 0")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed={seed!r}: must be an integer")
        return _synthetic(int(seed), int(m), float(heterogeneity))
    root = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    _ensure_files(name, root, bool(download))
    return _read_files(name, root)


def clear_cache() -> None:
    """Forget memoised datasets (e.g. after files in data_dir changed, or to free memory)."""
    for fn in (_digits, _synthetic, _mnist1d, _read_files):
        fn.cache_clear()


# -- helpers ------------------------------------------------------------------------------------------------------
def _freeze(x_train, y_train, x_test, y_test, name, natural=None) -> Dataset:
    if natural is not None:
        for part in natural:
            part.setflags(write=False)
    return Dataset(
        x_train=x_train.contiguous(),
        y_train=y_train.to(torch.int64),
        x_test=x_test.contiguous(),
        y_test=y_test.to(torch.int64),
        num_classes=NUM_CLASSES[name],
        input_shape=tuple(x_train.shape[1:]),
        name=name,
        natural_partition=natural,
    )


def _standardise_uint8(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C, H, W] uint8 -> float32 in [0, 1], standardised per channel with the training set's statistics.

    The statistics come from per-channel histograms of the 256 byte values: exact (float64) and without a float
    copy of the whole training set.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(train.shape[1]):
        hist = torch.bincount(train[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        mu = float(hist @ values / hist.sum())
        var = float(hist @ (values - mu) ** 2 / hist.sum())
        mean.append(mu)
        std.append(math.sqrt(var) if var > 0 else 1.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return tuple(x.to(torch.float32).div_(255.0).sub_(m).div_(s) for x in (train, test))  # type: ignore[return-value]


# -- digits ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits() -> Dataset:
    images, labels = _read_digits()
    y = labels.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):  # stratified: every class keeps its share in the test set
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=int(round(DIGITS_TEST_FRACTION * len(idx))), replace=False)] = True
    x = torch.from_numpy(images.reshape(-1, 1, 8, 8) / 16.0).to(torch.float32)  # pixel values are 0..16
    x_train, x_test = x[~torch.from_numpy(test)], x[torch.from_numpy(test)]
    mean, std = x_train.mean(), x_train.std(unbiased=False)
    return _freeze(
        (x_train - mean) / std, torch.from_numpy(y[~test]), (x_test - mean) / std, torch.from_numpy(y[test]), "digits"
    )


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 x 64, values 0..16, and labels).

    Importing sklearn takes over a second, more than the rest of a digits run's setup; the bundled CSV that
    `load_digits` parses is read directly when it is where scikit-learn keeps it, else `load_digits` is used.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            with gzip.open(path) as f:
                table = np.loadtxt(f, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :-1], table[:, -1]
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


# -- synthetic ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _synthetic(seed: int, num_clients: int, heterogeneity: float) -> Dataset:
    """FedProx's Synthetic(alpha, beta) with alpha = beta = heterogeneity (Li et al., 2020), 10 classes, 60 features.

    Client k labels x ~ N(v_k, Sigma), Sigma = diag(j^-1.2), with y = argmax(W_k^T x + b_k), where
    W_k, b_k ~ N(u_k, 1) entrywise, u_k ~ N(0, h); v_k ~ N(B_k, 1), B_k ~ N(0, h) (h is a standard deviation, as in
    FedProx's generator). For h >= 1 this is exactly FedProx's construction. So that h = 0 makes all clients
    identically distributed (FedProx's version keeps independent N(0, 1) noise per client even then), the unit-variance
    noise of W_k, b_k and v_k is sqrt(1 - h^2) * (shared draw) + h * (client's own draw) for h < 1: still N(0, 1)
    entrywise, but common to all clients at h = 0. Per-client sizes are 100 + lognormal(5, 1), at most 2000 (a
    skew in quantity like FedProx's), 80% of each client's examples go to training, the rest to the common test set.
    Features are left unnormalised, as in FedProx. All random draws happen in the same order for every h, so
    datasets with one seed and different h are coupled.
    """
    rng = np.random.default_rng(seed)
    d, classes, m, h = SYNTHETIC_DIM, NUM_CLASSES["synthetic"], num_clients, heterogeneity
    own = min(h, 1.0)
    shared = math.sqrt(1.0 - own**2)
    sizes = np.minimum(100 + rng.lognormal(5.0, 1.0, m).astype(np.int64), 2000)
    u = rng.normal(0.0, h, m)
    big_b = rng.normal(0.0, h, m)
    w0, b0, v0 = rng.normal(size=(d, classes)), rng.normal(size=classes), rng.normal(size=d)
    scale = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # sqrt of the covariance diagonal j^-1.2

    xs_train, ys_train, xs_test, ys_test, natural = [], [], [], [], []
    offset = 0
    for k in range(m):
        w = u[k] + shared * w0 + own * rng.normal(size=(d, classes))
        b = u[k] + shared * b0 + own * rng.normal(size=classes)
        v = big_b[k] + shared * v0 + own * rng.normal(size=d)
        x = v + scale * rng.normal(size=(int(sizes[k]), d))
        y = np.argmax(x @ w + b, axis=1)
        n_train = int(SYNTHETIC_TRAIN_FRACTION * sizes[k])
        xs_train.append(x[:n_train]), ys_train.append(y[:n_train])
        xs_test.append(x[n_train:]), ys_test.append(y[n_train:])
        natural.append(np.arange(offset, offset + n_train, dtype=np.int64))
        offset += n_train

    def tensor(parts, dtype):
        return torch.from_numpy(np.concatenate(parts)).to(dtype)

    return _freeze(
        tensor(xs_train, torch.float32),
        tensor(ys_train, torch.int64),
        tensor(xs_test, torch.float32),
        tensor(ys_test, torch.int64),
        "synthetic",
        natural,
    )


@functools.lru_cache(maxsize=4)
def _mnist1d(num_samples: int, root: str) -> Dataset:
    arrays = mnist1d_data.load_arrays(root, num_samples)
    return _freeze(*(torch.from_numpy(a) for a in arrays), "mnist1d")


# -- downloadable datasets (their file table and parsers: gradalign.dataset_files) ------------------------------------
def _missing(name: str, root: str) -> list[str]:
    spec = FILES[name]
    return [f for f in spec.files if not os.path.isfile(os.path.join(root, spec.folder, f))]


def _ensure_files(name: str, root: str, download: bool) -> None:
    """Make the raw files present: unpack archives already in data_dir (offline), else download if allowed."""
    if not _missing(name, root):
        return
    spec = FILES[name]
    folder = os.path.join(root, spec.folder)
    offline_hint = (
        f"without network access, put {' and '.join(os.path.join(root, a) for a in spec.archives)} (from "
        f"{spec.source}) in place and load again: archives in place are unpacked automatically"
    )
    try:
        _unpack_local_archives(name, root)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise DatasetCorruptError(
            f"dataset {name!r}: cannot unpack the archive in {root} ({type(err).__name__}: {err}); delete it and "
            "download it again"
        ) from err
    if not _missing(name, root):
        return
    if download:
        try:
            _download(name, root)
        except Exception as err:  # no network, server down, md5 mismatch: all end the same way for the user
            raise DatasetNotFoundError(
                f"dataset {name!r}: downloading into {root} failed ({type(err).__name__}: {err}); {offline_hint}"
            ) from err
        if not _missing(name, root):
            return
    raise DatasetNotFoundError(
        f"dataset {name!r} not found: expected {', '.join(_missing(name, root))} in {folder}. "
        f"Get it with --download (download=True), which fetches it into {root}; or, {offline_hint}."
    )


def _download(name: str, root: str) -> None:
    """Fetch with torchvision (its downloads are md5-verified). Imported here: torchvision is slow to import."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    os.makedirs(root, exist_ok=True)
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
    elif name == "emnist":
        datasets.EMNIST(root, split="balanced", train=False, download=True)
    else:
        (datasets.MNIST if name == "mnist" else datasets.FashionMNIST)(root, train=False, download=True)


def _unpack_local_archives(name: str, root: str) -> None:
    """Unpack the archive torchvision would download, if the user put it in place, without any network access.

    Every file is written under a temporary name and renamed into place, so that concurrent loaders (several
    trials on one machine) never see half-written files.
    """
    spec = FILES[name]
    folder = os.path.join(root, spec.folder)
    if name in ("cifar10", "cifar100"):
        archive = os.path.join(root, spec.archives[0])
        if os.path.isfile(archive):
            with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp:
                with tarfile.open(archive, "r:gz") as tar:
                    # The "data" filter refuses absolute paths, links out of tmp and device files.
                    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    tar.extractall(tmp, **safe)
                os.makedirs(folder, exist_ok=True)
                for f in spec.files + (("batches.meta",) if name == "cifar10" else ("meta",)):
                    src = os.path.join(tmp, spec.folder, f)
                    if os.path.isfile(src) and not os.path.isfile(os.path.join(folder, f)):
                        os.replace(src, os.path.join(folder, f))
        return
    if name == "emnist":
        archive = os.path.join(folder, "gzip.zip")
        if os.path.isfile(archive):
            with zipfile.ZipFile(archive) as z:
                for f in spec.files:
                    member = f"gzip/{f}.gz"
                    if member in z.namelist() and not os.path.isfile(os.path.join(folder, f)):
                        _write_atomically(os.path.join(folder, f), lambda out, m=member: _gunzip(z.open(m), out))
    for f in _missing(name, root):
        for candidate in (os.path.join(folder, f + ".gz"), os.path.join(folder, "gzip", f + ".gz")):
            if os.path.isfile(candidate):
                with open(candidate, "rb") as src:
                    _write_atomically(os.path.join(folder, f), lambda out, s=src: _gunzip(s, out))
                break


def _gunzip(src, out) -> None:
    with gzip.open(src) as g:
        shutil.copyfileobj(g, out)


def _write_atomically(path: str, write: Callable) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=2)
def _read_files(name: str, root: str) -> Dataset:
    if name in ("cifar10", "cifar100"):
        (x_train, y_train), (x_test, y_test) = read_cifar(name, root)
    else:
        (x_train, y_train), (x_test, y_test) = read_mnist_like(name, root)
    for split, y in (("train", y_train), ("test", y_test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES[name]):
            raise DatasetCorruptError(
                f"dataset {name!r} in {os.path.join(root, FILES[name].folder)}: {split} labels outside "
                f"[0, {NUM_CLASSES[name]}); are these the right files?"
            )
    x_train, x_test = _standardise_uint8(x_train, x_test)
    return _freeze(x_train, y_train, x_test, y_test, name)
