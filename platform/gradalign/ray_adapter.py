"""Ray Tune + Optuna plumbing for GradAlign studies: the one module of the library that imports Ray.

What lives here, in the order a study uses it:

1. `SearchSpace` -- an Optuna define-by-run space (a picklable callable object, not a lambda: Tune pickles the
   searcher with the experiment state), conditional on the algorithm; `validate()` refuses bad ranges *before*
   Ray starts, by building a `TrainConfig` at every range endpoint.
2. `TrialExecution` -- how one trial runs (workers, CPUs per worker, where Train runs keep their checkpoints), and
   `plan_concurrency` -- the Tune resources of a trial and how many trials fit at once on the cluster.
3. `connect` -- join a running cluster (`address` / `RAY_ADDRESS`) or start a local one with the `train_driver`
   custom resource that Train-driver trials hold instead of a CPU.
4. `run_study` -- build (or restore) the `Tuner`: seeded TPE via `OptunaSearch`, optional ASHA on `epoch`, bounded
   retries, and `OptunaMirror`, which copies every finished trial into a SQLite Optuna study for optuna-dashboard.
5. `results_table` -- one tidy frame, a row per trial per reported epoch, with configuration, metrics and
   `provenance()`; `sync_optuna_study` re-syncs the SQLite study from it.

The trainable itself (what a trial runs) lives in the `trainables` package; `run_study` takes it as an argument, so
the library never imports `trainables`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
import pandas as pd
import pyarrow.fs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from gradalign.config import ALIGNING_ALGORITHMS, FEDERATED_ALGORITHMS, ConfigError, TrainConfig
from gradalign.provenance import provenance
from gradalign.training import METRIC_KEYS

__all__ = [
    "METRICS",
    "LOSS_PENALTY",
    "DRIVER_RESOURCE",
    "Range",
    "SearchSpace",
    "TrialExecution",
    "StudySettings",
    "penalise",
    "final_status",
    "plan_concurrency",
    "connect",
    "make_searcher",
    "make_scheduler",
    "OptunaMirror",
    "run_study",
    "results_table",
    "write_results_table",
    "sync_optuna_study",
]

METRICS = tuple(METRIC_KEYS)
"""Keys of `Trainer.train_epoch()`'s metrics: also the metric columns of the results table."""

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
    objective = {"train_loss", "test_loss", "test_accuracy"} & out.keys()
    if out.get("status") != "diverged" and all(_is_finite(out[k]) for k in objective):
        return out
    for key in objective:
        out[key] = 0.0 if key == "test_accuracy" else LOSS_PENALTY
    out["status"] = "diverged"
    return out


def final_status(result: Mapping[str, Any] | None, error: bool = False) -> str:
    """How a trial ended: 'completed', 'diverged', 'stopped' (by the scheduler, budget not spent) or 'error'.

    A trial that errored after its last epoch (e.g. while shutting down) still counts as completed or diverged.
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
# Search space
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A search range [low, high]; `log` samples log-uniformly (then low must be > 0)."""

    low: float
    high: float
    log: bool = False


# name -> (value type, algorithms that take it; None = all)
_SEARCHABLE: dict[str, tuple[type, tuple[str, ...] | None]] = {
    "lr": (float, None),
    "beta": (float, ALIGNING_ALGORITHMS),
    "momentum": (float, None),
    "weight_decay": (float, None),
    "local_steps": (int, FEDERATED_ALGORITHMS),
    "mu": (float, ("fedprox",)),
    "server_lr": (float, FEDERATED_ALGORITHMS),
}


