"""The machinery every scaling study shares: cells x per-cell tuning x seeds, each step saved as it finishes.

A *cell* is one setting of the scientific parameters (e.g. algorithm x batch size). In each cell the nuisance
parameters (step size, β, momentum, ...) are re-tuned with Ray Tune + Optuna on the validation split, then the best
configuration is re-run with seeds of its own (disjoint from the tuning seeds), whose test metrics are the result.
Every finished phase of every cell is written to `<out>/cells/<cell>/{tune,seed}.parquet` before the next starts.

An interrupted study (even killed with SIGKILL) resumes where it stopped when the same command is run again: each
trial keeps a record of what it trained, keyed by its configuration (`<out>/trials/<phase>/`, see
`gradalign.ray_adapter.records`), and those records, not Tune's snapshot of the experiment (taken at most every
~10 s), decide what is left to do. A finished trial is never trained again, an unfinished one loses at most the
evaluation interval in flight, and `optuna.db` holds one finished Optuna trial per tuning trial of the tables. The
folder remembers the study's settings (`study.json`, see `settings_file`): re-running it with other settings is
refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from gradalign.analysis import COUNTER, rank_trials
from gradalign.config import ALIGNING_ALGORITHMS, ConfigError, TrainConfig
from gradalign.ray_adapter import (
    GROUP_SEEDS,
    OptunaMirror,
    RecordCloser,
    SearchSpace,
    StudySettings,
    TrialExecution,
    TrialRecords,
    asha_rungs,
    connect,
    make_scheduler,
    make_searcher,
    plan_concurrency,
    results_table,
    sync_optuna_study,
)
from gradalign.ray_adapter.records import FROM_RECORD
from studies.cell_search import CELL, CellMirror, CellScheduler, CellSearch, FixedConfigs
from studies.settings_file import check_plan, record_plan
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
            raise ConfigError(
                "seeds",
                self.seeds,
                f"must be disjoint from the tuning seeds {self.tuning_seeds}: a "
                "final run must not repeat a tuning trial",
            )
        if self.objective.startswith("test_"):
            raise ConfigError("objective", self.objective, "tuning must not read the test split: use a val_ metric")
        for cell in self.cells:  # every corner of every cell is a valid TrainConfig: refuse bad input before Ray
            cell.space.validate()


class StudyFailed(RuntimeError):
    """A cell cannot go on: every trial of one of its phases failed. The message names the cell and the first error."""


def run_plan(plan: StudyPlan, address: str | None = None, log: Log = print, extend_seeds: bool = False) -> pd.DataFrame:
    """Tune every cell, re-run its best configuration with each seed; return the history of every trial.

    A study folder remembers its settings (`settings_file`): other settings are refused (`ConfigError`) before
    anything runs, except more seeds when `extend_seeds`.
    """
    check_plan(plan, extend_seeds)
    record_plan(plan)
    started = time.perf_counter()
    log(f"tuning {len(plan.cells)} cells x {plan.trials_per_cell} trials")
    tuned = run_phase(plan, "tune", address, log)
    best = {}
    for cell in plan.cells:
        best[cell.key] = best_config(tuned[cell.key], plan.objective)
        log(f"  {cell.key}: best of {tuned[cell.key]['trial_id'].nunique()} trials: {_short(best[cell.key])}")
    log(
        f"re-running each cell's best configuration with seeds {list(plan.seeds)} "
        f"(tuning used {list(plan.tuning_seeds)}) "
        f"({time.perf_counter() - started:.0f} s into the study)"
    )
    seeded = run_phase(plan, "seed", address, log, best=best, costs=trial_seconds(tuned))
    history = pd.concat([t for c in plan.cells for t in (tuned[c.key], seeded[c.key])], ignore_index=True)
    save_table(history, plan.out_dir / "history")
    return history


def trial_seconds(tables: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    """Each cell's mean training seconds per trial (the last `wall_time` of each of its trials)."""
    out = {}
    for key, rows in tables.items():
        last = rows.sort_values(COUNTER).groupby("trial_id")["wall_time"].last() if len(rows) else pd.Series()
        out[key] = float(last.mean()) if len(last) else 0.0
    return out


def throughput(history: pd.DataFrame, seconds: float, cpus: float) -> str:
    """'N trials trained for T s ... S% of the CPUs' time': how much of the machine the study spent training.
    (Trials answered from records by a resumed study count the training they did when they ran.)"""
    last = history.sort_values(COUNTER).groupby(["phase", "cell", "trial_id"])["wall_time"].last()
    share = last.sum() / (seconds * cpus) if seconds > 0 else float("nan")
    return (
        f"{len(last)} trials trained for {last.sum():.0f} s in all, in {seconds:.0f} s on {cpus:g} CPUs: "
        f"{share:.0%} of the CPUs' time went to training"
    )


