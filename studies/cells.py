"""The machinery every scaling study shares: cells x per-cell tuning x seeds, each step saved as it finishes.

A *cell* is one setting of the scientific parameters (e.g. algorithm x batch size). In each cell the nuisance
parameters (step size, β, momentum, ...) are re-tuned with Ray Tune + Optuna on the validation split, then the best
configuration is re-run with seeds of its own (disjoint from the tuning seeds), whose test metrics are the result.
Every finished phase of every cell is written to `<out>/cells/<cell>/{tune,seeds}.parquet`
before the next starts, so an interrupted study resumes where it stopped and nothing computed is lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from ray import tune

from gradalign.analysis import COUNTER, rank_trials
from gradalign.config import ALIGNING_ALGORITHMS, ConfigError, TrainConfig
from gradalign.ray_adapter import (
    GROUP_SEEDS, OptunaMirror, SearchSpace, StudySettings, TrialExecution, connect, make_scheduler, make_searcher,
    plan_concurrency, results_table,
)
from studies.cell_search import CELL, CellMirror, CellScheduler, CellSearch, FixedConfigs
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
    seeds: tuple[int, ...] = (1000, 1001, 1002)
    """Seeds of the final runs of each cell's best configuration: disjoint from `tuning_seeds`."""
    tuning_seeds: tuple[int, ...] = (0,)
    """Seeds every tuning trial trains with (several: their mean is its score, a `SeedGroup`)."""
    objective: str = "val_accuracy"
    """Maximised by the tuning (at a trial's last evaluation): a validation metric, never a test one."""
    budget_epochs: float = 1.0
    """The run's budget in epochs' worth of examples (where ASHA puts its rungs)."""
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
        if not self.tuning_seeds:
            raise ConfigError("tuning_seeds", self.tuning_seeds, "need at least one tuning seed")
        if set(self.seeds) & set(self.tuning_seeds):
            raise ConfigError("seeds", self.seeds, f"must be disjoint from the tuning seeds {self.tuning_seeds}: a "
                              "final run must not repeat a tuning trial")
        if self.objective.startswith("test_"):
            raise ConfigError("objective", self.objective, "tuning must not read the test split: use a val_ metric")
        for cell in self.cells:  # every corner of every cell is a valid TrainConfig: refuse bad input before Ray
            cell.space.validate()


def run_plan(plan: StudyPlan, address: str | None = None, log: Log = print) -> pd.DataFrame:
    """Tune every cell, re-run its best configuration with each seed; return the history of every trial."""
    started = time.perf_counter()
    log(f"tuning {len(plan.cells)} cells x {plan.trials_per_cell} trials")
    tuned = run_phase(plan, "tune", address, log)
    best = {}
    for cell in plan.cells:
        best[cell.key] = best_config(tuned[cell.key], plan.objective)
        log(f"  {cell.key}: best of {tuned[cell.key]['trial_id'].nunique()} trials: {_short(best[cell.key])}")
    log(f"re-running each cell's best configuration with seeds {list(plan.seeds)} (tuning used {list(plan.tuning_seeds)}) "
        f"({time.perf_counter() - started:.0f} s into the study)")
    seeded = run_phase(plan, "seed", address, log, best=best)
    history = pd.concat([t for c in plan.cells for t in (tuned[c.key], seeded[c.key])], ignore_index=True)
    save_table(history, plan.out_dir / "history")
    return history


