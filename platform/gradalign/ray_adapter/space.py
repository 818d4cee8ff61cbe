"""The Optuna define-by-run search space over TrainConfig fields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from gradalign.config import (
    ALIGNING_ALGORITHMS,
    FEDERATED_ALGORITHMS,
    ConfigError,
    TrainConfig,
)
from gradalign.tuning import Range  # (defined there: the tuning logic extends ranges without Ray)

from ._common import _TRAIN_CONFIG_FIELDS, GROUP_SEEDS, _is_finite

# ---------------------------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------------------------
# name -> (value type, algorithms that take it; None = all)
_SEARCHABLE: dict[str, tuple[type, tuple[str, ...] | None]] = {
    "lr": (float, None),
    "beta": (float, ALIGNING_ALGORITHMS),
    "momentum": (float, None),
    "weight_decay": (float, None),
    "local_steps": (int, FEDERATED_ALGORITHMS),
    "mu": (float, ("fedprox",)),
    "server_lr": (float, FEDERATED_ALGORITHMS),
}


@dataclass(frozen=True)
class SearchSpace:
    """Optuna define-by-run search space over `TrainConfig` fields, conditional on the algorithm.

    Called with an Optuna trial it suggests the ranged parameters that the trial's algorithm uses and returns the
    fixed ones; `OptunaSearch` merges both into the Tune config. A parameter is either fixed or searched, never both.
    """

    fixed: Mapping[str, Any] = field(default_factory=dict)
    """TrainConfig fields held constant (dataset, model, clients, epochs, seed, ...; and GROUP_SEEDS, the seeds a
    trial trains side by side). `algorithm` goes here too,
    unless `algorithms` lists several to choose from."""
    lr: Range | None = Range(1e-3, 1.0, log=True)
    """Step size (all algorithms)."""
    beta: Range | None = None
    """Alignment coefficient β (gradalign, fedga only)."""
    batch_sizes: tuple[int, ...] = ()
    """Global batch sizes to choose from (categorical); empty means batch_size is fixed."""
    momentum: Range | None = None
    weight_decay: Range | None = None
    local_steps: Range | None = None
    """K, local steps per round (federated algorithms only), sampled as an integer."""
    mu: Range | None = None
    """FedProx proximal coefficient (fedprox only)."""
    server_lr: Range | None = None
    """Server step size on the averaged client update (federated algorithms only)."""
    algorithms: tuple[str, ...] = ()
    """Several algorithms to choose from (categorical); empty means fixed['algorithm'] (default gradalign)."""

    # -- define-by-run ---------------------------------------------------------------------------------------------
    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        if len(self.algorithms) > 1:
            algorithm = trial.suggest_categorical("algorithm", list(self.algorithms))
        else:
            algorithm = self._algorithm_choices()[0]
        for name, rng in self._ranges_for(algorithm).items():
            if _SEARCHABLE[name][0] is int:
                trial.suggest_int(name, int(rng.low), int(rng.high), log=rng.log)
            else:
                trial.suggest_float(name, rng.low, rng.high, log=rng.log)
        if self.batch_sizes:
            trial.suggest_categorical("batch_size", list(self.batch_sizes))
        return {**self.fixed, "algorithm": algorithm}

    def distributions(self, algorithm: str) -> dict[str, optuna.distributions.BaseDistribution]:
        """The Optuna distributions a trial of `algorithm` samples (to rebuild trials in another study)."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        if len(self.algorithms) > 1:
            out["algorithm"] = optuna.distributions.CategoricalDistribution(list(self.algorithms))
        for name, rng in self._ranges_for(algorithm).items():
            if _SEARCHABLE[name][0] is int:
                out[name] = optuna.distributions.IntDistribution(int(rng.low), int(rng.high), log=rng.log)
            else:
                out[name] = optuna.distributions.FloatDistribution(rng.low, rng.high, log=rng.log)
        if self.batch_sizes:
            out["batch_size"] = optuna.distributions.CategoricalDistribution(list(self.batch_sizes))
        return out

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every parameter some trial may sample."""
        names = {n for a in self._algorithm_choices() for n in self.distributions(a)}
        return tuple(sorted(names))

    def _algorithm_choices(self) -> tuple[str, ...]:
        return tuple(self.algorithms) or (str(self.fixed.get("algorithm", "gradalign")),)

    def _ranges_for(self, algorithm: str) -> dict[str, Range]:
        out = {}
        for name, (_, algorithms) in _SEARCHABLE.items():
            rng = getattr(self, name)
            if rng is not None and (algorithms is None or algorithm in algorithms):
                out[name] = rng
        return out

    # -- validation ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ConfigError` (naming field and value) unless every corner of the space is a valid `TrainConfig`."""
        for name, value in self.fixed.items():
            if name not in _TRAIN_CONFIG_FIELDS and name != GROUP_SEEDS:
                raise ConfigError(name, value, "is not a TrainConfig field")
        if self.algorithms and "algorithm" in self.fixed:
            raise ConfigError("algorithm", self.fixed["algorithm"], "is both fixed and searched (algorithms=...)")
        if self.batch_sizes and "batch_size" in self.fixed:
            raise ConfigError("batch_size", self.fixed["batch_size"], "is both fixed and searched (batch_sizes=...)")
        searched = {n: getattr(self, n) for n in _SEARCHABLE if getattr(self, n) is not None}
        for name, rng in searched.items():
            if name in self.fixed:
                raise ConfigError(name, self.fixed[name], f"is both fixed and searched ({name}={rng})")
            self._check_range(name, rng)
            users = _SEARCHABLE[name][1]
            if users is not None and not set(self._algorithm_choices()) & set(users):
                raise ConfigError(
                    name,
                    (rng.low, rng.high),
                    f"only {', '.join(users)} use {name}; algorithm={'/'.join(self._algorithm_choices())}",
                )
        if any(isinstance(b, bool) or not isinstance(b, int) for b in self.batch_sizes):
            raise ConfigError("batch_size", self.batch_sizes, "batch sizes must be integers")
        for config in self._corners():
            TrainConfig.from_dict(config)  # raises ConfigError naming the field and the value

    def check_point(self, point: Mapping[str, Any]) -> None:
        """Raise `ConfigError` unless `point` (e.g. an initial configuration to try) lies inside this space."""
        algorithm = point.get("algorithm", self._algorithm_choices()[0])
        if algorithm not in self._algorithm_choices():
            raise ConfigError("algorithm", algorithm, f"initial point outside algorithms {self._algorithm_choices()}")
        dists = self.distributions(algorithm)
        for name, value in point.items():
            if name not in dists:
                raise ConfigError(
                    name, value, f"initial point sets a parameter that is not searched ({', '.join(dists)})"
                )
            dist = dists[name]
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                inside = value in dist.choices
            else:
                inside = _is_finite(value) and dist.low <= value <= dist.high
            if not inside:
                raise ConfigError(name, value, "initial point outside the search range")
        ranges = self._ranges_for(algorithm)
        batch = point.get("batch_size", self.batch_sizes[0] if self.batch_sizes else self.fixed.get("batch_size", 128))
        TrainConfig.from_dict({**self.fixed, **{n: r.low for n, r in ranges.items()}, "batch_size": batch, **point})

    @staticmethod
    def _check_range(name: str, rng: Range) -> None:
        if not (_is_finite(rng.low) and _is_finite(rng.high)):
            raise ConfigError(name, (rng.low, rng.high), "search range must be finite")
        if not rng.low < rng.high:
            raise ConfigError(name, (rng.low, rng.high), "empty search range: low must be < high")
        if rng.log and rng.low <= 0:
            raise ConfigError(name, rng.low, "a log-uniform range needs low > 0")
        if _SEARCHABLE[name][0] is int and (rng.low != int(rng.low) or rng.high != int(rng.high)):
            raise ConfigError(name, (rng.low, rng.high), "integer parameter needs integer bounds")

    def _corners(self):
        """Configs at the range endpoints: all at `low`, then each parameter alone at `high`, each batch size."""
        for algorithm in self._algorithm_choices():
            ranges = self._ranges_for(algorithm)
            cast = {n: _SEARCHABLE[n][0] for n in ranges}
            base = {**self.fixed, "algorithm": algorithm, **{n: cast[n](r.low) for n, r in ranges.items()}}
            batch_sizes = self.batch_sizes or (base.get("batch_size", TrainConfig.batch_size),)
            for batch_size in batch_sizes:
                yield {**base, "batch_size": batch_size}
            for name, rng in ranges.items():
                yield {**base, "batch_size": batch_sizes[0], name: cast[name](rng.high)}
