"""The validation split: held out of the training data, stratified by label, the same for every run seed.

Tuning decisions (Optuna objectives, early stopping, tie-breaks, the best configuration) read the validation
metrics; the test split is only reported. The split's seed (`TrainConfig.split_seed`) is separate from the run
seed, so that every run of a study, whatever its seed, trains on the same examples and is scored on the same
held-out ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .data import Dataset


@dataclass(frozen=True, eq=False, repr=False)
class Splits:
    """Train / validation / test tensors of one dataset (shared between callers when memoised: read-only)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple
    name: str
    natural_partition: list[np.ndarray] | None = None
    """For datasets that come split over clients: each client's indices into the (reduced) training split."""

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, train={len(self.y_train)}, val={len(self.y_val)}, "
            f"test={len(self.y_test)}, num_classes={self.num_classes})"
        )


def holdout_indices(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: round(fraction * n_c) examples of every class c go to validation (at most
    n_c - 1, so no class leaves the training split), drawn with `seed`. Both arrays are sorted."""
    y = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if not 0 <= fraction < 1:
        raise ValueError(f"invalid val_fraction={fraction!r}: must lie in [0, 1)")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = min(int(round(fraction * len(idx))), len(idx) - 1)
        if take > 0:
            held.append(rng.choice(idx, size=take, replace=False))
    val = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(y)), val, assume_unique=True)
    return train.astype(np.int64), val.astype(np.int64)


@functools.lru_cache(maxsize=4)
def with_validation(data: Dataset, fraction: float, seed: int) -> Splits:
    """`data` with a validation split carved out of its training data (memoised per dataset object)."""
    train, val = holdout_indices(data.y_train, fraction, seed)
    natural = None
    if data.natural_partition is not None:  # re-index each client's examples into the reduced training split
        position = np.full(len(data.y_train), -1, dtype=np.int64)
        position[train] = np.arange(len(train))
        natural = []
        for part in data.natural_partition:
            kept = position[np.asarray(part, dtype=np.int64)]
            kept = kept[kept >= 0]
            kept.setflags(write=False)
            natural.append(kept)
    t, v = torch.from_numpy(train), torch.from_numpy(val)
    return Splits(
        x_train=data.x_train[t],
        y_train=data.y_train[t],
        x_val=data.x_train[v],
        y_val=data.y_train[v],
        x_test=data.x_test,
        y_test=data.y_test,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        name=data.name,
        natural_partition=natural,
    )
