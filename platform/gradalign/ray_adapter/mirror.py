"""The Optuna SQLite mirror of a study (for optuna-dashboard), consistent after a hard kill."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray import tune

from ._common import COUNTER, _is_finite, _plain, final_status
from .execution import TrialExecution
from .records import TrialRecords
from .space import SearchSpace


# ---------------------------------------------------------------------------------------------------------------
# Optuna SQLite mirror (for optuna-dashboard)
# ---------------------------------------------------------------------------------------------------------------
class OptunaMirror(tune.Callback):
    """Copies every finished Tune trial into an Optuna study in SQLite, once (keyed by the trial's id).

    Tune's pickled searcher is the source of truth for sampling; this study is a read-only copy for
    optuna-dashboard. Each write is one SQLite transaction made when the trial ends, so a hard kill of the driver
    leaves no RUNNING rows behind. Given the trials' `execution`, a trial's id is the one its record gives
    (`records.TrialRecords`: the first Tune trial that ran its configuration), so a restored study that finishes
    the same trial again, or runs its configuration again under a new Tune trial, does not duplicate it.
    `sync_optuna_study` makes the study agree with the final results table.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        space: SearchSpace,
        objectives: Sequence[tuple[str, str]],
        execution: TrialExecution | None = None,
    ):
        self.storage = storage
        self.study_name = study_name
        self.space = space
        self.objectives = tuple(objectives)
        self.execution = execution
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

    def _id(self, trial) -> str:
        execution = getattr(self, "execution", None)  # (absent in mirrors pickled before records existed)
        if execution is None or not execution.storage_path:
            return trial.trial_id
        return TrialRecords(execution).trial_id_of(trial.config, default=trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if COUNTER in result and self.objectives[0][0] in result:
            self._intermediate.setdefault(self._id(trial), {})[int(result[COUNTER])] = float(
                result[self.objectives[0][0]]
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._add_safely(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._add_safely(trial, error=True)

    def _add_safely(self, trial, error: bool) -> None:
        # The SQLite study is a copy: a failure to write it must not end the study (the final sync retries).
        try:
            self.add(self._id(trial), trial.config, trial.last_result, error=error)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(
                f"could not copy trial {trial.trial_id} to the Optuna study {self.storage}: {exc!r}", stacklevel=2
            )

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
            COUNTER: int(last_result.get(COUNTER, 0) or 0),
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
    """Make the SQLite study hold exactly the trials of the results table, one Optuna trial each.

    A trial of the table that the study lacks (e.g. one that ended while the driver was being killed) is added from
    its last evaluation. If the study holds anything else -- a trial the table does not have, one trial twice, a
    trial that is not finished -- it is rebuilt from the table. Returns how many trials were added.
    """
    mirror = OptunaMirror(storage, study_name, space, objectives)
    ids = [t.user_attrs.get("tune_trial_id") for t in mirror.study().get_trials(deepcopy=False)]
    finished = all(t.state.is_finished() for t in mirror.study().get_trials(deepcopy=False))
    if set(ids) - set(table["trial_id"].astype(str)) or len(ids) != len(set(ids)) or not finished:
        optuna.delete_study(study_name=study_name, storage=storage)
        mirror = OptunaMirror(storage, study_name, space, objectives)
    known = mirror.known_trial_ids()
    metric = objectives[0][0]
    added = 0
    for trial_id, rows in table.sort_values(COUNTER).groupby("trial_id", sort=False):
        if trial_id in known:
            continue
        last = rows.iloc[-1].to_dict()
        intermediate = {int(e): float(v) for e, v in zip(rows[COUNTER], rows[metric]) if _is_finite(v)}
        added += mirror.add(trial_id, last, last, error=last.get("trial_status") == "error", intermediate=intermediate)
    return added
