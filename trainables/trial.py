"""The Tune function trainable: one trial = one GradAlign training run, saved and recorded at every evaluation and
reported to Tune on a schedule (`trainables.report_schedule`: the last evaluation, ASHA's rungs, otherwise every few
seconds).

One worker: the trial trains in its own process (`LocalComm`, no TorchTrainer, no process group: start-up costs
nothing), keeping its state in a stable per-configuration file. More workers: the trial is the Ray Train driver (Ray
2.60's V2 pattern) -- it builds and fits a `TorchTrainer` named after the configuration, whose `TuneReportCallback`
forwards rank 0's reports to Tune; each worker keeps its own state files. Either way the trial's record
(`gradalign.ray_adapter.records`) is keyed by its configuration: a configuration that already finished is answered
from its record without training, and an unfinished one resumes from its latest saved evaluation, whichever Tune trial
runs it (a retry, a restored trial, or a re-suggestion after a restore). A diverged run ends early with finite
penalty metrics and status 'diverged'.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from gradalign.comm import LocalComm
from gradalign.config import TrainConfig
from gradalign.ray_adapter import GROUP_SEEDS, TrialExecution, penalise
from gradalign.ray_adapter._common import COUNTER
from gradalign.ray_adapter.progress import RESUMED_AT
from gradalign.ray_adapter.records import FROM_RECORD, TrialRecords, update_record
from gradalign.seed_group import build_trainer
from trainables.report_schedule import ReportSchedule
from trainables.state import from_bytes, read_if_exists, to_bytes, write_atomic
from trainables.worker import train_loop_per_worker


def gradalign_trainable(config: dict[str, Any], execution: TrialExecution) -> None:
    """Tune function trainable. `config` holds TrainConfig fields; wrap with `tune.with_parameters(..., execution=)`."""
    train_config = TrainConfig.from_dict(config)
    record = TrialRecords(execution).start(config, tune.get_context().get_trial_id())
    if record.finished:  # trained before (the study was restored, or the configuration re-suggested): answer
        tune.report({**record.history[-1], FROM_RECORD: True})
        return
    if execution.in_process:
        train_in_process(
            train_config,
            execution.state_path(record.key),
            tune.report,
            history_path=execution.history_path(record.key),
            threads=max(1, int(execution.cpus_per_worker)),
            schedule=ReportSchedule(execution.report_interval_s, execution.report_rungs),
        )
    else:
        history = fit_torch_trainer(
            train_config,
            execution,
            f"train-{record.key}",
            callbacks=[TuneReportCallback()],
            history_path=execution.history_path(record.key),
        )
        # Report the final metrics once more after fit(): a trial that finished just before a driver crash
        # otherwise keeps a stale last result when the study is restored.
        tune.report(history[-1])


def train_in_process(
    config: TrainConfig,
    state_path: str,
    report: Callable[[dict], None],
    history_path: str | None = None,
    threads: int | None = None,
    schedule: ReportSchedule | None = None,
) -> list[dict]:
    """Train in this process, calling `report(metrics)` after the evaluations `schedule` picks (every one without a
    schedule; always the last); returns the (penalised) metrics history. A config whose extras hold several
    `group_seeds` trains them side by side (`SeedGroup`) and reports their mean.

    After *every* evaluation the state is saved to `state_path` (atomically) and the trial record at `history_path`
    (if given) gets the history and one more training, both before the evaluation is reported: a process stopped
    or killed at any moment loses at most the evaluation interval in flight. The state is loaded from `state_path`
    if present; on resume the restored evaluation is reported again (the previous process may have died before Tune
    recorded it; the results table keeps the last report of each evaluation).
    """
    if threads:
        torch.set_num_threads(threads)
    schedule = schedule or ReportSchedule(0.0)
    trainer = build_trainer(config, config.extras.get(GROUP_SEEDS), comm=LocalComm())
    saved = read_if_exists(state_path)
    if saved is not None:
        trainer.load_state_dict(from_bytes(saved))
        if trainer.history:
            schedule.restored(trainer.history[-1])
            report({**penalise(trainer.history[-1]), RESUMED_AT: trainer.history[-1]["wall_time"]})
    while not trainer.done:
        metrics = penalise(trainer.train_until_eval())
        write_atomic(state_path, to_bytes(trainer.state_dict()))
        if history_path:
            update_record(history_path, [penalise(m) for m in trainer.history], trained_evaluation=metrics[COUNTER])
        if schedule.due(metrics, last=trainer.done):
            report(metrics)
    return [penalise(m) for m in trainer.history]


def fit_torch_trainer(
    config: TrainConfig,
    execution: TrialExecution,
    name: str,
    callbacks: list | None = None,
    history_path: str | None = None,
) -> list[dict]:
    """Fit a `TorchTrainer` of `execution.workers` workers on `config`; returns rank 0's (penalised) metrics history.

    The run is called `name` and kept under `execution.train_storage`; each worker saves its state after every
    evaluation under `execution.worker_state_dir(name)` (`trainables.worker`), so fitting the same name again, or a
    worker-group retry, resumes from the latest evaluation every worker saved. Worker-group and controller retries
    are bounded by `execution`. No Ray Train actor outlives the call (see `_fit_without_leaking_the_controller`).
    """
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "history_path": history_path,
            "state_dir": execution.worker_state_dir(name),
            "report_interval_s": execution.report_interval_s,
            "report_rungs": list(execution.report_rungs),
            GROUP_SEEDS: config.extras.get(GROUP_SEEDS),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=execution.workers,
            use_gpu=execution.use_gpu,
            resources_per_worker={"CPU": execution.cpus_per_worker, **({"GPU": 1} if execution.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=execution.train_storage,
            callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(
                max_failures=execution.max_failures,
                controller_failure_limit=execution.controller_failure_limit,
            ),
        ),
    )
    return _fit_without_leaking_the_controller(trainer).return_value


def _fit_without_leaking_the_controller(trainer: ray.train.torch.TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, then restore the SIGINT handler it installed.

    Called from the main thread, Ray Train 2.60's `fit()` installs a SIGINT handler that holds the handle of its
    `TrainController` actor and never removes it: the controller then stays alive after `fit()` returns, until the
    process exits. Putting the previous handler back drops the last handle, and Ray ends the actor.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # (in a Tune trial: no handler is installed)
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)