@dataclass(frozen=True)
class SearchSpace:
    """Optuna define-by-run search space over `TrainConfig` fields, conditional on the algorithm.

    Called with an Optuna trial it suggests the ranged parameters that the trial's algorithm uses and returns the
    fixed ones; `OptunaSearch` merges both into the Tune config. A parameter is either fixed or searched, never both.
    """

    fixed: Mapping[str, Any] = field(default_factory=dict)
    """TrainConfig fields held constant (dataset, model, clients, epochs, seed, ...). `algorithm` goes here too,
    unless `algorithms` lists several to choose from."""
    lr: Range | None = Range(1e-3, 1.0, log=True)
    """Step size (all algorithms)."""
    beta: Range | None = None
    """Alignment coefficient β (gradalign, fedga only)."""
    batch_sizes: tuple[int, ...] = ()
    """Global batch sizes to choose from (categorical); empty means batch_size is fixed."""
    momentum: Range | None = None
    weight_decay: Range | None = None
    local_steps: Range | None = None
    """K, local steps per round (federated algorithms only), sampled as an integer."""
    mu: Range | None = None
    """FedProx proximal coefficient (fedprox only)."""
    server_lr: Range | None = None
    """Server step size on the averaged client update (federated algorithms only)."""
    algorithms: tuple[str, ...] = ()
    """Several algorithms to choose from (categorical); empty means fixed['algorithm'] (default gradalign)."""

    # -- define-by-run ---------------------------------------------------------------------------------------------
    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        if len(self.algorithms) > 1:
            algorithm = trial.suggest_categorical("algorithm", list(self.algorithms))
        else:
            algorithm = self._algorithm_choices()[0]
        for name, rng in self._ranges_for(algorithm).items():
            if _SEARCHABLE[name][0] is int:
                trial.suggest_int(name, int(rng.low), int(rng.high), log=rng.log)
            else:
                trial.suggest_float(name, rng.low, rng.high, log=rng.log)
        if self.batch_sizes:
            trial.suggest_categorical("batch_size", list(self.batch_sizes))
        return {**self.fixed, "algorithm": algorithm}

    def distributions(self, algorithm: str) -> dict[str, optuna.distributions.BaseDistribution]:
        """The Optuna distributions a trial of `algorithm` samples (to rebuild trials in another study)."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        if len(self.algorithms) > 1:
            out["algorithm"] = optuna.distributions.CategoricalDistribution(list(self.algorithms))
        for name, rng in self._ranges_for(algorithm).items():
            if _SEARCHABLE[name][0] is int:
                out[name] = optuna.distributions.IntDistribution(int(rng.low), int(rng.high), log=rng.log)
            else:
                out[name] = optuna.distributions.FloatDistribution(rng.low, rng.high, log=rng.log)
        if self.batch_sizes:
            out["batch_size"] = optuna.distributions.CategoricalDistribution(list(self.batch_sizes))
        return out

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every parameter some trial may sample."""
        names = {n for a in self._algorithm_choices() for n in self.distributions(a)}
        return tuple(sorted(names))

    def _algorithm_choices(self) -> tuple[str, ...]:
        return tuple(self.algorithms) or (str(self.fixed.get("algorithm", "gradalign")),)

    def _ranges_for(self, algorithm: str) -> dict[str, Range]:
        out = {}
        for name, (_, algorithms) in _SEARCHABLE.items():
            rng = getattr(self, name)
            if rng is not None and (algorithms is None or algorithm in algorithms):
                out[name] = rng
        return out

    # -- validation ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ConfigError` (naming field and value) unless every corner of the space is a valid `TrainConfig`."""
        for name, value in self.fixed.items():
            if name not in _TRAIN_CONFIG_FIELDS:
                raise ConfigError(name, value, "is not a TrainConfig field")
        if self.algorithms and "algorithm" in self.fixed:
            raise ConfigError("algorithm", self.fixed["algorithm"], "is both fixed and searched (algorithms=...)")
        if self.batch_sizes and "batch_size" in self.fixed:
            raise ConfigError("batch_size", self.fixed["batch_size"], "is both fixed and searched (batch_sizes=...)")
        searched = {n: getattr(self, n) for n in _SEARCHABLE if getattr(self, n) is not None}
        for name, rng in searched.items():
            if name in self.fixed:
                raise ConfigError(name, self.fixed[name], f"is both fixed and searched ({name}={rng})")
            self._check_range(name, rng)
            users = _SEARCHABLE[name][1]
            if users is not None and not set(self._algorithm_choices()) & set(users):
                raise ConfigError(
                    name, (rng.low, rng.high),
                    f"only {', '.join(users)} use {name}; algorithm={'/'.join(self._algorithm_choices())}",
                )
        if any(isinstance(b, bool) or not isinstance(b, int) for b in self.batch_sizes):
            raise ConfigError("batch_size", self.batch_sizes, "batch sizes must be integers")
        for config in self._corners():
            TrainConfig.from_dict(config)  # raises ConfigError naming the field and the value

    def check_point(self, point: Mapping[str, Any]) -> None:
        """Raise `ConfigError` unless `point` (e.g. an initial configuration to try) lies inside this space."""
        algorithm = point.get("algorithm", self._algorithm_choices()[0])
        if algorithm not in self._algorithm_choices():
            raise ConfigError("algorithm", algorithm, f"initial point outside algorithms {self._algorithm_choices()}")
        dists = self.distributions(algorithm)
        for name, value in point.items():
            if name not in dists:
                raise ConfigError(name, value, f"initial point sets a parameter that is not searched ({', '.join(dists)})")
            dist = dists[name]
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                inside = value in dist.choices
            else:
                inside = _is_finite(value) and dist.low <= value <= dist.high
            if not inside:
                raise ConfigError(name, value, "initial point outside the search range")
        ranges = self._ranges_for(algorithm)
        batch = point.get("batch_size", self.batch_sizes[0] if self.batch_sizes else self.fixed.get("batch_size", 128))
        TrainConfig.from_dict({**self.fixed, **{n: r.low for n, r in ranges.items()}, "batch_size": batch, **point})

    @staticmethod
    def _check_range(name: str, rng: Range) -> None:
        if not (_is_finite(rng.low) and _is_finite(rng.high)):
            raise ConfigError(name, (rng.low, rng.high), "search range must be finite")
        if not rng.low < rng.high:
            raise ConfigError(name, (rng.low, rng.high), "empty search range: low must be < high")
        if rng.log and rng.low <= 0:
            raise ConfigError(name, rng.low, "a log-uniform range needs low > 0")
        if _SEARCHABLE[name][0] is int and (rng.low != int(rng.low) or rng.high != int(rng.high)):
            raise ConfigError(name, (rng.low, rng.high), "integer parameter needs integer bounds")

    def _corners(self):
        """Configs at the range endpoints: all at `low`, then each parameter alone at `high`, each batch size."""
        for algorithm in self._algorithm_choices():
            ranges = self._ranges_for(algorithm)
            cast = {n: _SEARCHABLE[n][0] for n in ranges}
            base = {**self.fixed, "algorithm": algorithm, **{n: cast[n](r.low) for n, r in ranges.items()}}
            batch_sizes = self.batch_sizes or (base.get("batch_size", TrainConfig.batch_size),)
            for batch_size in batch_sizes:
                yield {**base, "batch_size": batch_size}
            for name, rng in ranges.items():
                yield {**base, "batch_size": batch_sizes[0], name: cast[name](rng.high)}


