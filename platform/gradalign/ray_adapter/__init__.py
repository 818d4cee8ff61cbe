"""Ray Tune + Optuna plumbing for GradAlign studies: the one module of the library that imports Ray.

What lives here, in the order a study uses it:

1. `SearchSpace` -- an Optuna define-by-run space (a picklable callable object, not a lambda: Tune pickles the
   searcher with the experiment state), conditional on the algorithm; `validate()` refuses bad ranges *before*
   Ray starts, by building a `TrainConfig` at every range endpoint.
2. `TrialExecution` -- how one trial runs (workers, CPUs per worker, where Train runs keep their checkpoints), and
   `plan_concurrency` -- the Tune resources of a trial and how many trials fit at once on the cluster.
3. `connect_ray` / `connect` -- join a running cluster (`address`, `RAY_ADDRESS`, else the latest `ray start` on
   this machine, as `ray.init()` does; bounded: `ClusterUnreachable` after ~30 s) or start a local one with the
   `train_driver` custom resource that Train-driver trials hold instead of a CPU; `RayConnection` says which.
4. `run_study` -- build (or restore) the `Tuner`: seeded TPE via `OptunaSearch`, optional ASHA on `epochs` (examples
   seen / training set), bounded
   retries, and `OptunaMirror`, which copies every finished trial into a SQLite Optuna study for optuna-dashboard.
5. `TrialRecords` -- per trial *configuration*, what it has trained (written by the trainable at every
   evaluation): the ground truth a resumed study reconciles with Tune's older snapshot, so that no finished trial
   runs again.
6. `results_table` -- one tidy frame, a row per trial per reported evaluation, with configuration, metrics and
   `provenance()`; `sync_optuna_study` makes the SQLite study agree with it.

The trainable itself (what a trial runs) lives in the `trainables` package; `run_study` takes it as an argument, so
the library never imports `trainables`.
"""

from __future__ import annotations

from ._common import DRIVER_RESOURCE, GROUP_SEEDS, LOSS_PENALTY, METRICS, final_status, penalise
from .connection import ClusterUnreachable, RayConnection, connect, connect_ray
from .execution import TrialExecution, plan_concurrency
from .mirror import OptunaMirror, sync_optuna_study
from .records import RecordCloser, TrialRecord, TrialRecords, trial_key
from .results import results_table, write_results_table
from .space import Range, SearchSpace
from .study import StudySettings, asha_rungs, flat_settings, make_scheduler, make_searcher, run_study, setting_changes

__all__ = [
    "METRICS",
    "LOSS_PENALTY",
    "DRIVER_RESOURCE",
    "GROUP_SEEDS",
    "Range",
    "SearchSpace",
    "TrialExecution",
    "StudySettings",
    "penalise",
    "final_status",
    "plan_concurrency",
    "connect",
    "connect_ray",
    "RayConnection",
    "ClusterUnreachable",
    "make_searcher",
    "asha_rungs",
    "make_scheduler",
    "OptunaMirror",
    "TrialRecord",
    "TrialRecords",
    "RecordCloser",
    "trial_key",
    "run_study",
    "flat_settings",
    "setting_changes",
    "results_table",
    "write_results_table",
    "sync_optuna_study",
]
