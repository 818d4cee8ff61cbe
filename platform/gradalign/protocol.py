"""What a study is, in one frozen, validated record: the protocol that made its numbers.

A study script merges its presets and the options the user typed into one `StudyProtocol`: the scientific axes,
the nuisance parameters re-tuned in every cell and their ranges, what is fixed, the budget of every run, the splits
and their sizes, the seeds, the tuning settings, the target and the tolerance. The protocol is written into the
study folder (`study.json`), compared when the study is resumed, and read back by `--report-only`: the report and
the verdict read the protocol, never the command line, so a rebuilt report states the protocol of the run that made
the data. Where a study runs (cluster, CPUs, storage) is not part of it.

Pure: no Ray, no Optuna, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError
from .ranges import Range
from .sequential import SequentialDesign
from .tuning import Recipe

__all__ = ["KINDS", "OBJECTIVE_METRICS", "SEED_BASE", "Budget", "Comparisons", "StudyProtocol"]

KINDS = ("batch-scaling", "federated", "tune")
"""The kinds of study; a study folder holds one kind, and a script of another kind refuses it."""

SEED_BASE = 1000
"""The final runs' seeds are SEED_BASE, SEED_BASE + 1, ...; tuning trials use 0, 1, ...: never the same run."""

OBJECTIVE_METRICS = ("val_accuracy", "val_loss", "wall_time")
"""What tuning may optimise: the validation split (or the cost, as a second objective), never the test split."""

BUDGET_UNITS = ("examples", "steps", "communications")


@dataclass(frozen=True)
class Budget:
    """The budget of every run of a study: the same `amount` of `unit` in every cell."""

    unit: str
    """'examples' (training examples seen), 'steps' (parameter updates) or 'communications' (all-reduces)."""
    amount: int
    """Per run, in `unit` (for 'examples': the same number in every cell)."""
    epochs: float
    """The largest number of passes over the training split a run makes (where ASHA puts its rungs)."""
    detail: str = ""
    """The budget in words, with the steps it means at the smallest and largest batch (written by the study)."""

    def __post_init__(self) -> None:
        if self.unit not in BUDGET_UNITS:
            raise ConfigError("budget", self.unit, f"unit must be one of {', '.join(BUDGET_UNITS)}")
        if isinstance(self.amount, bool) or not isinstance(self.amount, int) or self.amount < 1:
            raise ConfigError(self.unit, self.amount, "the budget must be a positive whole number")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ConfigError("epochs", self.epochs, "must be a positive finite number")

    def sentence(self) -> str:
        return self.detail or f"{self.amount} {self.unit} per run"


@dataclass(frozen=True)
class Comparisons:
    """What the verdict compares (and what decides whether a sequential study adds seeds): each pair (a, b) at every
    value of `x`, and every algorithm against `reference`, within each value of `within`."""

    x: str = "batch_size"
    """The scientific axis the comparisons run along (the batch size; the federated study's setting)."""
    pairs: tuple[tuple[str, str], ...] = ()
    reference: str | None = None
    """Compared with every other algorithm at every x (e.g. small-batch SGD, which runs at one batch size)."""
    within: str | None = None
    """Compare only cells that share this column's value (the federated study's client split)."""
    cost: str = "steps_to_target"
    """The cost to the target also compared (steps; communications in a federated study)."""