# ---------------------------------------------------------------------------------------------------------------
# How a trial runs, and how many run at once
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialExecution:
    """How each trial trains. One worker: in the Tune trial's own process. More: a Ray Train `TorchTrainer`."""

    workers: int = 1
    """Training processes per trial; each holds a share of the clients."""
    cpus_per_worker: float = 1.0
    """CPUs each worker (or the in-process trial) holds; torch uses that many threads."""
    use_gpu: bool = False
    """One GPU per worker."""
    storage_path: str = ""
    """Absolute folder (shared by all nodes on a cluster) where Train runs and in-process trial state live."""
    max_failures: int = 1
    """Ray Train worker-group retries per trial (each resumes from the latest checkpoint)."""
    controller_failure_limit: int = 2
    """Ray Train controller retries (e.g. workers that cannot be scheduled); Ray's default -1 retries for ever."""

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError("workers", self.workers, "must be a positive integer")
        if not _is_finite(self.cpus_per_worker) or self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker", self.cpus_per_worker, "must be a positive number")
        if self.storage_path and not _is_absolute_uri(self.storage_path):
            raise ConfigError("storage_path", self.storage_path, "must be an absolute path or a URI")
        for name in ("max_failures", "controller_failure_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(name, value, "must be an integer >= 0 (bounded retries)")

    @property
    def in_process(self) -> bool:
        """A one-worker trial trains in the Tune trial process: no TorchTrainer, no process group."""
        return self.workers == 1

    @property
    def train_storage(self) -> str:
        """Where the TorchTrainer runs `train-<trial_id>` keep their checkpoints."""
        return _join(self.storage_path, "train")

    def state_path(self, trial_id: str) -> str:
        """Checkpoint file of an in-process trial (stable per trial, so a restarted trial resumes)."""
        return _join(self.storage_path, "state", f"{trial_id}.pt")

    def history_path(self, trial_id: str) -> str:
        """JSON list of the trial's per-epoch metrics, rewritten after every checkpoint (see `results_table`)."""
        return _join(self.storage_path, "history", f"{trial_id}.json")

    def saved_history(self, trial_id: str) -> list[dict[str, Any]]:
        """The metrics history the trial saved with its latest checkpoint ([] if none)."""
        return (_read_json(self.history_path(trial_id)) or []) if self.storage_path else []


def plan_concurrency(
    execution: TrialExecution,
    cluster: Mapping[str, float],
    max_concurrent: int | None = None,
) -> tuple[dict[str, float], int]:
    """Tune resources of one trial and the number of trials that can run at once without starving each other.

    An in-process trial holds its own CPUs. A Train-driver trial holds one `train_driver` unit (0 CPUs: its
    TorchTrainer's workers need the CPUs, and a driver holding one would leave them unschedulable on small
    machines), so concurrency is bounded by the workers' CPUs (and GPUs) -- and by `max_concurrent`.
    Raises `ConfigError` when a single trial does not fit on the cluster at all.
    """
    need_cpu = execution.workers * execution.cpus_per_worker
    have_cpu = float(cluster.get("CPU", 0))
    if need_cpu > have_cpu:
        raise ConfigError(
            "workers", execution.workers,
            f"{execution.workers} worker(s) x {execution.cpus_per_worker:g} CPU = {need_cpu:g} CPUs per trial, "
            f"but the cluster has {have_cpu:g} CPUs",
        )
    fits = int(have_cpu // need_cpu)
    if execution.use_gpu:
        have_gpu = float(cluster.get("GPU", 0))
        if execution.workers > have_gpu:
            raise ConfigError(
                "use_gpu", True, f"{execution.workers} worker(s) need 1 GPU each, but the cluster has {have_gpu:g} GPUs"
            )
        fits = min(fits, int(have_gpu // execution.workers))
    if execution.in_process:
        resources = {"CPU": execution.cpus_per_worker, **({"GPU": 1} if execution.use_gpu else {})}
    else:
        drivers = int(cluster.get(DRIVER_RESOURCE, 0))
        if drivers >= 1:
            resources = {DRIVER_RESOURCE: 1}
            fits = min(fits, drivers)
        else:  # a cluster started without the custom resource: any resource the driver does not really use works
            resources = {"memory": 1}
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ConfigError("max_concurrent_trials", max_concurrent, "must be >= 1")
        fits = min(fits, max_concurrent)
    return resources, max(1, fits)


# ---------------------------------------------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------------------------------------------
def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    driver_slots: int | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    include_dashboard: bool = True,
) -> dict[str, float]:
    """Join a running Ray cluster (`address`, else `RAY_ADDRESS`) or start a local one; return its resources.

    A local cluster gets `driver_slots` (default: its CPU count) units of the `train_driver` resource. Workers
    import `gradalign` from the installed package; on a cluster without it pass
    `runtime_env={"py_modules": [...]}`. Reuses an already initialised Ray (e.g. a test session's).

    The dashboard stays on (bound to localhost) because Ray Train's `PlacementGroupCleaner` needs its State API:
    without it the placement group of a trial that Tune stops (ASHA) outlives the trial and starves every later one
    (ray issue 54305). Every worker process also learns its cluster's address, so the cleaner still finds the right
    cluster when several Ray instances share the host.
    """
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        env = dict(runtime_env or {})
        env.setdefault("worker_process_setup_hook", _address_pinning_hook())
        if address:
            ray.init(address=address, runtime_env=env, logging_level="WARNING")
        else:
            cpus = num_cpus or os.cpu_count() or 1
            ray.init(address="local", num_cpus=cpus, resources={DRIVER_RESOURCE: driver_slots or cpus},
                     include_dashboard=include_dashboard, runtime_env=env, logging_level="WARNING")
    return dict(ray.cluster_resources())


def _address_pinning_hook() -> Callable[[], None]:
    # A nested function is pickled by value, so worker processes need not import this (heavy) module.
    def pin_ray_address() -> None:
        import os

        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)

    return pin_ray_address


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
    objectives: tuple[tuple[str, str], ...] = (("test_accuracy", "max"),)
    """(metric, 'max'|'min') pairs; two or more make a multi-objective study (ASHA then uses the first)."""
    seed: int = 0
    """Seed of Optuna's TPE sampler."""
    asha: bool = False
    """Stop unpromising trials early with ASHA on `epoch`."""
    grace_period: int = 1
    """ASHA: epochs every trial gets before it may be stopped."""
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
        if self.grace_period < 1:
            raise ConfigError("grace_period", self.grace_period, "must be >= 1 epoch")
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


class _StatusOptunaSearch(OptunaSearch):
    """`OptunaSearch` that also records each trial's final status and Tune trial id as Optuna user attrs."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            ot_trial.set_user_attr("status", final_status(result, error))
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(space: SearchSpace, settings: StudySettings) -> Searcher:
    """`OptunaSearch` over `space` with a seeded multivariate TPE; startup trials scale with the budget."""
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
    )


def make_scheduler(settings: StudySettings, max_epochs: int) -> TrialScheduler | None:
    """ASHA on the trainer's own `epoch` counter (Tune's `training_iteration` restarts after a retry)."""
    if not settings.asha:
        return None
    # max_t one past the budget: a trial that reaches its last epoch ends by itself instead of being stopped
    # (killed) by ASHA, which is what can strand a Train run's placement group.
    return ASHAScheduler(
        time_attr="epoch",
        metric=settings.metric,
        mode=settings.mode,
        max_t=max(max_epochs, settings.grace_period) + 1,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


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
    Everything that can be checked is checked before Ray starts (the space) or right after it does (whether one
    trial's workers fit on the cluster), so a bad configuration fails in seconds instead of hanging.
    A study whose experiment folder exists is restored: finished trials stay finished, running and errored ones
    resume from their latest checkpoint, and the searcher continues where it was. Restoring with another search
    space, objective, budget or execution than the study was started with is refused (Tune would silently keep
    the old ones). Callbacks are those the study was started with.
    """
    space.validate()
    for point in settings.initial_points:
        space.check_point(point)
    if execution.storage_path != settings.storage_path:
        execution = dataclasses.replace(execution, storage_path=settings.storage_path)
    restore = tune.Tuner.can_restore(settings.experiment_path)
    fingerprint, fingerprint_path = _fingerprint(space, settings, execution), _join(settings.storage_path, "study.json")
    if restore:
        _check_same_study(settings, _read_json(fingerprint_path), fingerprint)
    resources, concurrency = plan_concurrency(execution, connect(address), settings.max_concurrent_trials)
    fn = tune.with_resources(tune.with_parameters(trainable, execution=execution), resources)

    mirror = OptunaMirror(settings.optuna_storage, settings.name, space, settings.objectives)
    if restore:
        log(f"resuming study {settings.name!r} from {settings.experiment_path}")
        tuner = tune.Tuner.restore(settings.experiment_path, trainable=fn, resume_errored=True)
    else:
        _write_json(fingerprint_path, fingerprint)
        max_epochs = int(space.fixed.get("epochs", TrainConfig.epochs))
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(space, settings),
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
                callbacks=[mirror, *callbacks],
                verbose=settings.verbose,
            ),
        )
    log(f"study {settings.name!r}: {settings.num_samples} trials, {execution.workers} worker(s) x "
        f"{execution.cpus_per_worker:g} CPU each, trial resources {resources}, up to {concurrency} at once")
    return tuner.fit()


