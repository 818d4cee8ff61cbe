"""The study engine: cells x per-cell tuning x seeds, every phase of every cell saved as it finishes. The only place
in the project a Ray Tune `Tuner` is built.

A *cell* is one setting of the scientific parameters (e.g. algorithm x batch size). In each cell the nuisance
parameters (step size, β, momentum, ...) are re-tuned with Ray Tune + Optuna on the validation split (`tune`
phase, with its range extensions, then `confirm`: see `cell_tuning`), then the chosen configuration is re-run with
seeds of its own, disjoint from the tuning seeds (`seed` phase, in rounds while comparisons are undetermined with
`--seeds auto`), whose test metrics are the result. Each phase (and round) of each cell is written to
`<out>/cells/<cell>/<table>.parquet` before the next starts; the cells of a phase share one Tune experiment per
worker count, so that trials of different cells share the CPUs and reuse trial processes.

An interrupted study (even killed with SIGKILL) resumes where it stopped when it is run again: each trial keeps a
record of what it trained, keyed by its configuration (`<out>/trials/<table>/`, see `records`), and those records,
not Tune's snapshot of the experiment (taken at most every ~10 s), decide what is left to do. A finished trial is
never trained again, an unfinished one loses at most the evaluation interval in flight, and `optuna.db` holds one
finished Optuna trial per tuning trial of the tables (it is a mirror: rebuilt from the tables when missing or damaged).
Every decision between phases reads only the saved tables, so a resumed study takes the same decisions. The folder
remembers the study's protocol (`gradalign.study_file`): running it again with other settings is refused.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from ray import tune

from gradalign.analysis import COUNTER, rank_trials, trial_table
from gradalign.comparisons import comparison_records, seeds_wanted
from gradalign.config import ALIGNING_ALGORITHMS, TrainConfig
from gradalign.study_file import check_study_file, write_study_file
from gradalign.tables import DamagedTable, phase_table_path, read_table, save_table
from gradalign.tuning import make_sampler

from ._common import GROUP_SEEDS
from .cell_search import CELL, CellMirror, CellScheduler, CellSearch, FixedConfigs
from .cell_tuning import range_json, runs_of, tune_cells
from .connection import connect
from .execution import TrialExecution, plan_concurrency
from .mirror import OptunaMirror, sync_optuna_study
from .plan import Cell, StudyPlan
from .progress import TrialLine, describe
from .records import RecordCloser, TrialRecords, damaged_records
from .results import results_table
from .search import asha_rungs, make_scheduler, make_searcher, warm_start_searcher
from .space import SearchSpace

Log = Callable[[str], None]
RUN = "run"
"""Config entry naming a fixed run of a cell (e.g. 'seed=1000'): what a phase's table is checked against."""


class StudyFailed(RuntimeError):
    """A cell cannot go on: every trial of one of its phases failed. The message names the cell and the first error."""


def run_plan(
    plan: StudyPlan,
    trainable: Callable[..., Any],
    *,
    address: str | None = None,
    log: Log = print,
    extend_seeds: bool = False,
) -> pd.DataFrame:
    """Tune every cell, re-run its chosen configuration with each seed; return the history of every trial.

    `trainable(config, execution=...)` is the Tune function trainable (`trainables.gradalign_trainable`). A study
    folder remembers its protocol: other settings are refused (`ConfigError`) before anything runs, except more
    seeds when `extend_seeds`.
    """
    check_folder(plan, extend_seeds)
    write_study_file(plan.out_dir, plan.protocol, plan.cell_settings())
    engine = Engine(plan, trainable, address, log)
    started = time.perf_counter()
    protocol = plan.protocol
    log(f"tuning {len(plan.cells)} cells: {protocol.tuning_sentence()}")
    tuned, choices = tune_cells(engine)
    chosen = {}
    for cell in plan.cells:
        chosen[cell.key] = choices[cell.key].config
        log(f"  {cell.key}: {describe(chosen[cell.key])} ({choices[cell.key].reason})")
    design = protocol.design
    log(
        f"re-running each cell's chosen configuration with seeds of its own ({protocol.seeds_sentence()}) "
        f"({time.perf_counter() - started:.0f} s into the study)"
    )
    seeds = {cell.key: design.looks[0] for cell in plan.cells}
    costs = trial_seconds(tuned)
    while True:
        runs = {key: {f"seed={s}": {**chosen[key], "seed": s} for s in protocol.seeds[:n]} for key, n in seeds.items()}
        seeded = engine.run_configs("seed", runs, costs=costs)
        more = more_seeds(plan, seeded, seeds)
        if not more:
            break
        log(
            f"undetermined comparisons: {', '.join(f'{k} to {n} seeds' for k, n in sorted(more.items()))} "
            f"({time.perf_counter() - started:.0f} s into the study)"
        )
        seeds.update(more)
    history = pd.concat([t for c in plan.cells for t in (tuned[c.key], seeded[c.key])], ignore_index=True)
    save_table(history, plan.out_dir / "history")
    return history


