"""The downloadable datasets' files: where torchvision keeps them under data_dir (`FILES`), and their parsers
(CIFAR's pickled batches; the MNIST family's idx files), as uint8 images and int64 labels per split.
`gradalign.data` finds, downloads and standardises; this module only names and reads (and imports no other module
of the package)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch


class DatasetNotFoundError(FileNotFoundError):
    """The files of a downloadable dataset are not in data_dir and downloading was not allowed."""


class DatasetCorruptError(RuntimeError):
    """The dataset files are there but cannot be parsed (truncated download, wrong files)."""


@dataclass(frozen=True)
class _Files:
    """Where torchvision keeps a dataset under data_dir, and what it downloads to get there."""

    folder: str  # relative to data_dir
    files: tuple[str, ...]  # inside folder
    archives: tuple[str, ...]  # relative to data_dir: what to put in place to avoid a download
    source: str


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_EMNIST_FILES = tuple(
    f"emnist-balanced-{s}-{k}-ubyte" for s in ("train", "test") for k in ("images-idx3", "labels-idx1")
)


def _mnist_like(folder: str, files: tuple[str, ...], source: str) -> _Files:
    raw = os.path.join(folder, "raw")
    return _Files(raw, files, tuple(os.path.join(raw, f + ".gz") for f in files), source)


FILES = {
    "cifar10": _Files(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        ("cifar-10-python.tar.gz",),
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": _Files(
        "cifar-100-python",
        ("train", "test"),
        ("cifar-100-python.tar.gz",),
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
    "mnist": _mnist_like("MNIST", _MNIST_FILES, "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion_mnist": _mnist_like(
        "FashionMNIST", _MNIST_FILES, "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    ),
    "emnist": _Files(
        os.path.join("EMNIST", "raw"),
        _EMNIST_FILES,
        (os.path.join("EMNIST", "raw", "gzip.zip"),),
        "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
    ),
}


def read_cifar(name: str, root: str):
    """The python-pickle CIFAR batches, parsed as torchvision's CIFAR10/CIFAR100 parse them.

    Read here rather than through torchvision's classes because those insist on the md5 of every official file
    (re-hashing ~180 MB on each load, and ruling out any other file with the real layout, such as a test fixture);
    the structure is checked instead, and downloads are md5-verified by torchvision.
    """
    spec = FILES[name]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    out = []
    for files in (spec.files[:-1], spec.files[-1:]):
        images, labels = [], []
        for f in files:
            path = os.path.join(root, spec.folder, f)
            try:
                with open(path, "rb") as fh:
                    entry = pickle.load(fh, encoding="latin1")
                data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                target = np.asarray(entry[label_key], dtype=np.int64)
            except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
                raise DatasetCorruptError(
                    f"dataset {name!r}: cannot parse {path} ({type(err).__name__}: {err}); delete "
                    f"{os.path.join(root, spec.folder)} and download it again"
                ) from err
            if len(target) != len(data):
                raise DatasetCorruptError(f"dataset {name!r}: {path} has {len(data)} images but {len(target)} labels")
            images.append(data)
            labels.append(target)
        out.append((torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))))
    return out


def read_mnist_like(name: str, root: str):
    """MNIST, Fashion-MNIST and EMNIST (balanced) through torchvision's classes, as [N, 1, 28, 28] uint8.

    EMNIST's files store each image transposed; they are turned upright here so that the images look like MNIST's.
    """
    from torchvision import datasets

    out = []
    for train in (True, False):
        try:
            if name == "emnist":
                ds = datasets.EMNIST(root, split="balanced", train=train, download=False)
            else:
                ds = (datasets.MNIST if name == "mnist" else datasets.FashionMNIST)(root, train=train, download=False)
            images, labels = ds.data, ds.targets
        except (AssertionError, TypeError, ValueError, RuntimeError) as err:
            raise DatasetCorruptError(
                f"dataset {name!r}: cannot parse the files in {os.path.join(root, FILES[name].folder)} "
                f"({type(err).__name__}: {err}); delete them and download again"
            ) from err
        if name == "emnist":
            images = images.transpose(1, 2)
        if images.ndim != 3 or len(images) != len(labels):
            raise DatasetCorruptError(f"dataset {name!r}: {len(images)} images but {len(labels)} labels")
        out.append((images.unsqueeze(1).contiguous(), labels.to(torch.int64)))
    return out