def _fingerprint(space: SearchSpace, settings: StudySettings, execution: TrialExecution) -> dict[str, Any]:
    """What a resumed study must share with the study it resumes, flattened to 'space.lr.high'-style keys."""
    what = {
        "space": dataclasses.asdict(space),
        "study": {k: getattr(settings, k) for k in ("objectives", "num_samples", "seed", "asha", "grace_period",
                                                     "reduction_factor", "initial_points")},
        "execution": {k: getattr(execution, k) for k in ("workers", "cpus_per_worker", "use_gpu")},
    }
    return _flatten(json.loads(json.dumps(what, default=repr)))


def _check_same_study(settings: StudySettings, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    if saved is None or saved == now:
        return
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
    raise ConfigError("name", settings.name, f"a study of this name at {settings.storage_path} was started with "
                      f"other settings ({details}); resume it with the same options or choose a new name")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


# ---------------------------------------------------------------------------------------------------------------
# Optuna SQLite mirror (for optuna-dashboard)
# ---------------------------------------------------------------------------------------------------------------
class OptunaMirror(tune.Callback):
    """Copies every finished Tune trial into an Optuna study in SQLite, once (keyed by the Tune trial id).

    Tune's pickled searcher is the source of truth for sampling; this study is a read-only copy for
    optuna-dashboard. Each write is one SQLite transaction made when the trial ends, so a hard kill of the driver
    leaves no RUNNING rows behind, and a restored study that finishes the same trial again does not duplicate it.
    """

    def __init__(self, storage: str, study_name: str, space: SearchSpace, objectives: Sequence[tuple[str, str]]):
        self.storage = storage
        self.study_name = study_name
        self.space = space
        self.objectives = tuple(objectives)
        self._study: optuna.Study | None = None
        self._intermediate: dict[str, dict[int, float]] = {}

    def __getstate__(self) -> dict:  # the SQLite connection does not pickle; Tune pickles callbacks
        return {**self.__dict__, "_study": None}

    def study(self) -> optuna.Study:
        if self._study is None:
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._study = optuna.create_study(
                storage=self.storage,
                study_name=self.study_name,
                directions=["maximize" if mode == "max" else "minimize" for _, mode in self.objectives],
                load_if_exists=True,
            )
            with warnings.catch_warnings():  # set_metric_names is "experimental" (since Optuna 3.2)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._study.set_metric_names([metric for metric, _ in self.objectives])
        return self._study

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "epoch" in result and self.objectives[0][0] in result:
            self._intermediate.setdefault(trial.trial_id, {})[int(result["epoch"])] = float(result[self.objectives[0][0]])

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._add_safely(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._add_safely(trial, error=True)

    def _add_safely(self, trial, error: bool) -> None:
        # The SQLite study is a copy: a failure to write it must not end the study (the final sync retries).
        try:
            self.add(trial.trial_id, trial.config, trial.last_result, error=error)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"could not copy trial {trial.trial_id} to the Optuna study {self.storage}: {exc!r}")

    def known_trial_ids(self) -> set[str]:
        return {t.user_attrs.get("tune_trial_id") for t in self.study().get_trials(deepcopy=False)}

    def add(
        self,
        trial_id: str,
        config: Mapping[str, Any],
        last_result: Mapping[str, Any] | None,
        error: bool,
        intermediate: Mapping[int, float] | None = None,
    ) -> bool:
        """Add one finished trial unless it is already there; returns whether it was added."""
        study = self.study()
        if trial_id in self.known_trial_ids():
            return False
        last_result = last_result or {}
        values = [last_result.get(metric) for metric, _ in self.objectives]
        complete = all(_is_finite(v) for v in values)
        dists = self.space.distributions(str(config.get("algorithm", "gradalign")))
        params = {name: _plain(config[name]) for name in dists if name in config}
        user_attrs = {
            "tune_trial_id": trial_id,
            "status": final_status(last_result, error=error),
            "epoch": int(last_result.get("epoch", 0) or 0),
        }
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL,
                values=[float(v) for v in values] if complete else None,
                params=params,
                distributions={name: dists[name] for name in params},
                user_attrs=user_attrs,
                intermediate_values=dict(intermediate or self._intermediate.get(trial_id, {})),
            )
        )
        return True


