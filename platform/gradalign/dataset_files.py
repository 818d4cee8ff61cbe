"""Parsers of the downloaded dataset files (CIFAR's pickled batches; the MNIST family's idx files), as uint8 images
and int64 labels per split. `gradalign.data` finds, downloads and standardises; this module only reads."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from gradalign.data import _FILES, DatasetCorruptError


def read_cifar(name: str, root: str):
    """The python-pickle CIFAR batches, parsed as torchvision's CIFAR10/CIFAR100 parse them.

    Read here rather than through torchvision's classes because those insist on the md5 of every official file
    (re-hashing ~180 MB on each load, and ruling out any other file with the real layout, such as a test fixture);
    the structure is checked instead, and downloads are md5-verified by torchvision.
    """
    spec = _FILES[name]
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
                f"dataset {name!r}: cannot parse the files in {os.path.join(root, _FILES[name].folder)} "
                f"({type(err).__name__}: {err}); delete them and download again"
            ) from err
        if name == "emnist":
            images = images.transpose(1, 2)
        if images.ndim != 3 or len(images) != len(labels):
            raise DatasetCorruptError(f"dataset {name!r}: {len(images)} images but {len(labels)} labels")
        out.append((images.unsqueeze(1).contiguous(), labels.to(torch.int64)))
    return out
