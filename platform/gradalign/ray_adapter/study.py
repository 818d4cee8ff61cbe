"""StudySettings, the searcher and scheduler, and `run_study`, which builds or restores the Tuner."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from gradalign.config import (
    ConfigError,
    TrainConfig,
)
from gradalign.data import DatasetCorruptError, DatasetNotFoundError, clear_cache, load_dataset

from ._common import (
    METRICS,
    _is_absolute_uri,
    _is_finite,
    _join,
    _read_json,
    _write_json,
    final_status,
)
from .execution import TrialExecution, connect, plan_concurrency
from .mirror import OptunaMirror
from .records import KEY_EXCLUDED, RecordCloser, TrialRecords
from .space import SearchSpace


# ---------------------------------------------------------------------------------------------------------------
# Searcher, scheduler, and the Tuner
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudySettings:
    """What a study optimises, how many trials it runs and where it keeps its state."""

    name: str
    """Study name: the Tune experiment and the Optuna study. Re-running a name resumes it."""
    storage_path: str
    """Absolute output folder of this study (Tune experiment, Train runs, results, Optuna SQLite file)."""
    num_samples: int = 8
    """Trials to run."""
    objectives: tuple[tuple[str, str], ...] = (("val_accuracy", "max"),)
    """(metric, 'max'|'min') pairs, read at a trial's last evaluation; two or more make a multi-objective study
    (ASHA then uses the first). Choose on validation metrics: the test split is for reporting."""
    seed: int = 0
    """Seed of Optuna's TPE sampler."""
    asha: bool = False
    """Stop unpromising trials early with ASHA on `epochs` (training examples seen / training-set size)."""
    grace_period: float = 1.0
    """ASHA: epochs' worth of examples every trial gets before it may be stopped."""
    reduction_factor: float = 2
    """ASHA: keep the best 1/reduction_factor at each rung."""
    max_concurrent_trials: int | None = None
    """Cap on concurrent trials (the cluster's resources bound it anyway)."""
    max_failures: int = 1
    """Tune retries per trial (each resumes from the trial's latest checkpoint)."""
    time_budget_s: float | None = None
    """Stop starting trials after this many seconds (None: no limit)."""
    initial_points: tuple[Mapping[str, Any], ...] = ()
    """Configurations to try first (Optuna enqueues them; the sampler takes over after), e.g. a known baseline."""
    verbose: int = 0
    """Tune's own console output (0: none; `run_study` callbacks print a line per result instead)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError("name", self.name, "must be a non-empty name without '/'")
        if not _is_absolute_uri(self.storage_path):
            raise ConfigError("storage_path", self.storage_path, "must be an absolute path or a URI")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigError("num_samples", self.num_samples, "must be a positive integer")
        if not self.objectives:
            raise ConfigError("objectives", self.objectives, "need at least one (metric, mode)")
        for metric, mode in self.objectives:
            if metric not in METRICS or metric == "status":
                raise ConfigError("objectives", metric, f"metric must be one of {', '.join(METRICS[:-1])}")
            if mode not in ("min", "max"):
                raise ConfigError("objectives", mode, "mode must be 'min' or 'max'")
        if not _is_finite(self.grace_period) or self.grace_period <= 0:
            raise ConfigError("grace_period", self.grace_period, "must be a positive number of epochs")
        if not self.reduction_factor > 1:
            raise ConfigError("reduction_factor", self.reduction_factor, "must be > 1")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ConfigError("max_failures", self.max_failures, "must be an integer >= 0 (bounded retries)")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError("time_budget_s", self.time_budget_s, "must be > 0")

    @property
    def metric(self) -> str:
        return self.objectives[0][0]

    @property
    def mode(self) -> str:
        return self.objectives[0][1]

    @property
    def experiment_path(self) -> str:
        """The Tune experiment folder (what `Tuner.restore` reads)."""
        return _join(self.storage_path, "tune")

    @property
    def optuna_storage(self) -> str:
        """SQLite URL of the mirrored Optuna study (`optuna-dashboard <this>`)."""
        return f"sqlite:///{_join(self.storage_path, 'optuna.db')}"


_REDRAWS = 20
"""Draws a searcher makes before it accepts repeating a configuration (a small categorical space can force it)."""


class _StatusOptunaSearch(OptunaSearch):
    """`OptunaSearch` that records each trial's final status and Tune trial id as Optuna user attrs, and that
    first re-suggests the configurations its trial records hold but it does not know (see `_unknown_records`)."""

    def __init__(self, *args, records: TrialRecords | None = None, match: Mapping[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._records = records
        self._match = dict(match or {})
        self._replay: list[dict[str, Any]] | None = None  # None: not looked at yet in this process

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            ot_trial.set_user_attr("status", final_status(result, error))
        super().on_trial_complete(trial_id, result=result, error=error)

    def suggest(self, trial_id: str) -> dict | None:
        if getattr(self, "_replay", None) is None:
            self._replay = self._unknown_records()
        if self._replay:
            self._ot_study.enqueue_trial(self._replay.pop(0))  # the next ask() returns exactly these parameters
            return super().suggest(trial_id)
        # A seeded sampler whose trials were replayed draws next what it drew for them before the restore: draw
        # again rather than run a configuration twice (the discarded draw is a FAIL trial of the in-memory study).
        config = super().suggest(trial_id)
        for _ in range(_REDRAWS):
            if not self._repeats(self._ot_trials[trial_id]):
                break
            self._ot_study.tell(self._ot_trials.pop(trial_id), state=optuna.trial.TrialState.FAIL)
            config = super().suggest(trial_id)
        return config

    def _repeats(self, ot_trial) -> bool:
        """Whether another trial of the study has exactly the parameters of `ot_trial`."""
        return any(
            t.number != ot_trial.number and t.params == ot_trial.params
            for t in self._ot_study.get_trials(deepcopy=False)
        )

    def _unknown_records(self) -> list[dict[str, Any]]:
        """Parameters of the trial records of this study (whose config holds `match`) that no trial this searcher
        knows ran, oldest first.

        Tune restores the searcher from a snapshot taken at most every ~10 s: the trials it suggested after that
        snapshot, some of them trained or finished, are unknown to it. Suggesting their configurations again, in
        their order, hands each to a trial that finds its record (a finished one answers without training, an
        unfinished one resumes) and tells the sampler its result: no trial is trained twice and the budget is not
        spent on new configurations while finished ones are forgotten.
        """
        records = getattr(self, "_records", None)
        if records is None:
            return []
        known = [t.params for t in self._ot_trials.values()]  # (what it suggested, whether it started or not)
        names = set(self._space.param_names)
        out = []
        for record in records.all():
            params = {k: v for k, v in record.config.items() if k in names}
            if all(record.config.get(k) == v for k, v in self._match.items()) and params not in known + out:
                out.append(params)
        return out

    def save(self, checkpoint_path: str) -> None:
        replay, self._replay = self._replay, None  # looked at again after every restore
        try:
            super().save(checkpoint_path)
        finally:
            self._replay = replay

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._replay = None

    def __getstate__(self) -> dict:  # pickled inside another searcher (studies.cell_search.CellSearch)
        return {**self.__dict__, "_replay": None}


def make_searcher(
    space: SearchSpace,
    settings: StudySettings,
    records: TrialRecords | None = None,
    match: Mapping[str, Any] | None = None,
) -> Searcher:
    """`OptunaSearch` over `space` with a seeded multivariate TPE; startup trials scale with the budget.

    Given the study's trial `records` (those whose config holds the entries `match`, e.g. a cell's key), the
    searcher first suggests again the recorded configurations it does not know, e.g. after a restore from Tune's
    older snapshot.
    """
    sampler = optuna.samplers.TPESampler(
        multivariate=True,
        seed=settings.seed,
        n_startup_trials=min(10, max(2, settings.num_samples // 3)),
    )
    metrics = [m for m, _ in settings.objectives]
    modes = [m for _, m in settings.objectives]
    single = len(metrics) == 1
    return _StatusOptunaSearch(
        space=space,
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        sampler=sampler,
        study_name=settings.name,
        points_to_evaluate=[dict(p) for p in settings.initial_points] or None,
        records=records,
        match=match,
    )


def make_scheduler(settings: StudySettings, max_epochs: float) -> TrialScheduler | None:
    """ASHA on the trainer's own `epochs` counter (examples seen / training-set size: comparable across batch sizes;
    Tune's `training_iteration` restarts after a retry and counts evaluations, which are log-spaced)."""
    if not settings.asha:
        return None
    # max_t past the budget: a trial that reaches its last evaluation ends by itself instead of being stopped
    # (killed) by ASHA, which is what can strand a Train run's placement group.
    return ASHAScheduler(
        time_attr="epochs",
        metric=settings.metric,
        mode=settings.mode,
        max_t=_asha_max_t(settings, max_epochs),
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


def _asha_max_t(settings: StudySettings, max_epochs: float) -> float:
    return max(max_epochs, settings.grace_period) + 1


def asha_rungs(settings: StudySettings, max_epochs: float) -> tuple[float, ...]:
    """The `epochs` at which `make_scheduler`'s ASHA decides (its rungs, as Ray's `_Bracket` computes them; () without
    ASHA): trials report their first evaluation at or past each (`TrialExecution.report_rungs`)."""
    if not settings.asha:
        return ()
    max_t, rf = _asha_max_t(settings, max_epochs), settings.reduction_factor
    count = int(math.log(max_t / settings.grace_period) / math.log(rf) + 1)
    return tuple(settings.grace_period * rf**k for k in range(count))


def run_study(
    trainable: Callable[..., Any],
    space: SearchSpace,
    settings: StudySettings,
    execution: TrialExecution,
    *,
    address: str | None = None,
    callbacks: Sequence[tune.Callback] = (),
    log: Callable[[str], None] = print,
) -> tune.ResultGrid:
    """Validate, connect, and run (or resume) the study; returns Tune's `ResultGrid`.

    `trainable(config, execution=...)` is a Tune function trainable (`trainables.gradalign_trainable`).
    Everything that can be checked is checked before Ray starts (the space, the dataset's files, a writable output
    folder, the settings of a study already there) or right after it does (whether one trial's workers fit on the
    cluster), so a bad configuration fails in seconds instead of hanging.
    A study whose experiment folder exists is restored: finished trials stay finished, running and errored ones
    resume from their latest checkpoint, and the searcher continues where it was; trials that Tune's older snapshot
    forgot are answered from their records (`records`), so none is trained twice. Restoring with another search
    space, objective, budget or execution than the study was started with is refused (Tune would silently keep
    the old ones). Callbacks are those the study was started with.
    """
    space.validate()
    for point in settings.initial_points:
        space.check_point(point)
    _check_dataset(space)
    _check_writable(settings.storage_path)
    if execution.storage_path != settings.storage_path:
        execution = dataclasses.replace(execution, storage_path=settings.storage_path)
    restore = tune.Tuner.can_restore(settings.experiment_path)
    fingerprint, fingerprint_path = _fingerprint(space, settings, execution), _join(settings.storage_path, "study.json")
    _check_same_study(settings, _read_json(fingerprint_path), fingerprint)
    resources, concurrency = plan_concurrency(execution, connect(address), settings.max_concurrent_trials)
    max_epochs = float(space.fixed.get("epochs", TrainConfig.epochs))
    execution = dataclasses.replace(execution, report_rungs=asha_rungs(settings, max_epochs))
    fn = tune.with_resources(tune.with_parameters(trainable, execution=execution), resources)

    mirror = OptunaMirror(settings.optuna_storage, settings.name, space, settings.objectives, execution)
    if restore:
        log(f"resuming study {settings.name!r} from {settings.experiment_path}")
        tuner = tune.Tuner.restore(settings.experiment_path, trainable=fn, resume_errored=True)
    else:
        _write_json(fingerprint_path, fingerprint)
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(space, settings, TrialRecords(execution)),
                scheduler=make_scheduler(settings, max_epochs),
                num_samples=settings.num_samples,
                max_concurrent_trials=concurrency,
                time_budget_s=settings.time_budget_s,
                # An in-process trial's process (torch and the data already imported) serves the next trial:
                # seconds per trial. A Train driver is not reused: its Train run owns actors and queues.
                reuse_actors=execution.in_process,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=settings.storage_path,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[mirror, RecordCloser(execution), *callbacks],
                verbose=settings.verbose,
            ),
        )
    log(
        f"study {settings.name!r}: {settings.num_samples} trials, {execution.workers} worker(s) x "
        f"{execution.cpus_per_worker:g} CPU each, trial resources {resources}, up to {concurrency} at once"
    )
    return tuner.fit()