def sync_optuna_study(
    table: pd.DataFrame,
    storage: str,
    study_name: str,
    space: SearchSpace,
    objectives: Sequence[tuple[str, str]],
) -> int:
    """Add to the SQLite study every trial of the results table that it lacks (e.g. one that ended while the driver
    was being killed), from the trial's last epoch; returns how many were added."""
    mirror = OptunaMirror(storage, study_name, space, objectives)
    known = mirror.known_trial_ids()
    metric = objectives[0][0]
    added = 0
    for trial_id, rows in table.sort_values("epoch").groupby("trial_id", sort=False):
        if trial_id in known:
            continue
        last = rows.iloc[-1].to_dict()
        intermediate = {int(e): float(v) for e, v in zip(rows["epoch"], rows[metric]) if _is_finite(v)}
        added += mirror.add(trial_id, last, last, error=last.get("trial_status") == "error", intermediate=intermediate)
    return added


# ---------------------------------------------------------------------------------------------------------------
# Results table and provenance
# ---------------------------------------------------------------------------------------------------------------
def results_table(
    results: tune.ResultGrid,
    execution: TrialExecution | None = None,
    prov: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """One tidy frame: a row per trial per reported epoch.

    Columns: trial_id, the TrainConfig fields, the Trainer metrics (`METRICS`), `trial_status` (how the trial
    ended: completed / diverged / stopped / error), workers and cpus_per_worker, and provenance columns (git commit,
    library versions, hardware). A trial that failed before its first epoch gets one row with epoch 0.

    Rows are the results Tune recorded; a restored or retried trial may report an epoch twice (the last report
    wins). Tune writes its records to storage only every ~10 s, so after a hard kill of the driver some epochs
    before the one a trial resumed from can be missing there: given `execution`, those are filled in from the
    history the trial saved with its checkpoint (never beyond the last epoch Tune saw, so the table ends where
    Tune's and Optuna's view of the trial ends).
    """
    frames = []
    for result in results:
        config = TrainConfig.from_dict({k: v for k, v in result.config.items() if k in _TRAIN_CONFIG_FIELDS})
        trial_id = _trial_id(result)
        rows = _reported_epochs(result.metrics_dataframe)
        if execution is not None and not rows.empty:
            rows = _fill_holes(rows, execution.saved_history(trial_id))
        if rows.empty:
            rows = pd.DataFrame([{"epoch": 0, "status": "error" if result.error else "running"}])
        last = rows.iloc[-1].to_dict()
        rows.insert(0, "trial_id", trial_id)
        for name, value in config.to_dict().items():
            rows[name] = value
        rows["trial_status"] = final_status(last, error=result.error is not None)
        frames.append(rows)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial_id", *METRICS])
    if execution is not None:
        table["workers"] = execution.workers
        table["cpus_per_worker"] = execution.cpus_per_worker
    for name, value in (provenance() if prov is None else prov).items():
        table[name] = value
    return table.sort_values(["trial_id", "epoch"], ignore_index=True)


def _trial_id(result: tune.Result) -> str:
    frame = result.metrics_dataframe
    if frame is not None and "trial_id" in frame and len(frame):
        return str(frame["trial_id"].iloc[-1])
    match = re.search(r"_([0-9a-f]{5,})_\d+_", Path(result.path).name)  # <trainable>_<id>_<n>_<params>
    return str((result.metrics or {}).get("trial_id") or (match.group(1) if match else Path(result.path).name))


def _reported_epochs(frame: pd.DataFrame | None) -> pd.DataFrame:
    if frame is None or frame.empty or "epoch" not in frame:
        return pd.DataFrame(columns=list(METRICS))
    rows = frame.dropna(subset=["epoch"])[[c for c in METRICS if c in frame]]
    rows = rows.assign(epoch=rows["epoch"].astype(int))
    return rows.drop_duplicates("epoch", keep="last").sort_values("epoch", ignore_index=True)


def _fill_holes(rows: pd.DataFrame, saved: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    seen, last = set(rows["epoch"]), int(rows["epoch"].max())
    missing = [penalise(m) for m in saved if int(m["epoch"]) <= last and int(m["epoch"]) not in seen]
    if not missing:
        return rows
    extra = pd.DataFrame(missing)[[c for c in METRICS if c in missing[0]]]
    return pd.concat([rows, extra], ignore_index=True).sort_values("epoch", ignore_index=True)


def write_results_table(table: pd.DataFrame, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `results.parquet` and `results.csv` into `out_dir`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parquet, csv = out / "results.parquet", out / "results.csv"
    table.to_parquet(parquet, index=False)
    table.to_csv(csv, index=False)
    return parquet, csv


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