def run_phase(
    plan: StudyPlan,
    phase: str,
    address: str | None,
    log: Log,
    best: Mapping[str, Mapping[str, Any]] | None = None,
    costs: Mapping[str, float] | None = None,
) -> dict[str, pd.DataFrame]:
    """Run one phase ('tune' or 'seed') of every cell that has not finished it yet, as one Tune experiment per
    worker count, and save each cell's rows once its experiment ends. Returns {cell key: rows}.

    A cell's phase is finished when its table is saved (and, for the seed phase, holds every seed of the plan). The
    experiment of a worker count always holds every cell of that count, so a restarted study restores the same
    experiment; trials that Tune's older snapshot forgot are answered from their records (`TrialRecords`).
    """
    done = {c.key: _finished_rows(plan, c, phase, log) for c in plan.cells}
    todo = [c for c in plan.cells if done[c.key] is None]
    if len(todo) < len(plan.cells):
        log(f"  {phase}: {len(plan.cells) - len(todo)} cells already finished, {len(todo)} to run")
    for workers in sorted({c.workers for c in todo}):
        group = [c for c in plan.cells if c.workers == workers]
        table, errors = _run_experiment(plan, phase, group, address, log, best, costs)
        for cell in [c for c in group if done[c.key] is None]:
            rows = tag(table[table[CELL] == cell.key].drop(columns=CELL), plan, cell, phase)
            _check_some_trial_ran(rows, cell, phase, plan.objective, errors.get(cell.key, []))
            if phase == "tune":  # the Optuna copy agrees with the table before the table counts as saved
                sync_optuna_study(rows, _optuna_db(plan), cell.key, cell.space, ((plan.objective, "max"),))
            save_table(rows, plan.out_dir / "cells" / cell.key / phase)
            done[cell.key] = rows
    return done