def run_phase(plan: StudyPlan, phase: str, address: str | None, log: Log,
              best: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
    """Run one phase ('tune' or 'seed') of every cell that has not finished it yet, as one Tune experiment per
    worker count, and save each cell's rows as soon as its experiment ends. Returns {cell key: rows}."""
    done = {c.key: _load(plan.out_dir / "cells" / c.key / f"{phase}.parquet") for c in plan.cells}
    todo = [c for c in plan.cells if done[c.key] is None]
    if len(todo) < len(plan.cells):
        log(f"  {phase}: {len(plan.cells) - len(todo)} cells already finished, {len(todo)} to run")
    for workers in sorted({c.workers for c in todo}):
        group = [c for c in todo if c.workers == workers]
        table, owner = _run_experiment(plan, phase, group, address, log, best)
        for cell in group:
            rows = tag(table[table["trial_id"].map(owner) == cell.key], plan, cell, phase)
            save_table(rows, plan.out_dir / "cells" / cell.key / phase)
            done[cell.key] = rows
    return done


def _run_experiment(plan: StudyPlan, phase: str, cells: Sequence[Cell], address: str | None, log: Log,
                    best: Mapping[str, Mapping[str, Any]] | None) -> tuple[pd.DataFrame, dict[str, str]]:
    storage = plan.storage or str(plan.out_dir.resolve())
    # The experiment's name depends on the cells it runs, so a changed plan never restores a mismatched one.
    digest = hashlib.sha1(",".join(c.key for c in cells).encode()).hexdigest()[:8]
    name = f"{phase}-w{cells[0].workers}-{digest}"
    execution = TrialExecution(workers=cells[0].workers, cpus_per_worker=plan.cpus_per_worker,
                               use_gpu=plan.gpus_per_worker > 0, storage_path=f"{storage.rstrip('/')}/{name}")
    resources, concurrency = plan_concurrency(execution, connect(address), plan.max_concurrent)
    fn = tune.with_resources(tune.with_parameters(gradalign_trainable, execution=execution), resources)
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        log(f"  {phase}: resuming {path}")
        tuner = tune.Tuner.restore(path, trainable=fn, resume_errored=True)
    else:
        index = {c.key: i for i, c in enumerate(plan.cells)}
        if phase == "tune":
            settings = {c.key: StudySettings(name=c.key, storage_path=str(plan.out_dir.resolve()),
                                             num_samples=plan.trials_per_cell, objectives=((plan.objective, "max"),),
                                             seed=plan.sampler_seed + index[c.key], asha=plan.asha) for c in cells}
            group = {GROUP_SEEDS: list(plan.tuning_seeds)} if len(plan.tuning_seeds) > 1 else {}
            search = CellSearch({c.key: make_searcher(c.space, settings[c.key]) for c in cells},
                                {c.key: plan.trials_per_cell for c in cells}, plan.objective, "max", extra=group)
            scheduler = CellScheduler({c.key: make_scheduler(settings[c.key], plan.budget_epochs)
                                       for c in cells}) if plan.asha else None
            optuna_db = f"sqlite:///{plan.out_dir.resolve() / 'optuna.db'}"
            mirror = CellMirror({c.key: OptunaMirror(optuna_db, c.key, c.space, ((plan.objective, "max"),))
                                 for c in cells})
            callbacks, samples = [mirror, TrialLine("  tune")], plan.trials_per_cell * len(cells)
        else:
            configs = [{**best[c.key], "seed": seed, CELL: c.key} for c in cells for seed in plan.seeds]
            search, scheduler = FixedConfigs(configs, plan.objective, "max"), None
            callbacks, samples = [TrialLine("  seed")], len(configs)
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=samples,
                                        max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    log(f"  {phase}: {len(cells)} cells, {execution.workers} worker(s) per trial, up to {concurrency} trials at once")
    grid = tuner.fit()
    return results_table(grid, execution), _cell_of_trials(grid)


def _cell_of_trials(grid: tune.ResultGrid) -> dict[str, str]:
    """trial_id -> cell key (the `cell` entry every trial's config carries)."""
    owner = {}
    for result in grid:
        frame = result.metrics_dataframe
        has_id = frame is not None and len(frame) and "trial_id" in frame
        trial_id = str(frame["trial_id"].iloc[-1]) if has_id else Path(result.path).name
        owner[trial_id] = result.config.get(CELL)
    return owner


def best_config(tuned: pd.DataFrame, objective: str) -> dict[str, Any]:
    """The TrainConfig of the trial with the best objective at its last evaluation (non-diverged trials first).

    A tie (common with accuracy on a small split) goes to the lower final validation loss, then to the smallest
    trial id: the same trial results give the same choice, whatever the order of the rows. The test split is
    never read. The seed is left out: the seed runs set their own.
    """
    last = tuned.sort_values(COUNTER, kind="stable").groupby("trial_id").tail(1)
    row = rank_trials(last, objective).iloc[0]
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "extras"]
    return {k: _plain(row[k]) for k in fields if k in row and k != "seed" and not _missing(row[k])}


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
        params = {k: trial.config.get(k) for k in ("lr", "beta", "momentum", "mu", "seed") if k in trial.config}
        if trial.config.get("algorithm") not in ALIGNING_ALGORITHMS:
            params.pop("beta", None)
        val, test = result.get("val_accuracy", float("nan")), result.get("test_accuracy", float("nan"))
        cell = trial.config.get(CELL, "")
        print(f"{self.prefix} #{self.count} {cell}: {_short(params)} -> val acc {val:.3f} (test {test:.3f}) after "
              f"{result.get('epochs', 0):.3g} epochs, {result.get('steps', 0)} steps ({result.get('status', how)})",
              flush=True)


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
