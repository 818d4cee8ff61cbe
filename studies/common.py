"""Pieces the study scripts share: concise console progress, the best trial, and Optuna's Plotly figures."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray import tune

from gradalign.ray_adapter import final_status

SHOWN_METRICS = ("val_accuracy", "val_loss", "test_accuracy", "train_loss")


class ProgressPrinter(tune.Callback):
    """One console line per trial result and one per finished trial (instead of Tune's status tables)."""

    def __init__(self, num_samples: int, params: Sequence[str], epochs: float | None = None):
        self.num_samples = num_samples
        self.params = tuple(params)
        self.epochs = epochs
        self.start = time.monotonic()
        self.finished = 0  # including trials finished before a restore

    def __getstate__(self) -> dict:
        return {**self.__dict__, "start": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, start=time.monotonic())

    def _line(self, trial, text: str) -> None:
        print(
            f"[{time.monotonic() - self.start:6.0f}s {self.finished:>3}/{self.num_samples}] "
            f"trial {trial.trial_id} {text}",
            flush=True,
        )

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        done = f"{result.get('epochs', 0):.3g}" + (f"/{self.epochs:g}" if self.epochs else "")
        epoch = f"epochs {done} step {result.get('steps')}"
        metrics = " ".join(f"{k}={_fmt(result[k])}" for k in SHOWN_METRICS if k in result)
        self._line(
            trial, f"{epoch:<24} {metrics} {result.get('status', '')}  [{format_params(trial.config, self.params)}]"
        )

    def _count(self, trials, trial) -> None:
        self.finished = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._count(trials, trial)
        last = trial.last_result or {}
        self._line(
            trial,
            f"finished: {final_status(last)} after {last.get('epochs', float('nan')):.3g} epochs, "
            f"{last.get('steps', '?')} steps",
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._count(trials, trial)
        self._line(trial, f"ERROR (see {trial.path}/error.txt)")


def format_params(config: dict[str, Any], params: Sequence[str]) -> str:
    return " ".join(f"{p}={_fmt(config[p])}" for p in params if p in config)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The last reported evaluation of every trial."""
    return table.sort_values(["trial_id", "evaluation"]).groupby("trial_id", as_index=False).tail(1)


def best_row(table: pd.DataFrame, metric: str, mode: str) -> pd.Series:
    """The trial whose last evaluation is best on `metric` (diverged trials carry penalty values, so never win)."""
    last = final_rows(table)
    last = last[last[metric].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v))]
    if last.empty:
        raise RuntimeError(f"no trial reported a finite {metric}")
    return last.loc[last[metric].idxmax() if mode == "max" else last[metric].idxmin()]


def write_figures(study: optuna.Study, out_dir: str | Path, contour: Sequence[str] = ("lr", "beta")) -> list[Path]:
    """Optuna's optimization history, parameter importances and lr x beta contour as HTML files.

    Each figure is skipped (not failed) when the study cannot support it: importances need two searched
    parameters and two finished trials, the contour needs both of its parameters.
    """
    from optuna import visualization as vis

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    params = sorted({p for t in complete for p in t.params})
    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    # Importance evaluators look at the best (lowest) targets once a target function is given: flip maximised ones.
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    importance_target = (lambda t: sign * t.values[0]) if multi else None
    name = study.metric_names[0] if study.metric_names else "objective"
    figures = {}
    if complete:
        figures["optimization_history"] = lambda: vis.plot_optimization_history(study, target=target, target_name=name)
    if len(params) >= 2 and len(complete) >= 2:
        figures["param_importances"] = lambda: vis.plot_param_importances(
            study, target=importance_target, target_name=name
        )
    if all(p in params for p in contour) and len(complete) >= 2:
        figures["contour_" + "_".join(contour)] = lambda: vis.plot_contour(
            study, params=list(contour), target=target, target_name=name
        )
    if multi and complete:
        figures["pareto_front"] = lambda: vis.plot_pareto_front(study)
    written = []
    for fig_name, make in figures.items():
        path = out / f"{fig_name}.html"
        with warnings.catch_warnings():  # PED-ANOVA warns on any target function; the sign is handled above
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
            figure = make()
        figure.write_html(path, include_plotlyjs="directory")  # one plotly.min.js beside them: works offline
        written.append(path)
    return written
