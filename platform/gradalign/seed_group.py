"""Scoring one configuration on several seeds at once (robust selection in tuning).

A configuration chosen on one seed can sit at the edge of stability: its other seeds then collapse. A tuning trial
can instead train the configuration with a few seeds side by side and report their mean, so that the tuner sees
the instability, at the cost of that many runs per trial. `SeedGroup` has the `Trainer`'s interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .config import TrainConfig
from .training import Trainer

_SHARED = ("evaluation", "epochs", "steps", "rounds", "examples", "communications", "messages", "values_sent")
"""Counters that every seed of a group has in common (the same configuration runs the same schedule)."""


class SeedGroup:
    """`len(seeds)` Trainers of `config` (each with its own seed), advanced to each evaluation together.

    The metrics of an evaluation are the means over the seeds (a NaN or inf of one seed carries over); wall time
    is summed. When one seed diverges the group is diverged and stops: the configuration is unstable, which is
    what the tuner must learn.
    """

    def __init__(self, config: TrainConfig, seeds: Sequence[int], **trainer_kwargs):
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"invalid seeds={list(seeds)!r}: need distinct seeds")
        self.config = config
        self.trainers = [Trainer(config.replace(seed=int(s)), **trainer_kwargs) for s in seeds]
        self.history: list[dict] = []

    @property
    def done(self) -> bool:
        return any(t.done for t in self.trainers)

    @property
    def status(self) -> str:
        statuses = {t.status for t in self.trainers}
        return "diverged" if "diverged" in statuses else statuses.pop() if len(statuses) == 1 else "running"

    def train_until_eval(self) -> dict:
        per_seed = [t.train_until_eval() for t in self.trainers]
        metrics = _mean_metrics(per_seed)
        metrics["status"] = self.status
        self.history.append(metrics)
        return metrics

    def fit(self, callback: Callable[[dict], None] | None = None) -> list[dict]:
        while not self.done:
            metrics = self.train_until_eval()
            if callback is not None:
                callback(metrics)
        return self.history

    def state_dict(self) -> dict:
        return {"seeds": [t.state_dict() for t in self.trainers], "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["seeds"]) != len(self.trainers):
            raise ValueError(f"checkpoint holds {len(state['seeds'])} seeds, this group {len(self.trainers)}")
        for trainer, saved in zip(self.trainers, state["seeds"]):
            trainer.load_state_dict(saved)
        self.history = list(state["history"])


def build_trainer(config: TrainConfig, seeds: Sequence[int] | None = None, **trainer_kwargs) -> Trainer | SeedGroup:
    """A `Trainer` of `config`, or a `SeedGroup` of it when several `seeds` are given."""
    if seeds is not None and len(seeds) > 1:
        return SeedGroup(config, seeds, **trainer_kwargs)
    if seeds:
        config = config.replace(seed=int(seeds[0]))
    return Trainer(config, **trainer_kwargs)


def _mean_metrics(per_seed: list[dict]) -> dict:
    out = {k: per_seed[0][k] for k in _SHARED}
    for key, value in per_seed[0].items():
        if key in _SHARED or key == "status" or not isinstance(value, (int, float)):
            continue
        values = [m[key] for m in per_seed]
        out[key] = sum(values) if key == "wall_time" else sum(values) / len(values)
    return out
