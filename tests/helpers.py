"""Small shared builders for the core tests: a tiny smooth model and client batches, in float64."""

from __future__ import annotations

import torch
from torch import nn

from gradalign import TrainConfig


def tiny_model(seed: int = 0, inputs: int = 5, hidden: int = 7, classes: int = 3, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def client_batches(
    clients: int = 4, batch: int = 6, inputs: int = 5, classes: int = 3, seed: int = 1, dtype=torch.float64
):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, inputs, generator=g, dtype=dtype), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(clients)
    ]


def digits_config(**changes) -> TrainConfig:
    """A few-second run on the bundled digits data."""
    base = dict(dataset="digits", model="mlp", batch_size=64, clients=4, lr=0.1, epochs=2, seed=0)
    base.update(changes)
    return TrainConfig(**base)


def study_protocol(**changes):
    """A small valid `StudyProtocol` (digits' split sizes) for tests that need one without a study script."""
    from gradalign.protocol import Budget, StudyProtocol
    from gradalign.ranges import Range

    base = dict(
        kind="batch-scaling",
        name="test",
        dataset="digits",
        model="mlp",
        budget=Budget("examples", 2592, 2.0),
        split_sizes={"train": 1295, "val": 144, "test": 359},
        ranges={"sgd": {"lr": Range(1e-3, 10.0, log=True)}},
    )
    base.update(changes)
    return StudyProtocol(**base)
