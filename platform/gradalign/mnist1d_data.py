"""MNIST-1D (Greydanus & Kobak, ICML 2024), generated offline with the `mnist1d` package and cached on disk.

`mnist1d.data.make_dataset` with the package's default arguments is the paper's canonical set: 5,000 length-40
signals of 10 digit templates (500 per class), shuffled, split 4,000 train / 1,000 test. Only `num_samples` may
differ here (a larger set for tighter confidence intervals); every other generator argument is the package's
default, so the first 80% of any set is its training split, as in the package.

The generator scales the signals itself: it centres the whole set (train and test together) and divides it by its
standard deviation, one scalar for all positions (`xs = (xs - xs.mean()) / xs.std()`). That is the data the paper's
models were trained on, so it is kept as it is (float64 -> float32): no second standardisation.

The generator seeds and draws from the process-global RNGs (`random.seed`, `np.random.seed`); their states are
saved before and restored after, so the seeds of everything else in the process stay as they were. The arrays are
written to `<data_dir>/mnist1d/<key>.npz` (key: a hash of the package's version and `num_samples`, the only argument
that is not the package's default; the file also records all the arguments) under a temporary name and renamed into
place, so that concurrent trials never read a half-written file; a later load reads the file
and never imports the package (importing it, which imports matplotlib, takes over a second). The download path of
the package (`get_dataset`) is never used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
import threading

import numpy as np

PACKAGE = "mnist1d"
CANONICAL_SAMPLES = 5000
"""The package's default `num_samples`: the paper's 4,000 training and 1,000 test examples."""
NUM_TEMPLATES = 10
"""Digit templates, i.e. classes; the generator makes num_samples // 10 examples of each."""

_GENERATE = threading.Lock()  # the global RNGs are shared by the threads of a process


class MNIST1DCacheError(RuntimeError):
    """A cached MNIST-1D file exists but cannot be read (delete it and it is generated again)."""


def check_num_samples(num_samples: int | None) -> int:
    """The number of examples to generate: the canonical 5,000 for None, else a positive multiple of 10."""
    if num_samples is None:
        return CANONICAL_SAMPLES
    whole = not isinstance(num_samples, bool) and isinstance(num_samples, (int, np.integer))
    if not whole or num_samples < NUM_TEMPLATES or num_samples % NUM_TEMPLATES:
        raise ValueError(
            f"num_samples={num_samples!r}: mnist1d needs a positive multiple of {NUM_TEMPLATES} (the same "
            "number of examples of each digit), or None for the canonical 5,000"
        )
    return int(num_samples)


def cache_path(root: str, num_samples: int) -> str:
    """Where the set of `num_samples` examples is cached under data_dir `root`."""
    key = {"generator": PACKAGE, "version": _package_version(), "num_samples": int(num_samples)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, PACKAGE, f"{digest}.npz")


def load_arrays(root: str, num_samples: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [N, 1, 40] float32, y_train int64, x_test, y_test): read from the cache, generated on a miss."""
    n = check_num_samples(num_samples)
    path = cache_path(root, n)
    if not os.path.isfile(path):
        _write_atomically(path, _generate(n))
    try:
        with np.load(path) as f:
            arrays = tuple(f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise MNIST1DCacheError(
            f"cannot read the cached MNIST-1D set {path} ({type(err).__name__}: {err}); delete it "
            "and load again to generate it anew"
        ) from err
    x_train, y_train, x_test, y_test = arrays
    if len(x_train) + len(x_test) != n or x_train.shape[1:] != x_test.shape[1:] or len(y_train) != len(x_train):
        raise MNIST1DCacheError(f"the cached MNIST-1D set {path} does not hold {n} examples; delete it and load again")
    return arrays


def _generate(num_samples: int) -> dict[str, np.ndarray]:
    """Run the package's generator with its default arguments but `num_samples`, leaving the global RNGs alone."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=False)
    args.num_samples = num_samples
    with _GENERATE:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    settings = {k: v for k, v in vars(args).items() if k != "url"}
    return {
        "x_train": data["x"].astype(np.float32)[:, None, :],
        "y_train": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32)[:, None, :],
        "y_test": data["y_test"].astype(np.int64),
        "generator_args": np.array(json.dumps(settings, sort_keys=True)),
        "generator_version": np.array(_package_version()),
    }


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"dataset 'mnist1d' is generated by the {PACKAGE!r} package, which is not installed: pip install {PACKAGE}"
        ) from None


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez under a temporary name in the same folder, then renamed into place (atomic on POSIX)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **arrays)
        os.chmod(tmp, 0o644)  # (mkstemp makes it private to its owner)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