def check_folder(plan: StudyPlan, extend_seeds: bool = False) -> None:
    """Before anything runs: the study folder holds this study or none (`ConfigError` naming what changed), and every
    trial record in it can be read (`StudyFailed` naming the files and what to do)."""
    check_study_file(plan.out_dir, plan.protocol, plan.cell_settings(), extend_seeds)
    damaged = damaged_records(plan.storage)
    if damaged:
        raise StudyFailed(
            f"{len(damaged)} trial record(s) cannot be read: {'; '.join(damaged[:3])}"
            + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
            + ". A record says what one trial trained; move each aside (e.g. mv FILE FILE.damaged) and re-run the "
            "same command: that trial resumes from its last saved state (or starts over), nothing else is trained "
            "again. Or restore the files from a backup."
        )


class Engine:
    """Runs the phases of one study: each phase of each cell once, answered from its saved table when it exists."""

    def __init__(
        self,
        plan: StudyPlan,
        trainable: Callable[..., Any],
        address: str | None,
        log: Log,
        callbacks: Sequence[tune.Callback] = (),
    ):
        self.plan = plan
        self.trainable = trainable
        self.address = address
        self.log = log
        self.callbacks = tuple(callbacks)  # (e.g. a benchmark's timer)

    # -- phases ----------------------------------------------------------------------------------------------------
    def search(
        self,
        phase: str,
        round_no: int = 1,
        spaces: Mapping[str, SearchSpace] | None = None,
        trials: int | None = None,
        warm: Mapping[str, pd.DataFrame] | None = None,
    ) -> dict[str, pd.DataFrame]:
        """Tune the cells of `spaces` (default: every cell, its own space) that have not finished this round of
        `phase`: each with its own Optuna searcher (`trials` trials, default the protocol's trials per cell),
        warm-started with the rows of `warm` (the earlier rounds of the cell). Returns {cell key: this round's rows},
        which carry `round` and `search_range` columns."""
        spaces = dict(spaces or {c.key: c.space for c in self.plan.cells})
        table = phase if round_no == 1 else f"{phase}-r{round_no}"
        cells = [c for c in self.plan.cells if c.key in spaces]
        done = {c.key: self._finished(c, table) for c in cells}
        todo = [c for c in cells if done[c.key] is None]
        self._say_finished(table, len(cells) - len(todo))
        for workers in sorted({c.workers for c in todo}):
            # the experiment of a worker count holds every cell of that count, so that a restart restores the same one
            group = [c for c in cells if c.workers == workers]
            search = _Search(spaces, trials or self.plan.protocol.trials_per_cell, warm or {})
            result, errors = self._experiment(table, group, search=search)
            for cell in [c for c in group if done[c.key] is None]:
                rows = self._rows(result, cell, phase, errors)
                rows = rows.assign(round=round_no, search_range=range_json(spaces[cell.key]))
                save_table(rows, phase_table_path(self.plan.out_dir, cell.key, table).with_suffix(""))
                done[cell.key] = rows
        return done

    def run_configs(
        self, phase: str, runs: Mapping[str, Mapping[str, Mapping[str, Any]]], costs: Mapping[str, float] | None = None
    ) -> dict[str, pd.DataFrame]:
        """Run fixed configurations: `runs` is {cell key: {run label: TrainConfig fields}}. A cell's phase is
        finished when its table holds every label it asks for; only the missing labels run (a study that adds seeds
        runs the new ones only). The longest cells (by `costs`, seconds per trial) go first, so that the CPUs do not
        wait on one long straggler at the end. Returns {cell key: the rows of the labels asked for}."""
        saved = {c.key: self._finished(c, phase) for c in self.plan.cells if runs.get(c.key)}
        missing = {}
        for key, wanted in runs.items():
            have = set() if saved.get(key) is None else set(saved[key][RUN].dropna())
            if set(wanted) - have:
                missing[key] = {label: cfg for label, cfg in wanted.items() if label not in have}
        self._say_finished(phase, sum(key not in missing for key in saved))
        todo = [c for c in self.plan.cells if c.key in missing]
        for workers in sorted({c.workers for c in todo}):
            group = [c for c in todo if c.workers == workers]
            longest_first = sorted(group, key=lambda c: -(costs or {}).get(c.key, 0.0))
            configs = [{**cfg, RUN: label, CELL: c.key} for c in longest_first for label, cfg in missing[c.key].items()]
            table, errors = self._experiment(phase, group, configs)
            for cell in group:
                rows = self._rows(table, cell, phase, errors)
                if saved.get(cell.key) is not None:
                    rows = pd.concat([saved[cell.key], rows], ignore_index=True)
                save_table(rows, phase_table_path(self.plan.out_dir, cell.key, phase).with_suffix(""))
                saved[cell.key] = rows
        return {key: rows[rows[RUN].isin(set(runs[key]))] for key, rows in saved.items() if rows is not None}

    # -- one Tune experiment ---------------------------------------------------------------------------------------
    def _experiment(
        self,
        phase: str,
        cells: Sequence[Cell],
        configs: Sequence[Mapping[str, Any]] | None = None,
        search: _Search | None = None,
    ) -> tuple[pd.DataFrame, dict[str, list[str]]]:
        """Run (or restore) one Tune experiment over `cells`: a `search`, or a list of fixed `configs`. `phase` names
        the experiment, its records folder and its table. Returns its results table (with `cell` and `run` columns)
        and the errors per cell."""
        plan, protocol = self.plan, self.plan.protocol
        storage = plan.storage
        digest = hashlib.sha1(",".join(c.key for c in cells).encode()).hexdigest()[:8]
        name = f"{phase}-w{cells[0].workers}-{digest}"
        searching = search is not None
        asha = searching and protocol.asha
        execution = TrialExecution(
            workers=cells[0].workers,
            cpus_per_worker=plan.resources.cpus_per_worker,
            use_gpu=plan.resources.gpus_per_worker > 0,
            storage_path=f"{storage}/trials/{phase}",
            report_rungs=asha_rungs(protocol.budget.epochs, protocol.grace_period) if asha else (),
        )
        resources, concurrency = plan_concurrency(execution, connect(self.address), plan.resources.max_concurrent)
        fn = tune.with_resources(tune.with_parameters(self.trainable, execution=execution), resources)
        if not searching:
            # A fixed list: a new experiment answers the finished runs from their records at once and resumes the
            # others from their states. (Restoring one instead lost the runs Tune had not snapshotted yet: its
            # searcher had handed them out, so they were never started again.)
            name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = f"{storage}/{name}"
        if searching and tune.Tuner.can_restore(path):
            self.log(f"  {phase}: resuming {path}")
            tuner = tune.Tuner.restore(path, trainable=fn, resume_errored=True)
        else:
            if searching:
                searcher, scheduler, callbacks, samples = self._search_parts(phase, cells, execution, search)
            else:
                searcher = FixedConfigs(configs, protocol.objective, protocol.mode)
                scheduler, callbacks, samples = None, [TrialLine(phase, len(configs))], len(configs)
            tuner = tune.Tuner(
                fn,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=samples,
                    max_concurrent_trials=concurrency,
                    reuse_actors=execution.in_process,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    verbose=0,
                    callbacks=[*callbacks, *self.callbacks, RecordCloser(execution)],
                    failure_config=tune.FailureConfig(max_failures=plan.resources.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                ),
            )
        self.log(
            f"  {phase}: {len(cells)} cells, {execution.workers} worker(s) per trial, up to {concurrency} trials "
            "at once"
        )
        grid = tuner.fit()
        errors: dict[str, list[str]] = {}
        for result in grid:
            if result.error is not None:
                errors.setdefault(result.config.get(CELL), []).append(f"{result.path}: {_last_line(result.error)}")
        return results_table(grid, execution, config_columns=(CELL, RUN)), errors

    def _search_parts(self, phase: str, cells: Sequence[Cell], execution: TrialExecution, search: _Search):
        """Searcher, scheduler, callbacks and number of trials of a new search experiment over `cells`."""
        protocol = self.plan.protocol
        index = {c.key: i for i, c in enumerate(self.plan.cells)}
        records = TrialRecords(execution)
        searchers = {}
        for c in cells:
            space = search.spaces[c.key]
            seed = protocol.sampler_seed + index[c.key] + 1000 * _round_of(phase)
            searchers[c.key] = make_searcher(
                space,
                name=c.key,
                sampler=make_sampler(protocol.recipe, seed, space.param_names),
                objectives=protocol.objectives,
                records=records,
                match={CELL: c.key},
                initial_points=c.initial_points if _round_of(phase) == 0 else (),
            )
            if c.key in search.warm and len(protocol.objectives) == 1:
                warm_start_searcher(searchers[c.key], space, runs_of([search.warm[c.key]], protocol), protocol)
        group = {GROUP_SEEDS: list(protocol.tuning_seeds)} if len(protocol.tuning_seeds) > 1 else {}
        trials = {c.key: search.trials for c in cells}
        searcher = CellSearch(searchers, trials, protocol.objective, protocol.mode, extra=group)
        scheduler = None
        if protocol.asha:
            asha = {
                c.key: make_scheduler(protocol.objective, protocol.mode, protocol.budget.epochs, protocol.grace_period)
                for c in cells
            }
            scheduler = CellScheduler(asha)
        mirror = CellMirror(
            {
                c.key: OptunaMirror(self.optuna_db, c.key, search.spaces[c.key], protocol.objectives, execution)
                for c in cells
            }
        )
        total = search.trials * len(cells)
        return searcher, scheduler, [mirror, TrialLine(phase, total)], total

    # -- tables ----------------------------------------------------------------------------------------------------
    def _rows(self, table: pd.DataFrame, cell: Cell, phase: str, errors: Mapping[str, list[str]]) -> pd.DataFrame:
        rows = tag(table[table[CELL] == cell.key].drop(columns=CELL), self.plan, cell, phase)
        _check_some_trial_ran(rows, cell, phase, self.plan.protocol.objective, errors.get(cell.key, []))
        return rows

    def _finished(self, cell: Cell, phase: str) -> pd.DataFrame | None:
        """The saved rows of a cell's finished phase; None if the phase must (still) run: no table yet, or a damaged
        one (set aside and rebuilt from the trial records, without training)."""
        path = phase_table_path(self.plan.out_dir, cell.key, phase)
        if not path.exists():
            return None
        try:
            rows = read_table(path)
        except DamagedTable as err:
            aside = path.with_suffix(".parquet.damaged")
            path.replace(aside)
            self.log(
                f"  {cell.key}: {err}; moved to {aside.name}, rebuilding it from the trial records (nothing is "
                "trained again)"
            )
            return None
        return rows

    def _say_finished(self, phase: str, finished: int) -> None:
        if finished:
            self.log(f"  {phase}: {finished} of {len(self.plan.cells)} cells already finished")

    # -- the Optuna mirror -----------------------------------------------------------------------------------------
    @property
    def optuna_db(self) -> str:
        return f"sqlite:///{self.plan.out_dir.resolve() / 'optuna.db'}"

    def sync_optuna(self, tuned: Mapping[str, pd.DataFrame], spaces: Mapping[str, SearchSpace]) -> None:
        """Make `optuna.db` hold exactly the tuning trials of the tables (one Optuna study per cell, over the widest
        range it searched). It is a mirror: when it is missing or damaged (e.g. deleted after the study), it is
        rebuilt from them, and the study says so."""
        path = self.plan.out_dir / "optuna.db"
        problem = None if path.exists() else "missing"
        if problem is None:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                db.execute("select count(*) from trials").fetchone()
            except sqlite3.Error as err:
                problem = f"damaged ({err})"
            finally:
                db.close()
            if problem is not None:
                path.replace(path.with_suffix(".db.damaged"))
        added = 0
        for cell in self.plan.cells:
            rows = tuned.get(cell.key)
            if rows is not None and len(rows):
                space = spaces.get(cell.key, cell.space)
                added += sync_optuna_study(rows, self.optuna_db, cell.key, space, self.plan.protocol.objectives)
        if problem is not None:
            self.log(f"  {path} was {problem}: rebuilt from the tuning tables ({added} trials)")


