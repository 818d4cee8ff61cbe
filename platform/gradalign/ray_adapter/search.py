"""The per-cell searcher (Optuna's TPE inside Ray Tune) and scheduler (ASHA), and where ASHA decides."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from gradalign.tuning import warm_start

from ._common import final_status
from .records import TrialRecords
from .space import SearchSpace

REDUCTION_FACTOR = 3
"""ASHA keeps the best 1/REDUCTION_FACTOR of a cell's trials at each rung (a third: like synchronous halving that
keeps a third at its first rung, which measured best on the dense grids, docs/tuning.md)."""

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
    *,
    name: str,
    sampler: optuna.samplers.BaseSampler,
    objectives: Sequence[tuple[str, str]] = (("val_accuracy", "max"),),
    records: TrialRecords | None = None,
    match: Mapping[str, Any] | None = None,
    initial_points: Sequence[Mapping[str, Any]] = (),
) -> Searcher:
    """`OptunaSearch` over `space` with `sampler` (the studies use `gradalign.tuning.make_sampler`: a Sobol design,
    then a Gaussian process).

    Given the study's trial `records` (those whose config holds the entries `match`, e.g. a cell's key), the
    searcher first suggests again the recorded configurations it does not know, e.g. after a restore from Tune's
    older snapshot. `initial_points` are tried first (Optuna enqueues them; the sampler takes over after).
    """
    metrics = [m for m, _ in objectives]
    modes = [m for _, m in objectives]
    single = len(metrics) == 1
    return _StatusOptunaSearch(
        space=space,
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        sampler=sampler,
        study_name=name,
        points_to_evaluate=[dict(p) for p in initial_points] or None,
        records=records,
        match=match,
    )


def warm_start_searcher(searcher: Searcher, space: SearchSpace, runs, protocol) -> int:
    """Add the configurations of `runs` (one row per training run: the searched parameters, `seed`, `status` and
    the objective) that lie inside `space` to `searcher`'s Optuna study as finished trials valued at their mean over
    seeds, so that a search over wider ranges starts from what is known. Returns how many were added."""
    metric = protocol.objective
    frame = runs if protocol.mode == "max" else runs.drop(columns=["status"], errors="ignore")  # (a loss: the penalty)
    algorithm = str(space.fixed.get("algorithm", "gradalign"))
    return warm_start(searcher._ot_study, frame, space.distributions(algorithm), metric)


def make_scheduler(metric: str, mode: str, max_epochs: float, grace_period: float) -> TrialScheduler:
    """ASHA on the trainer's own `epochs` counter (examples seen / training-set size: comparable across batch sizes;
    Tune's `training_iteration` restarts after a retry and counts evaluations, which are log-spaced)."""
    # max_t past the budget: a trial that reaches its last evaluation ends by itself instead of being stopped
    # (killed) by ASHA, which is what can strand a Train run's placement group.
    return ASHAScheduler(
        time_attr="epochs",
        metric=metric,
        mode=mode,
        max_t=_asha_max_t(max_epochs, grace_period),
        grace_period=grace_period,
        reduction_factor=REDUCTION_FACTOR,
    )


def _asha_max_t(max_epochs: float, grace_period: float) -> float:
    return max(max_epochs, grace_period) + 1


def asha_rungs(max_epochs: float, grace_period: float) -> tuple[float, ...]:
    """The `epochs` at which `make_scheduler`'s ASHA decides (its rungs, as Ray's `_Bracket` computes them): trials
    report their first evaluation at or past each (`TrialExecution.report_rungs`)."""
    max_t = _asha_max_t(max_epochs, grace_period)
    count = int(math.log(max_t / grace_period) / math.log(REDUCTION_FACTOR) + 1)
    return tuple(grace_period * REDUCTION_FACTOR**k for k in range(count))
