"""How a trial runs (in process or as a Ray Train driver) and how many run at once. (`connect` moved to
`connection.py`; it is still importable from here.)"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradalign.config import (
    ConfigError,
)

from ._common import DRIVER_RESOURCE, _is_absolute_uri, _is_finite, _join, _read_json
from .connection import connect  # noqa: F401  (re-exported: study.py and older callers import it from here)


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
    report_interval_s: float = 5.0
    """At most one intermediate report to Tune every this many seconds (0: every evaluation). Every evaluation is
    still saved and recorded; the last one, and the first at or past each of `report_rungs`, are always reported
    (`trainables.report_schedule`)."""
    report_rungs: tuple[float, ...] = ()
    """`epochs` at which the scheduler decides (ASHA's rungs; set by the study from its scheduler)."""

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
        if not _is_finite(self.report_interval_s) or self.report_interval_s < 0:
            raise ConfigError("report_interval_s", self.report_interval_s, "must be a number of seconds >= 0")

    @property
    def in_process(self) -> bool:
        """A one-worker trial trains in the Tune trial process: no TorchTrainer, no process group."""
        return self.workers == 1

    @property
    def train_storage(self) -> str:
        """Where the TorchTrainer runs `train-<trial_id>` keep their checkpoints."""
        return _join(self.storage_path, "train")

    def state_path(self, trial_key: str) -> str:
        """Checkpoint file of an in-process trial (stable per trial configuration, so a restarted trial resumes)."""
        return _join(self.storage_path, "state", f"{trial_key}.pt")

    def worker_state_dir(self, run_name: str) -> str:
        """Folder of a Ray Train run's per-worker state files (stable per run name, so a refitted run resumes)."""
        return _join(self.storage_path, "state", run_name)

    def history_path(self, trial_key: str) -> str:
        """The trial's record (its per-evaluation metrics, ...), rewritten after every checkpoint (see `records`)."""
        return _join(self.storage_path, "history", f"{trial_key}.json")

    def saved_history(self, trial_key: str) -> list[dict[str, Any]]:
        """The metrics history the trial saved with its latest checkpoint ([] if none)."""
        saved = _read_json(self.history_path(trial_key)) if self.storage_path else None
        return (saved.get("history") or []) if isinstance(saved, dict) else (saved or [])


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
            "workers",
            execution.workers,
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