def _check_dataset(space: SearchSpace) -> None:
    """Load the study's dataset once, here: missing files (without download) are refused before Ray starts."""
    name = str(space.fixed.get("dataset", TrainConfig.dataset))
    try:
        load_dataset(
            name,
            data_dir=space.fixed.get("data_dir", TrainConfig.data_dir),
            download=bool(space.fixed.get("download", False)),
        )
    except (DatasetNotFoundError, DatasetCorruptError) as err:
        raise ConfigError("dataset", name, str(err)) from None
    finally:
        clear_cache()  # the trials load their own copies


def _check_writable(storage_path: str) -> None:
    if "://" in storage_path:
        return  # (an object store: checked when the first file is written)
    probe = os.path.join(storage_path, f".write-test-{os.getpid()}")
    try:
        os.makedirs(storage_path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError("storage_path", storage_path, f"cannot write there ({err.strerror or err})") from None


def _fingerprint(space: SearchSpace, settings: StudySettings, execution: TrialExecution) -> dict[str, Any]:
    """What a resumed study must share with the study it resumes, flattened to 'space.lr.high'-style keys."""
    what = {
        "space": dataclasses.asdict(space),
        "study": {
            k: getattr(settings, k)
            for k in ("objectives", "num_samples", "seed", "asha", "grace_period", "reduction_factor", "initial_points")
        },
        "execution": {k: getattr(execution, k) for k in ("workers", "cpus_per_worker", "use_gpu")},
    }
    return flat_settings(what)


def _check_same_study(settings: StudySettings, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    changes = setting_changes(saved, now)
    if changes:
        raise ConfigError(
            "name",
            settings.name,
            f"a study of this name at {settings.storage_path} was started with "
            f"other settings ({'; '.join(changes)}); resume it with the same options, or start a new "
            "study with another --name (or --out)",
        )


def setting_changes(saved: Mapping[str, Any] | None, now: Mapping[str, Any], limit: int = 8) -> list[str]:
    """'key: old -> new' for each flattened setting that differs (at most `limit`, then 'and N more'); [] if
    nothing was saved. Where the data lives (`KEY_EXCLUDED`) is not a setting."""
    if saved is None:
        return []
    kept = [k for k in saved.keys() | now.keys() if k.rsplit(".", 1)[-1] not in KEY_EXCLUDED]
    changed = sorted(k for k in kept if not _same(saved.get(k), now.get(k)))
    lines = [f"{k}: {_show(saved.get(k))} -> {_show(now.get(k))}" for k in changed[:limit]]
    return lines + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (so that NaN, e.g. the alpha of a split without one, equals NaN)."""
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)


def _show(value: Any) -> str:
    return "(not set)" if value is None else repr(value)


def flat_settings(value: Any) -> dict[str, Any]:
    """JSON-ready settings flattened to 'space.lr.high'-style keys (what `setting_changes` compares)."""
    return _flatten(json.loads(json.dumps(value, default=repr)))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}
