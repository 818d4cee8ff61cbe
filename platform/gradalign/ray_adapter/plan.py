"""A study's plan: its protocol, its cells and where its trials run (the engine's input)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradalign.config import ConfigError
from gradalign.protocol import StudyProtocol
from gradalign.study_file import flat_settings

from .space import SearchSpace


@dataclass(frozen=True)
class Cell:
    """One point of the scientific grid."""

    key: str
    """Short unique name, used for its folder and its Optuna study (e.g. 'gradalign-B256')."""
    coords: Mapping[str, Any]
    """The scientific coordinates (algorithm, batch_size, workers, alpha, ...): columns of every result row."""
    space: SearchSpace
    """Fixed configuration of the cell and the nuisance ranges re-tuned in it."""
    workers: int = 1
    """Training processes per trial (1: in the trial's own process; more: a Ray Train TorchTrainer)."""
    initial_points: tuple[Mapping[str, Any], ...] = ()
    """Parameter settings the cell's search tries first (Optuna enqueues them; the sampler takes over after)."""

    def __post_init__(self) -> None:
        for point in self.initial_points:
            self.space.check_point(point)

    def settings(self) -> dict[str, Any]:
        """What `study.json` remembers of the cell (flattened)."""
        what = {"coords": dict(self.coords), "workers": self.workers, "space": dataclasses.asdict(self.space)}
        if self.initial_points:
            what["initial_points"] = [dict(p) for p in self.initial_points]
        return flat_settings(what)


@dataclass(frozen=True)
class Resources:
    """Where and how trials run: not part of the protocol (a study may resume on other hardware)."""

    storage: str | None = None
    """Ray storage for Tune/Train state (absolute path or URI, shared by all nodes); default: the output folder."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 0
    max_concurrent: int | None = None
    max_failures: int = 1
    """Tune retries per trial (each resumes from the trial's latest saved evaluation)."""


@dataclass(frozen=True)
class StudyPlan:
    """A whole study: its protocol, its cells, its folder and its resources."""

    protocol: StudyProtocol
    out_dir: Path
    """Local folder for tables, report and per-cell state."""
    cells: tuple[Cell, ...]
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        if not self.cells:
            raise ConfigError("cells", (), "a study needs at least one cell")
        keys = [c.key for c in self.cells]
        if len(set(keys)) != len(keys):
            raise ConfigError("cells", keys, "cell keys must be unique")
        for cell in self.cells:  # every corner of every cell is a valid TrainConfig: refuse bad input before Ray
            cell.space.validate()

    @property
    def storage(self) -> str:
        return (self.resources.storage or str(Path(self.out_dir).resolve())).rstrip("/")

    def cell_settings(self) -> dict[str, dict[str, Any]]:
        return {c.key: c.settings() for c in self.cells}
