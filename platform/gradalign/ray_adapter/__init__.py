"""Ray Tune + Optuna for GradAlign studies: the one part of the library that imports Ray.

What lives here, in the order a study uses it:

1. `SearchSpace` -- an Optuna define-by-run space (a picklable callable object, not a lambda: Tune pickles the
   searcher with the experiment state), conditional on the algorithm; `validate()` refuses bad ranges *before*
   Ray starts, by building a `TrainConfig` at every range endpoint.
2. `Cell`, `Resources`, `StudyPlan` -- a study's cells (scientific coordinates + search space), where its trials
   run, and its protocol (`gradalign.protocol.StudyProtocol`).
3. `connect_ray` / `connect` -- join a running cluster (`address`, `RAY_ADDRESS`, else the latest `ray start` on
   this machine, as `ray.init()` does; bounded: `ClusterUnreachable` after ~30 s) or start a local one with the
   `train_driver` custom resource that Train-driver trials hold instead of a CPU; `RayConnection` says which.
4. `run_plan` -- the study engine (`engine.py`, the only place a `Tuner` is built): every cell tuned with its own
   seeded TPE searcher (`make_searcher`), optional ASHA on `epochs` (`make_scheduler`), then its chosen
   configuration re-run with fresh seeds; every phase saved as it finishes, resumable after a kill.
5. `TrialExecution` and `plan_concurrency` -- how one trial runs (workers, CPUs per worker, where its state lives)
   and how many run at once on the cluster.
6. `TrialRecords` -- per trial *configuration*, what it has trained (written by the trainable at every
   evaluation): the ground truth a resumed study reconciles with Tune's older snapshot, so that no finished trial
   runs again.
7. `results_table` -- one tidy frame, a row per trial per reported evaluation, with configuration, metrics and
   `provenance()`; `OptunaMirror` / `sync_optuna_study` keep `optuna.db` (for optuna-dashboard) equal to it.

The trainable itself (what a trial runs) lives in the `trainables` package; `run_plan` takes it as an argument, so
the library never imports `trainables`.
"""

from __future__ import annotations

from ._common import DRIVER_RESOURCE, GROUP_SEEDS, LOSS_PENALTY, METRICS, final_status, penalise
from .connection import ClusterUnreachable, RayConnection, connect, connect_ray
from .engine import StudyFailed, best_config, run_plan
from .execution import TrialExecution, plan_concurrency
from .mirror import OptunaMirror, sync_optuna_study
from .plan import Cell, Resources, StudyPlan
from .records import RecordCloser, TrialRecord, TrialRecords, trial_key
from .results import results_table, write_results_table
from .search import asha_rungs, make_scheduler, make_searcher
from .space import Range, SearchSpace

__all__ = [
    "METRICS",
    "LOSS_PENALTY",
    "DRIVER_RESOURCE",
    "GROUP_SEEDS",
    "Range",
    "SearchSpace",
    "Cell",
    "Resources",
    "StudyPlan",
    "TrialExecution",
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
    "run_plan",
    "best_config",
    "StudyFailed",
    "results_table",
    "write_results_table",
    "sync_optuna_study",
]