def _run_experiment(
    plan: StudyPlan,
    phase: str,
    cells: Sequence[Cell],
    address: str | None,
    log: Log,
    best: Mapping[str, Mapping[str, Any]] | None,
    costs: Mapping[str, float] | None = None,
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Run (or restore) one Tune experiment over `cells`; returns its results table (with a `cell` column) and the
    errors of its failed trials per cell."""
    storage = (plan.storage or str(plan.out_dir.resolve())).rstrip("/")
    # The experiment's name depends on its cells (and seeds), so a changed plan never restores a mismatched one.
    what = [c.key for c in cells] + ([f"seeds={list(plan.seeds)}"] if phase == "seed" else [])
    digest = hashlib.sha1(",".join(what).encode()).hexdigest()[:8]
    name = f"{phase}-w{cells[0].workers}-{digest}"
    # Trial records and states are shared by every experiment of the phase: keyed by configuration, they answer
    # any experiment that runs a configuration again (a restored one, or a later one that extends the seeds).
    asha = phase == "tune" and plan.asha  # trials report the evaluations where ASHA decides
    rungs = asha_rungs(StudySettings(name=name, storage_path=storage, asha=asha), plan.budget_epochs)
    execution = TrialExecution(
        workers=cells[0].workers,
        cpus_per_worker=plan.cpus_per_worker,
        use_gpu=plan.gpus_per_worker > 0,
        storage_path=f"{storage}/trials/{phase}",
        report_rungs=rungs,
    )
    resources, concurrency = plan_concurrency(execution, connect(address), plan.max_concurrent)
    fn = tune.with_resources(tune.with_parameters(gradalign_trainable, execution=execution), resources)
    if phase == "seed":
        # Seed runs are a fixed list: a new experiment answers the finished ones from their records at once and
        # resumes the others from their states. (Restoring one instead lost the runs Tune had not snapshotted yet:
        # its searcher had handed them out, so they were never started again.)
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = f"{storage}/{name}"
    if phase == "tune" and tune.Tuner.can_restore(path):
        log(f"  {phase}: resuming {path}")
        tuner = tune.Tuner.restore(path, trainable=fn, resume_errored=True)
    else:
        search, scheduler, callbacks, samples = _phase_search(plan, phase, cells, execution, best, costs)
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(
                search_alg=search,
                scheduler=scheduler,
                num_samples=samples,
                max_concurrent_trials=concurrency,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=0,
                callbacks=[*callbacks, RecordCloser(execution)],
                failure_config=tune.FailureConfig(max_failures=1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    log(f"  {phase}: {len(cells)} cells, {execution.workers} worker(s) per trial, up to {concurrency} trials at once")
    grid = tuner.fit()
    errors: dict[str, list[str]] = {}
    for result in grid:
        if result.error is not None:
            errors.setdefault(result.config.get(CELL), []).append(f"{result.path}: {_last_line(result.error)}")
    return results_table(grid, execution, config_columns=(CELL,)), errors


def _phase_search(
    plan: StudyPlan,
    phase: str,
    cells: Sequence[Cell],
    execution: TrialExecution,
    best: Mapping[str, Mapping[str, Any]] | None,
    costs: Mapping[str, float] | None = None,
):
    """Searcher, scheduler, callbacks and number of trials of a new experiment of `phase` over `cells`.

    Seed runs go longest first (by `costs`, the cells' seconds per tuning trial): the last runs to finish are then
    short ones, and the CPUs do not wait long on one straggler at the end."""
    if phase == "seed":
        longest_first = sorted(cells, key=lambda c: -(costs or {}).get(c.key, 0.0))
        configs = [{**best[c.key], "seed": seed, CELL: c.key} for c in longest_first for seed in plan.seeds]
        return FixedConfigs(configs, plan.objective, "max"), None, [TrialLine("  seed")], len(configs)
    index = {c.key: i for i, c in enumerate(plan.cells)}
    settings = {
        c.key: StudySettings(
            name=c.key,
            storage_path=str(plan.out_dir.resolve()),
            num_samples=plan.trials_per_cell,
            objectives=((plan.objective, "max"),),
            seed=plan.sampler_seed + index[c.key],
            asha=plan.asha,
        )
        for c in cells
    }
    records = TrialRecords(execution)
    group = {GROUP_SEEDS: list(plan.tuning_seeds)} if len(plan.tuning_seeds) > 1 else {}
    search = CellSearch(
        {c.key: make_searcher(c.space, settings[c.key], records, match={CELL: c.key}) for c in cells},
        {c.key: plan.trials_per_cell for c in cells},
        plan.objective,
        "max",
        extra=group,
    )
    scheduler = (
        CellScheduler({c.key: make_scheduler(settings[c.key], plan.budget_epochs) for c in cells})
        if plan.asha
        else None
    )
    mirror = CellMirror(
        {c.key: OptunaMirror(_optuna_db(plan), c.key, c.space, ((plan.objective, "max"),), execution) for c in cells}
    )
    return search, scheduler, [mirror, TrialLine("  tune")], plan.trials_per_cell * len(cells)


def _optuna_db(plan: StudyPlan) -> str:
    return f"sqlite:///{plan.out_dir.resolve() / 'optuna.db'}"


def _check_some_trial_ran(rows: pd.DataFrame, cell: Cell, phase: str, objective: str, errors: Sequence[str]) -> None:
    """Refuse to go on with a cell none of whose trials reported the objective (every one failed)."""
    if objective in rows and rows[objective].notna().any():
        return
    if rows.empty:
        raise StudyFailed(f"the {phase} experiment returned no trial of cell {cell.key}")
    first = errors[0] if errors else "no error recorded"
    raise StudyFailed(
        f"every {phase} trial of cell {cell.key} ({rows['trial_id'].nunique()} trials) failed; the "
        f"first error: {first} (each trial's error.txt has the traceback). Fix the cause and re-run the "
        "same command: the failed trials are retried, nothing else is run again"
    )


def _finished_rows(plan: StudyPlan, cell: Cell, phase: str, log: Log) -> pd.DataFrame | None:
    """The saved rows of a cell's finished phase; None if the phase must (still) run: no table yet, a damaged one
    (set aside and rebuilt from the trial records, without training), or seed runs of other seeds than the plan's."""
    path = plan.out_dir / "cells" / cell.key / f"{phase}.parquet"
    if not path.exists():
        return None
    try:
        rows = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 -- truncated or not Parquet at all: pyarrow raises several kinds
        aside = path.with_suffix(".parquet.damaged")
        path.replace(aside)
        log(
            f"  {cell.key}: {path} is damaged ({type(err).__name__}); moved to {aside.name}, rebuilding it from the "
            "trial records (nothing is trained again)"
        )
        return None
    if phase == "seed" and "seed" in rows and set(rows["seed"]) != set(plan.seeds):
        return None
    return rows


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


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
    """Every finished phase of every cell under `out_dir` (a partial study gives what it has).

    Raises `StudyFailed` naming the file when a table is damaged, or when there is nothing to report yet.
    """
    parts = []
    for path in sorted((out_dir / "cells").glob("*/*.parquet")):
        try:
            parts.append(pd.read_parquet(path))
        except Exception as err:  # noqa: BLE001 -- truncated or not Parquet at all: pyarrow raises several kinds
            raise StudyFailed(
                f"{path} is damaged ({type(err).__name__}: {_last_line(err)}): re-run the study's "
                "command without --report-only to rebuild it from the trial records (nothing is trained "
                "again)"
            ) from None
    if not parts:
        raise StudyFailed(f"no finished cell under {out_dir}/cells: nothing to report yet")
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
        how = result.get("status", how) + (", from its record: not trained again" if result.get(FROM_RECORD) else "")
        print(
            f"{self.prefix} #{self.count} {cell}: {_short(params)} -> val acc {val:.3f} (test {test:.3f}) after "
            f"{result.get('epochs', 0):.3g} epochs, {result.get('steps', 0)} steps ({how})",
            flush=True,
        )


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
