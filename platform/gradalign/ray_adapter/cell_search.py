"""Running many cells in ONE Tune experiment: a searcher, a scheduler and a mirror that route by cell.

Each cell keeps its own Optuna (TPE) searcher, its own ASHA brackets and its own Optuna study in SQLite, exactly as
if it ran alone; running them in one experiment lets trials of different cells share the cluster at once and reuse
trial processes (torch imported once per process, not once per trial), which is most of a small trial's cost.
Every trial's config carries its `cell` key (TrainConfig ignores it; it lands in `extras`).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.callback import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

CELL = "cell"


class _PickledState:
    """Searcher state saved and restored as the pickled attributes (as OptunaSearch does)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


class CellSearch(_PickledState, Searcher):
    """Routes each new trial to the cell with the fewest trials so far, and each result back to its cell's searcher."""

    def __init__(
        self,
        searchers: Mapping[str, Searcher],
        budget: Mapping[str, int],
        metric: str,
        mode: str,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(metric=metric, mode=mode)
        self.extra = dict(extra or {})  # config entries every trial gets (e.g. the seeds it trains)
        self.searchers = dict(searchers)
        self.budget = dict(budget)
        self.issued = {cell: 0 for cell in self.searchers}
        self.owner: dict[str, str] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # every cell's searcher was built with its own space, metric and mode

    def suggest(self, trial_id: str) -> dict | None:
        open_cells = [c for c in self.searchers if self.issued[c] < self.budget[c]]
        if not open_cells:
            return Searcher.FINISHED
        for cell in sorted(open_cells, key=lambda c: self.issued[c]):
            config = self.searchers[cell].suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                continue
            self.issued[cell] += 1
            self.owner[trial_id] = cell
            return {**config, **self.extra, CELL: cell}
        return None  # every open cell is waiting for results: Tune asks again later

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)


class FixedConfigs(_PickledState, Searcher):
    """Hands out a fixed list of configurations, once each (the seed runs of every cell's best configuration)."""

    def __init__(self, configs: Sequence[Mapping[str, Any]], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.configs = [dict(c) for c in configs]
        self.next = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self.next >= len(self.configs):
            return Searcher.FINISHED
        self.next += 1
        return self.configs[self.next - 1]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


class CellScheduler(FIFOScheduler):
    """One early-stopping scheduler (ASHA) per cell: a trial competes only with trials of its own cell."""

    def __init__(self, schedulers: Mapping[str, TrialScheduler]):
        super().__init__()
        self.schedulers = dict(schedulers)

    def _of(self, trial: Trial) -> TrialScheduler | None:
        return self.schedulers.get(trial.config.get(CELL))

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if (s := self._of(trial)) is not None:
            s.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        s = self._of(trial)
        return s.on_trial_result(tune_controller, trial, result) if s is not None else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        if (s := self._of(trial)) is not None:
            s.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        if (s := self._of(trial)) is not None:
            s.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        if (s := self._of(trial)) is not None:
            s.on_trial_error(tune_controller, trial)


class CellMirror(Callback):
    """Forwards each finished trial to its cell's Optuna SQLite mirror (one Optuna study per cell)."""

    def __init__(self, mirrors: Mapping[str, Callback]):
        self.mirrors = dict(mirrors)

    def _of(self, trial: Trial) -> Callback | None:
        return self.mirrors.get(trial.config.get(CELL))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if (m := self._of(trial)) is not None:
            m.on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if (m := self._of(trial)) is not None:
            m.on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if (m := self._of(trial)) is not None:
            m.on_trial_error(iteration, trials, trial, **info)
