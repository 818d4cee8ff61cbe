"""What a running study prints: a line per finished trial, led by its phase's progress (done/total, elapsed and the
time left, estimated by tqdm from the trials finished so far), and a closing tally of what this run trained.

The lines are plain (one per trial, no carriage returns), so they read the same in a terminal, a log file or CI, and
interleave cleanly with whatever Ray prints. Callbacks are pickled with Tune's experiment state and come back in a
restored experiment: the tally therefore lives in this module (one per driver process), not in the callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune
from tqdm import tqdm

from gradalign.config import ALIGNING_ALGORITHMS, FEDERATED_ALGORITHMS

from .records import FROM_RECORD

RESUMED_AT = "resumed_at_wall_time"
"""Set in the report a trial makes when it resumes from saved state: the training time it had already done."""
SHOWN = ("algorithm", "batch_size", "lr", "beta", "momentum", "mu", "local_steps", "server_lr", "seed")


@dataclass
class Tally:
    """What this driver process trained: trials and seconds (trials answered from their records count nothing)."""

    trials: int = 0
    seconds: float = 0.0
    answered: int = 0

    def line(self, wall_s: float, cpus: float) -> str:
        if self.trials == 0:
            if not self.answered:
                return "nothing left to train: every phase of every cell had finished"
            return f"nothing trained in this run ({self.answered} trials answered from their records)"
        share = self.seconds / (wall_s * cpus) if wall_s > 0 and cpus > 0 else math.nan
        answered = f"; {self.answered} more answered from their records" if self.answered else ""
        return (
            f"this run trained {self.trials} trials for {self.seconds:.0f} s in all, in {wall_s:.0f} s on {cpus:g} "
            f"CPUs: {share:.0%} of the CPUs' time went to training{answered}"
        )


TALLY = Tally()


class TrialLine(tune.Callback):
    """One console line per finished trial of a phase: progress, cell, parameters, accuracy, status."""

    def __init__(self, phase: str, total: int):
        self.phase = phase
        self.total = total
        self._setup()

    def _setup(self) -> None:
        self.done = 0
        self.start = time.monotonic()
        self.resumed_at: dict[str, float] = {}

    def __getstate__(self) -> dict:
        return {"phase": self.phase, "total": self.total}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if RESUMED_AT in result:
            self.resumed_at.setdefault(trial.trial_id, float(result[RESUMED_AT]))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "error")

    def _line(self, trial, how: str) -> None:
        self.done += 1
        result = trial.last_result or {}
        if result.get(FROM_RECORD):
            TALLY.answered += 1
            how = f"{result.get('status', how)}, from its record: not trained again"
        else:
            TALLY.trials += 1
            TALLY.seconds += max(0.0, float(result.get("wall_time", 0.0)) - self.resumed_at.get(trial.trial_id, 0.0))
            how = result.get("status", how)
        meter = tqdm.format_meter(
            min(self.done, self.total),
            self.total,
            time.monotonic() - self.start,
            bar_format="{n}/{total} [{elapsed}<{remaining}]",
        )
        val, test = result.get("val_accuracy", math.nan), result.get("test_accuracy", math.nan)
        print(
            f"  {self.phase} {meter} {trial.config.get('cell', '')}: {describe(trial.config)} -> val acc {val:.3f} "
            f"(test {test:.3f}) after {result.get('epochs', 0):.3g} epochs, {result.get('steps', 0)} steps ({how})",
            flush=True,
        )


def describe(config: Mapping[str, Any]) -> str:
    """'lr=0.1 beta=0.01 seed=1000': the parameters of a trial worth showing (β only where it means something)."""
    shown = {k: config[k] for k in SHOWN if k in config and not _missing(config[k])}
    algorithm = shown.pop("algorithm", None)
    if algorithm not in ALIGNING_ALGORITHMS:
        shown.pop("beta", None)
    if algorithm not in FEDERATED_ALGORITHMS:
        shown.pop("local_steps", None), shown.pop("server_lr", None)
    if algorithm != "fedprox":
        shown.pop("mu", None)
    return " ".join(f"{k}={_num(v)}" for k, v in shown.items())


def _num(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
