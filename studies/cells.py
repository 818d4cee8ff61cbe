"""The machinery every scaling study shares: cells x per-cell tuning x seeds, each step saved as it finishes.

A *cell* is one setting of the scientific parameters (e.g. algorithm x batch size). In each cell the nuisance
parameters (step size, β, momentum, ...) are re-tuned with Ray Tune + Optuna, then the best configuration is re-run
with several seeds. Every finished phase of every cell is written to `<out>/cells/<cell>/{tune,seeds}.parquet`
before the next starts, so an interrupted study resumes where it stopped and nothing computed is lost.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from ray import tune

from gradalign.config import ALIGNING_ALGORITHMS, ConfigError, TrainConfig
from gradalign.ray_adapter import (
    SearchSpace, StudySettings, TrialExecution, connect, plan_concurrency, results_table, run_study,
)
from trainables import gradalign_trainable

Log = Callable[[str], None]


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


@dataclass(frozen=True)
class StudyPlan:
    """A whole study: its cells, the tuning budget per cell and the seeds of the final runs."""

    name: str
    out_dir: Path
    """Local folder for tables, report and per-cell state."""
    cells: tuple[Cell, ...]
    trials_per_cell: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    objective: str = "test_accuracy"
    """Maximised by the tuning (final reported epoch)."""
    storage: str | None = None
    """Ray storage for Tune/Train state (absolute path or URI, shared by all nodes); default: out_dir."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 0
    asha: bool = False
    max_concurrent: int | None = None
    sampler_seed: int = 0
    extra_columns: Mapping[str, Any] = field(default_factory=dict)
    """Constant columns added to every row (e.g. the study kind)."""

    def __post_init__(self) -> None:
        if not self.cells:
            raise ConfigError("cells", (), "a study needs at least one cell")
        keys = [c.key for c in self.cells]
        if len(set(keys)) != len(keys):
            raise ConfigError("cells", keys, "cell keys must be unique")
        if self.trials_per_cell < 1:
            raise ConfigError("trials_per_cell", self.trials_per_cell, "must be >= 1")
        if not self.seeds:
            raise ConfigError("seeds", self.seeds, "need at least one seed")
        for cell in self.cells:  # every corner of every cell is a valid TrainConfig: refuse bad input before Ray
            cell.space.validate()

    def storage_for(self, cell: Cell, phase: str) -> str:
        base = self.storage or str(self.out_dir.resolve())
        return f"{base.rstrip('/')}/cells/{cell.key}/{phase}"

    def execution(self, cell: Cell, phase: str) -> TrialExecution:
        return TrialExecution(workers=cell.workers, cpus_per_worker=self.cpus_per_worker,
                              use_gpu=self.gpus_per_worker > 0, storage_path=self.storage_for(cell, phase))


def run_plan(plan: StudyPlan, address: str | None = None, log: Log = print) -> pd.DataFrame:
    """Tune every cell, re-run its best configuration with each seed; return the history of every trial."""
    frames = []
    started = time.perf_counter()
    for index, cell in enumerate(plan.cells):
        log(f"[{index + 1}/{len(plan.cells)}] cell {cell.key} ({_coords(cell)}), "
            f"{time.perf_counter() - started:.0f} s into the study")
        frames.append(run_cell(plan, cell, index, address, log))
        history = pd.concat(frames, ignore_index=True)
        save_table(history, plan.out_dir / "history")
    return history


def run_cell(plan: StudyPlan, cell: Cell, index: int, address: str | None, log: Log) -> pd.DataFrame:
    folder = plan.out_dir / "cells" / cell.key
    tuned = _load(folder / "tune.parquet")
    if tuned is None:
        settings = StudySettings(
            name=cell.key, storage_path=plan.storage_for(cell, "tune"), num_samples=plan.trials_per_cell,
            objectives=((plan.objective, "max"),), seed=plan.sampler_seed + index, asha=plan.asha,
            max_concurrent_trials=plan.max_concurrent,
        )
        grid = run_study(gradalign_trainable, cell.space, settings, plan.execution(cell, "tune"), address=address,
                         callbacks=[TrialLine(f"  {cell.key} tune")], log=lambda s: log("  " + s))
        tuned = tag(results_table(grid, plan.execution(cell, "tune")), plan, cell, "tune")
        save_table(tuned, folder / "tune")
    best = best_config(tuned, plan.objective)
    log(f"  {cell.key}: best of {tuned['trial_id'].nunique()} trials: {_short(best)}")
    seeded = _load(folder / "seeds.parquet")
    if seeded is None:
        grid = run_seeds(best, plan.seeds, plan.execution(cell, "seeds"), address, plan.max_concurrent,
                         TrialLine(f"  {cell.key} seed"))
        seeded = tag(results_table(grid, plan.execution(cell, "seeds")), plan, cell, "seed")
        save_table(seeded, folder / "seeds")
    return pd.concat([tuned, seeded], ignore_index=True)


