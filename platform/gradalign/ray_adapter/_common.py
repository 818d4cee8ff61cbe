"""Constants, divergence penalties and small helpers shared by the adapter modules."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import pyarrow.fs

from gradalign.config import (
    TrainConfig,
)
from gradalign.training import METRIC_KEYS

METRICS = tuple(METRIC_KEYS)
"""Keys of `Trainer.train_until_eval()`'s metrics: also the metric columns of the results table."""

COUNTER = "evaluation"
"""The metric that numbers a trial's reports (1, 2, ...): one row per trial and value in the results table."""

GROUP_SEEDS = "group_seeds"
"""Config key (a TrainConfig extra): seeds a trial trains side by side and reports the mean of (`SeedGroup`)."""

LOSS_PENALTY = 1e9
"""Finite loss reported for a diverged run (NaN/inf would leave its Optuna trial RUNNING for ever)."""

DRIVER_RESOURCE = "train_driver"
"""Custom resource a Train-driver trial holds instead of a CPU (its Train workers hold the CPUs)."""

_TRAIN_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "extras")


# ---------------------------------------------------------------------------------------------------------------
# Metrics of diverged runs
# ---------------------------------------------------------------------------------------------------------------
def penalise(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics of a diverged run with finite penalties as objective values, so that Tune and Optuna can rank them.

    A run is diverged when the trainer says so or a loss or the accuracy is not finite (NaN/inf would leave its
    Optuna trial RUNNING for ever). Its losses become `LOSS_PENALTY` and its accuracy 0 (a NaN model's argmax
    "accuracy" is chance level, which would flatter it); its status becomes 'diverged'. Diagnostics are left alone.
    Metrics of a healthy run are returned unchanged.
    """
    out = dict(metrics)
    objective = {"train_loss", "val_loss", "test_loss", "val_accuracy", "test_accuracy"} & out.keys()
    checked = objective - {"val_loss", "val_accuracy"}  # (NaN by design when a run has no validation split)
    if out.get("status") != "diverged" and all(_is_finite(out[k]) for k in checked):
        return out
    for key in objective:
        out[key] = 0.0 if key.endswith("accuracy") else LOSS_PENALTY
    out["status"] = "diverged"
    return out


def final_status(result: Mapping[str, Any] | None, error: bool = False) -> str:
    """How a trial ended: 'completed', 'diverged', 'stopped' (by the scheduler, budget not spent) or 'error'.

    A trial that errored after its last evaluation (e.g. while shutting down) still counts as completed or diverged.
    """
    status = (result or {}).get("status")
    if status in ("completed", "diverged"):
        return status
    return "error" if error else "stopped"


def _is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------
def _is_absolute_uri(path: str) -> bool:
    return "://" in path or os.path.isabs(path)


def _read_json(uri: str) -> Any:
    """JSON content of a local path or URI, None if there is no such file."""
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write_json(uri: str, value: Any) -> None:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(value, indent=1).encode())


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (str, bytes)) else value