@dataclass(frozen=True)
class _Search:
    """What a search experiment searches: each cell's space, the trials per cell, the rows to warm-start from."""

    spaces: Mapping[str, SearchSpace]
    trials: int
    warm: Mapping[str, pd.DataFrame]


def _round_of(table: str) -> int:
    """0 for a first round ('tune'), k - 1 for 'tune-rk'."""
    return int(table.rsplit("-r", 1)[1]) - 1 if "-r" in table else 0


def more_seeds(plan: StudyPlan, seeded: Mapping[str, pd.DataFrame], seeds: Mapping[str, int]) -> dict[str, int]:
    """{cell key: seeds at the next look} for the cells of the comparisons still undetermined below the cap (a
    sequential study, `--seeds auto`); {} when every comparison is decided or at the cap, or the seeds are fixed."""
    protocol = plan.protocol
    if not protocol.sequential or not seeded:
        return {}
    spec = protocol.compare
    history = pd.concat(list(seeded.values()), ignore_index=True)
    carry = [c for c in (spec.x, spec.within) if c]
    trials = trial_table(history, protocol.target, phase="seed", carry=carry)
    records = comparison_records(
        trials,
        x=spec.x,
        pairs=spec.pairs,
        reference=spec.reference,
        tolerance=protocol.tolerance,
        design=protocol.design,
        within=spec.within,
    )
    wanted = seeds_wanted(records, protocol.design)
    out = {}
    for cell in plan.cells:
        n = wanted.get((cell.coords.get("algorithm"), cell.coords.get(spec.x)), 0)
        if n > seeds.get(cell.key, 0):
            out[cell.key] = n
    return out