def run_seeds(config: Mapping[str, Any], seeds: Sequence[int], execution: TrialExecution, address: str | None,
              max_concurrent: int | None, progress: tune.Callback) -> tune.ResultGrid:
    """Re-run one configuration once per seed (a Tune grid over `seed`; resumes if its folder exists)."""
    resources, concurrency = plan_concurrency(execution, connect(address), max_concurrent)
    fn = tune.with_resources(tune.with_parameters(gradalign_trainable, execution=execution), resources)
    path = f"{execution.storage_path}/tune"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=fn, resume_errored=True).fit()
    tuner = tune.Tuner(
        fn,
        param_space={**config, "seed": tune.grid_search(list(seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=False),
        run_config=tune.RunConfig(name="tune", storage_path=execution.storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1), callbacks=[progress]),
    )
    return tuner.fit()


def best_config(tuned: pd.DataFrame, objective: str) -> dict[str, Any]:
    """The TrainConfig of the trial with the best final-epoch objective (non-diverged trials first)."""
    last = tuned.sort_values("epoch").groupby("trial_id").tail(1)
    healthy = last[last["status"] != "diverged"]
    pool = healthy if len(healthy) else last
    row = pool.sort_values(objective, ascending=False, kind="stable").iloc[0]
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "extras"]
    return {k: _plain(row[k]) for k in fields if k in row and not _missing(row[k])}


def tag(table: pd.DataFrame, plan: StudyPlan, cell: Cell, phase: str) -> pd.DataFrame:
    """Add the study's bookkeeping columns; β means nothing for algorithms that do not align, so blank it."""
    table = table.copy()
    table.insert(0, "phase", phase)
    table.insert(0, "cell", cell.key)
    table.insert(0, "study", plan.name)
    for name, value in {**cell.coords, **plan.extra_columns}.items():
        table[name] = value
    if "beta" in table and "algorithm" in table:
        table.loc[~table["algorithm"].isin(ALIGNING_ALGORITHMS), "beta"] = math.nan
    return table


def save_table(table: pd.DataFrame, stem: Path) -> None:
    """Parquet and CSV side by side; the Parquet file is replaced atomically (it is what resume reads)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(stem.with_suffix(".parquet"))
    table.to_csv(stem.with_suffix(".csv"), index=False)


def load_history(out_dir: Path) -> pd.DataFrame:
    """Every finished phase of every cell under `out_dir` (a partial study gives what it has)."""
    parts = [pd.read_parquet(p) for p in sorted((out_dir / "cells").glob("*/*.parquet"))]
    if not parts:
        raise FileNotFoundError(f"no finished cell under {out_dir}/cells: nothing to report yet")
    return pd.concat(parts, ignore_index=True)


class TrialLine(tune.Callback):
    """One console line per finished trial: its parameters, accuracy and status."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.count = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "error")

    def _line(self, trial, how):
        self.count += 1
        result = trial.last_result or {}
        params = {k: trial.config.get(k) for k in ("lr", "beta", "momentum", "seed", "batch_size") if k in trial.config}
        if trial.config.get("algorithm") not in ALIGNING_ALGORITHMS:
            params.pop("beta", None)
        acc = result.get("test_accuracy", float("nan"))
        print(f"{self.prefix} #{self.count} {_short(params)} -> acc {acc:.3f} after {result.get('epoch', 0)} epochs "
              f"({result.get('status', how)})", flush=True)


def _load(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.exists() else None


def _coords(cell: Cell) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell.coords.items())


def _short(params: Mapping[str, Any]) -> str:
    keys = ("algorithm", "batch_size", "clients", "lr", "beta", "momentum", "mu", "local_steps", "seed")
    return " ".join(f"{k}={_num(params[k])}" for k in keys if k in params and not _missing(params[k]))


def _num(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value):
    item = getattr(value, "item", None)
    return item() if callable(item) else value