@dataclass(frozen=True)
class StudyProtocol:
    """A study, as the scientist would write it down. Frozen and validated: a bad value raises `ConfigError`
    naming the field (the study scripts name the option that set it)."""

    kind: str
    """One of KINDS."""
    name: str
    """The study's name (its folder's default name, its Optuna studies' prefix)."""
    dataset: str
    model: str
    budget: Budget
    split_sizes: Mapping[str, int]
    """Examples in the 'train', 'val' and 'test' splits (the training split is what one epoch is)."""
    axes: Mapping[str, Any] = field(default_factory=dict)
    """The scientific axes, as given (e.g. batch_sizes, algorithms, micro_batch, workers)."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """TrainConfig fields held constant in every cell (momentum, schedule, ...)."""
    ranges: Mapping[str, Mapping[str, Range]] = field(default_factory=dict)
    """Per algorithm, the nuisance parameters re-tuned in every cell of it and their search ranges."""
    trials_per_cell: int = 8
    tuning_seeds: tuple[int, ...] = (0,)
    """Seeds every tuning trial trains side by side (scored by their mean)."""
    seeds: tuple[int, ...] = (SEED_BASE, SEED_BASE + 1, SEED_BASE + 2)
    """Seeds the final runs of each cell's chosen configuration may use, in this order: disjoint from the tuning
    seeds. With `seed_looks`, a cell runs the first `seed_looks[0]`, then more only while a comparison it is in is
    undetermined; otherwise it runs them all."""
    seed_looks: tuple[int, ...] = ()
    """Seeds per cell at which a sequential study looks at its comparisons (e.g. 3, 5, 8; the last is the cap and
    equals len(seeds)); () for a fixed number of seeds (`--seeds N`). See `gradalign.sequential`."""
    compare: Comparisons = field(default_factory=Comparisons)
    tuning: Mapping[str, Any] = field(default_factory=dict)
    """How each cell is tuned beyond its trials and seeds: `gradalign.tuning.Recipe` fields (sampler start-up,
    range extensions, confirmation); {} takes the recipe's defaults (the measured ones, docs/tuning.md)."""
    objectives: tuple[tuple[str, str], ...] = (("val_accuracy", "max"),)
    """(metric, 'max'|'min') pairs at a trial's last evaluation; the first chooses each cell's configuration."""
    sampler_seed: int = 0
    asha: bool = False
    grace_period: float = 1.0
    """ASHA: epochs' worth of examples every trial gets before it may be stopped."""
    target: float = 0.6
    """Validation accuracy whose first crossing gives the cost to the target (steps, examples, communications)."""
    tolerance: float = 0.01
    """What 'within' means in the verdict: a difference in test accuracy (0.01 = one percentage point)."""
    val_fraction: float = 0.1
    eval_points: int = 40
    num_samples: int | None = None
    notes: Mapping[str, str] = field(default_factory=dict)
    """Further protocol facts the report states as they are (e.g. 'micro-batch b': '32')."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("kind", self.kind, f"must be one of {', '.join(KINDS)}")
        if not self.name or "/" in self.name:
            raise ConfigError("name", self.name, "must be a non-empty name without '/'")
        for key in ("train", "val", "test"):
            if not isinstance(self.split_sizes.get(key), int) or self.split_sizes[key] < 0:
                raise ConfigError("split_sizes", dict(self.split_sizes), f"needs a size for the {key!r} split")
        _positive_int("trials_per_cell", self.trials_per_cell, "each cell needs at least one tuning trial")
        _positive_int("eval_points", self.eval_points, "a run needs at least one evaluation")
        if not self.tuning_seeds:
            raise ConfigError("tuning_seeds", len(self.tuning_seeds), "must be >= 1")
        if not self.seeds:
            raise ConfigError("seeds", len(self.seeds), "the chosen configuration of each cell needs a seed run")
        if set(self.seeds) & set(self.tuning_seeds):
            raise ConfigError(
                "seeds",
                self.seeds,
                f"must be disjoint from the tuning seeds {self.tuning_seeds}: a final run "
                "must not repeat a tuning trial",
            )
        if self.seed_looks:
            if self.seed_looks[-1] != len(self.seeds):
                raise ConfigError("max_seeds", len(self.seeds), f"the last look {self.seed_looks} must use every seed")
            try:
                SequentialDesign(looks=tuple(self.seed_looks))
            except ValueError as err:
                raise ConfigError("max_seeds", self.seed_looks[-1], str(err)) from None
        try:
            self.recipe  # noqa: B018 -- builds and validates the tuning recipe
        except (TypeError, ValueError) as err:
            raise ConfigError("tuning", dict(self.tuning), str(err)) from None
        if not self.objectives:
            raise ConfigError("metric", self.objectives, "need at least one objective")
        for metric, mode in self.objectives:
            if metric not in OBJECTIVE_METRICS:
                raise ConfigError(
                    "metric", metric, f"tuning reads the validation split only: one of {', '.join(OBJECTIVE_METRICS)}"
                )
            if mode not in ("max", "min"):
                raise ConfigError("mode", mode, "must be 'max' or 'min'")
        if not (isinstance(self.target, (int, float)) and 0 < self.target <= 1):
            raise ConfigError("target", self.target, "target accuracy must lie in (0, 1]")
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ConfigError("tolerance", self.tolerance, "must be a finite accuracy difference >= 0 (0.01 = 1 point)")
        if self.tolerance >= 1:
            raise ConfigError("tolerance", self.tolerance, "is a fraction of accuracy: 0.01 is one percentage point")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ConfigError("val_fraction", self.val_fraction, "must lie in (0, 1): tuning needs a validation split")
        if not (math.isfinite(self.grace_period) and self.grace_period > 0):
            raise ConfigError("grace_period", self.grace_period, "must be a positive number of epochs")
        for ranges in self.ranges.values():
            for param, rng in ranges.items():
                rng.check(param)

    # -- what the report states -------------------------------------------------------------------------------------
    @property
    def objective(self) -> str:
        return self.objectives[0][0]

    @property
    def mode(self) -> str:
        return self.objectives[0][1]

    @property
    def recipe(self) -> Recipe:
        """The tuning recipe of every cell: the protocol's trials and tuning seeds, and `tuning`'s settings."""
        settings = dict(self.tuning)
        if self.asha:  # successive halving searches a space-filling design: the model only proposes after it
            settings["startup"] = max(settings.get("startup", 0), self.trials_per_cell)
        return Recipe(trials=self.trials_per_cell, search_seeds=len(self.tuning_seeds), **settings)

    @property
    def confirm_seeds(self) -> tuple[int, ...]:
        """Seeds of the confirmation runs: after the tuning seeds, before the final seeds (never one of those)."""
        first = max(self.tuning_seeds) + 1
        return tuple(range(first, first + self.recipe.confirm_seeds))

    @property
    def design(self) -> SequentialDesign:
        """When the study looks at its comparisons: the sequential looks, or one look at every seed (95%)."""
        return (
            SequentialDesign(looks=tuple(self.seed_looks))
            if self.seed_looks
            else SequentialDesign.fixed(len(self.seeds))
        )

    @property
    def sequential(self) -> bool:
        return len(self.design.looks) > 1

    @property
    def test_size(self) -> int:
        return int(self.split_sizes["test"])

    def search_ranges(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Per algorithm, {param: (low, high)}: what the edge warnings and the tuning figures read."""
        return {a: {p: (r.low, r.high) for p, r in ranges.items()} for a, ranges in self.ranges.items()}

    def tuning_sentence(self) -> str:
        """How every cell was tuned, in words."""
        recipe = self.recipe
        scored = f" (each the mean of {len(self.tuning_seeds)} seeds)" if len(self.tuning_seeds) > 1 else ""
        what = "validation accuracy" if self.objective == "val_accuracy" else self.objective.replace("_", " ")
        model = {"gp": "a Gaussian process", "tpe": "TPE"}[recipe.model]
        if self.asha:
            text = (
                f"{self.trials_per_cell} trials{scored} from a Sobol design, all but the best third stopped at each "
                f"rung of successive halving (ASHA, from {self.grace_period:.3g} epochs, rungs 3 times apart), scored "
                f"by {what} at the end of the budget"
            )
        else:
            text = (
                f"{self.trials_per_cell} trials{scored} scored by {what} at the end of the budget, the first "
                f"{min(recipe.startup, self.trials_per_cell)} from a Sobol design, then {model}"
            )
        if recipe.max_extensions:
            text += (
                f"; a range whose best value lies within {100 * recipe.edge:g}% of a bound is extended by "
                f"{100 * recipe.extend_by:g}% of its width (at most {_times(recipe.max_extensions)} per side) and "
                f"searched {recipe.extension_trials} more trials"
            )
        if recipe.confirm_top and recipe.confirm_seeds:
            text += (
                f"; the {recipe.confirm_top} best configurations that ran the whole budget re-run on "
                f"{recipe.confirm_seeds} more seed{'s' if recipe.confirm_seeds != 1 else ''} and the best mean chosen "
                "among those whose seeds did not collapse"
            )
        return text

    def seeds_sentence(self) -> str:
        if self.sequential:
            how = (
                f"seeds added in rounds while a comparison is undetermined ({self.design.describe()}; seeds "
                f"{_seed_list(self.seeds)})"
            )
        else:
            how = f"{len(self.seeds)} seeds per cell's chosen configuration ({_seed_list(self.seeds)})"
        return (
            f"{how}, disjoint from the tuning seeds ({_seed_list(self.tuning_seeds)}); their test accuracy is reported"
        )

    def description(self) -> dict[str, str]:
        """The protocol as the report's table of it: label -> text."""
        sizes = self.split_sizes
        out = {
            "study": f"{self.kind} study {self.name!r}: {self.dataset} / {self.model}",
            "budget": self.budget.sentence(),
            "tuning": self.tuning_sentence(),
            "final runs": self.seeds_sentence(),
            "splits": f"{sizes['train']} training, {sizes['val']} validation ({self.val_fraction:g} of the training "
            f"data, stratified, the same for every seed), {sizes['test']} test examples",
            "target": f"validation accuracy {self.target:g} (the cost to it interpolated between evaluations)",
            "tolerance": f"{100 * self.tolerance:g} points of test accuracy",
            "evaluations": f"{self.eval_points} per run, log-spaced in steps",
        }
        for algorithm, ranges in sorted(self.ranges.items()):
            if ranges:
                out[f"searched for {algorithm}"] = ", ".join(f"{p} in {r}" for p, r in sorted(ranges.items()))
        if self.fixed:
            out["fixed"] = ", ".join(f"{k}={_show(v)}" for k, v in sorted(self.fixed.items()))
        out.update({k: str(v) for k, v in self.notes.items()})
        return out

    # -- study.json -------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists, ranges as dicts); `from_json(to_json())` gives an equal protocol."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "budget":
                value = dataclasses.asdict(value)
            elif f.name == "compare":
                value = dataclasses.asdict(value)
            elif f.name == "ranges":
                value = {a: {p: r.to_json() for p, r in rs.items()} for a, rs in value.items()}
            out[f.name] = value
        return json.loads(json.dumps(out, default=_json_default))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudyProtocol:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("protocol", sorted(unknown), "unknown fields (a study.json of a newer version?)")
        values = dict(data)
        values["budget"] = Budget(**data["budget"])
        values["ranges"] = {a: {p: Range.from_json(r) for p, r in rs.items()} for a, rs in data["ranges"].items()}
        values["split_sizes"] = {k: int(v) for k, v in data["split_sizes"].items()}
        for name in ("tuning_seeds", "seeds", "seed_looks"):
            values[name] = tuple(int(s) for s in data.get(name, ()))
        spec = dict(data.get("compare") or {})
        spec["pairs"] = tuple(tuple(pair) for pair in spec.get("pairs", ()))
        values["compare"] = Comparisons(**spec)
        values["objectives"] = tuple((str(m), str(d)) for m, d in data["objectives"])
        return cls(**values)

    def changes_from(self, saved: StudyProtocol) -> list[str]:
        """'field: old -> new' for each protocol field that differs from `saved` (JSON equality: NaN equals NaN)."""
        old, new = _flat(saved.to_json()), _flat(self.to_json())
        keys = sorted(k for k in old.keys() | new.keys() if _canonical(old.get(k)) != _canonical(new.get(k)))
        return [f"{k}: {_show(old.get(k))} -> {_show(new.get(k))}" for k in keys]


def _positive_int(name: str, value: Any, reason: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, reason)


def _seed_list(seeds: tuple[int, ...]) -> str:
    seeds = tuple(sorted(seeds))
    if len(seeds) > 2 and seeds == tuple(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    if isinstance(value, Range):
        return value.to_json()
    return repr(value)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")