def best_config(tuned: pd.DataFrame, objective: str, mode: str = "max") -> dict[str, Any]:
    """The TrainConfig of the trial with the best objective at its last evaluation (non-diverged trials first).

    A tie (common with accuracy on a small split) goes to the lower final validation loss, then to the smallest
    trial id: the same trial results give the same choice, whatever the order of the rows. The test split is
    never read. The seed is left out: the seed runs set their own.
    """
    last = tuned.sort_values(COUNTER, kind="stable").groupby("trial_id").tail(1)
    row = rank_trials(last, objective, mode).iloc[0]
    fields = [f for f in TrainConfig.__dataclass_fields__ if f != "extras"]
    return {k: _plain(row[k]) for k in fields if k in row and k != "seed" and not _missing(row[k])}


def trial_seconds(tables: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    """Each cell's mean training seconds per trial (the last `wall_time` of each of its trials)."""
    out = {}
    for key, rows in tables.items():
        last = rows.sort_values(COUNTER).groupby("trial_id")["wall_time"].last() if len(rows) else pd.Series()
        out[key] = float(last.mean()) if len(last) else 0.0
    return out


def tag(table: pd.DataFrame, plan: StudyPlan, cell: Cell, phase: str) -> pd.DataFrame:
    """Add the study's bookkeeping columns; β means nothing for algorithms that do not align, so blank it."""
    table = table.copy()
    table.insert(0, "phase", phase)
    table.insert(0, "cell", cell.key)
    table.insert(0, "study", plan.protocol.name)
    for name, value in cell.coords.items():
        table[name] = value
    if "beta" in table and "algorithm" in table:
        table.loc[~table["algorithm"].isin(ALIGNING_ALGORITHMS), "beta"] = math.nan
    return table


def _check_some_trial_ran(rows: pd.DataFrame, cell: Cell, phase: str, objective: str, errors: Sequence[str]) -> None:
    """Refuse to go on with a cell none of whose trials reported the objective (every one failed)."""
    if objective in rows and rows[objective].notna().any():
        return
    if rows.empty:
        raise StudyFailed(f"the {phase} experiment returned no trial of cell {cell.key}")
    first = errors[0] if errors else "no error recorded"
    raise StudyFailed(
        f"every {phase} trial of cell {cell.key} ({rows['trial_id'].nunique()} trials) failed; the first error: "
        f"{first} (each trial's error.txt has the traceback). Fix the cause and re-run the same command: the failed "
        "trials are retried, nothing else is run again"
    )


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value):
    item = getattr(value, "item", None)
    return item() if callable(item) else value
