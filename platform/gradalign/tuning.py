"""Per-cell tuning: a search that uses a small budget, ranges that adapt, and a choice that survives more seeds.

Pure functions over plain data (Optuna and pandas; no Ray, no torch), so that an engine running Ray Tune +
`OptunaSearch` and a replay of a dense grid (`benchmarks/tuning_strategies.py`) run the same logic. A cell is tuned
in three phases (`Recipe` holds the numbers, measured in docs/tuning.md):

1. **Search**: `Recipe.trials` trials of one seed each, sampled by `make_sampler`: a scrambled Sobol design for the
   first `Recipe.startup` trials (every quarter of every range gets a point: no cluster of random draws in the
   useless corner of a log-uniform range), then a model-based sampler (multivariate TPE) fitted to all of them.
2. **Ranges that adapt**: when the best configuration sits within `Recipe.edge` of a bound of a range (as a fraction
   of the range's width, in log space for log ranges), `extend_ranges` moves that bound out by `Recipe.extend_by`
   of the original width, at most `Recipe.max_extensions` times per side; a new Optuna study over the wider ranges,
   `warm_start`-ed with every trial so far, runs `Recipe.extension_trials` more trials. Repeat while the best is at
   an edge and a bound can still move.
3. **Confirmation**: the `Recipe.confirm_top` best configurations (`confirmation_candidates`) are trained on
   `Recipe.confirm_seeds` more seeds each; `choose` takes the best mean among the candidates whose seeds did not
   collapse (no seed diverged, none more than `Recipe.collapse_gap` below the candidate's best seed); if all
   collapsed, the best configuration not confirmed whose seeds did not collapse.

The data: `trials` is a pandas frame with one row per training run: a column per searched parameter, `seed`, the
objective (`metric`, default `val_accuracy`, higher is better) and optionally `status` ('diverged' scores 0).
A configuration is a distinct tuple of parameter values; its score is the mean over its seed runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from .ranges import Range

__all__ = [
    "RECIPE",
    "Range",
    "Recipe",
    "StartThenModelSampler",
    "Tuned",
    "at_edge",
    "choose",
    "config_table",
    "confirmation_candidates",
    "distributions",
    "extend_ranges",
    "make_sampler",
    "tune_cell",
    "warm_start",
]


@dataclass(frozen=True)
class Recipe:
    """How one cell is tuned; the defaults are the recipe chosen by measurement (docs/tuning.md)."""

    trials: int = 10
    """Search trials (phase 1)."""
    search_seeds: int = 1
    """Seed runs per search trial (the trial's value is their mean); every search trial uses the same seeds."""
    startup: int = 4
    """Of the search trials, the first ones from a scrambled Sobol design; the model-based sampler takes the rest."""
    model: str = "gp"
    """Model-based sampler after the startup: 'gp' (Optuna's Gaussian process) or 'tpe' (multivariate TPE)."""
    edge: float = 0.1
    """The best configuration is at an edge when within this fraction of the range's width of a bound."""
    extend_by: float = 0.25
    """An extension moves the bound out by this fraction of the original width (log width for log ranges)."""
    max_extensions: int = 2
    """Extensions per parameter and side at most (0: ranges never move)."""
    extension_trials: int = 3
    """Search trials after each extension."""
    confirm_top: int = 3
    """Configurations re-scored in the confirmation phase (0: none)."""
    confirm_seeds: int = 2
    """Extra seeds for each of them (seeds no search trial used)."""
    collapse_gap: float = 0.15
    """A candidate with a seed more than this below its best seed (or a diverged seed) does not win."""
    choice: str = "stable"
    """'stable': `choose` (collapsed candidates refused); 'mean': the best mean, as studies chose before."""

    def __post_init__(self) -> None:
        for name in ("trials", "search_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: must be >= 1")
        for name in ("startup", "max_extensions", "extension_trials", "confirm_top", "confirm_seeds"):
            if getattr(self, name) < 0:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: must be >= 0")
        if self.model not in ("tpe", "gp"):
            raise ValueError(f"invalid model={self.model!r}: must be 'tpe' or 'gp'")
        if self.choice not in ("stable", "mean"):
            raise ValueError(f"invalid choice={self.choice!r}: must be 'stable' or 'mean'")
        if not 0 <= self.edge < 0.5:
            raise ValueError(f"invalid edge={self.edge!r}: must lie in [0, 0.5)")
        if not self.extend_by > 0:
            raise ValueError(f"invalid extend_by={self.extend_by!r}: must be > 0")
        if not self.collapse_gap > 0:
            raise ValueError(f"invalid collapse_gap={self.collapse_gap!r}: must be > 0")

    def cost(self, extensions: int = 0) -> int:
        """Training runs of one cell: search, `extensions` extension rounds, confirmation (the final seeds aside)."""
        search = self.trials + extensions * self.extension_trials
        return self.search_seeds * search + self.confirm_top * self.confirm_seeds

    @property
    def seeds_needed(self) -> int:
        """Distinct seeds a cell's tuning uses: the search seeds, then the confirmation seeds."""
        return self.search_seeds + self.confirm_seeds


RECIPE = Recipe()
"""The recipe the studies use: 10 + 3 x 2 = 16 runs per cell (+ 3 per range extension, at most 4 extensions)."""


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: the sampler
# ---------------------------------------------------------------------------------------------------------------
class StartThenModelSampler(BaseSampler):
    """Trials 0 .. `startup`-1 from a scrambled Sobol design over the unit cube (a coordinate per parameter, in
    the order `names` gives or, without it, in the order the parameters are first suggested), the rest from
    `model`. Trial numbers count warm-started trials too: a study warm-started with `startup` or more trials is
    model-based from its first new trial. Sobol points are mapped like Optuna maps its own (log ranges in log
    space; integers rounded; categoricals by equal shares)."""

    _DIMENSIONS = 16

    def __init__(self, model: BaseSampler, startup: int, seed: int | None = None, names: Sequence[str] = ()):
        from scipy.stats import qmc

        self._model = model
        self._startup = int(startup)
        self._names: list[str] = list(names)
        engine = qmc.Sobol(self._DIMENSIONS, scramble=True, seed=seed)
        self._design = engine.random(max(1, 2 ** math.ceil(math.log2(max(self._startup, 1)))))

    def _in_startup(self, trial: FrozenTrial) -> bool:
        return trial.number < self._startup

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {} if self._in_startup(trial) else self._model.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {} if self._in_startup(trial) else self._model.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if not self._in_startup(trial):
            return self._model.sample_independent(study, trial, param_name, param_distribution)
        if param_name not in self._names:
            self._names.append(param_name)
        u = self._design[trial.number, self._names.index(param_name) % self._DIMENSIONS]
        return _from_unit(u, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._model.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._model.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._model.reseed_rng()


def _from_unit(u: float, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    if dist.log:
        value = math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low)))
    else:
        value = dist.low + u * (dist.high - dist.low)
    if isinstance(dist, IntDistribution):
        return int(min(max(round(value), dist.low), dist.high))
    return float(min(max(value, dist.low), dist.high))


def make_sampler(recipe: Recipe = RECIPE, seed: int | None = None, names: Sequence[str] = ()) -> BaseSampler:
    """The sampler of phase 1 (what `OptunaSearch(sampler=...)` gets): `recipe.startup` Sobol trials, then
    multivariate TPE (or a Gaussian process) over every trial so far. `names`: the searched parameters in a fixed
    order (e.g. `SearchSpace.param_names`), so that a restored sampler gives each the same Sobol coordinate."""
    if recipe.model == "gp":
        model: BaseSampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=0, warn_independent_sampling=False)
    else:
        model = TPESampler(multivariate=True, n_startup_trials=0, seed=seed, constant_liar=True)
    return StartThenModelSampler(model, recipe.startup, seed=seed, names=names)


def distributions(ranges: Mapping[str, Range]) -> dict[str, FloatDistribution]:
    """Optuna distributions of float ranges (for `warm_start` and for an Optuna study run without Tune)."""
    return {name: FloatDistribution(r.low, r.high, log=r.log) for name, r in ranges.items()}


# ---------------------------------------------------------------------------------------------------------------
# Configurations and their seeds
# ---------------------------------------------------------------------------------------------------------------
def config_table(
    trials: pd.DataFrame, params: Sequence[str], metric: str = "val_accuracy", collapse_gap: float = 0.15
) -> pd.DataFrame:
    """Per configuration (distinct values of `params`): n (distinct seeds run: a configuration that a searcher
    proposed again on the same seed counts that run once), mean, min, median, max, std of `metric` (a diverged run,
    or a missing value, counts 0), diverged (count), collapsed (a seed diverged or lies more than `collapse_gap`
    below the configuration's best seed), sorted by mean, best first."""
    if trials.empty:
        return pd.DataFrame(columns=[*params, "n", "mean", "min", "median", "max", "std", "diverged", "collapsed"])
    diverged = trials["status"].eq("diverged") if "status" in trials else pd.Series(False, index=trials.index)
    score = trials[metric].where(~diverged).fillna(0.0).astype(float)
    frame = trials[list(params)].assign(_score=score, _diverged=diverged)
    if "seed" in trials:  # a configuration proposed again on the same seed is the same run: it counts once
        frame = frame.assign(_seed=trials["seed"]).drop_duplicates([*params, "_seed"]).drop(columns="_seed")
    grouped = frame.groupby(list(params), dropna=False, sort=False)
    table = grouped["_score"].agg(n="size", mean="mean", min="min", median="median", max="max", std="std")
    table["diverged"] = grouped["_diverged"].sum().astype(int)
    table["collapsed"] = (table["diverged"] > 0) | (table["min"] < table["max"] - collapse_gap)
    return (
        table.reset_index().sort_values(["mean", "n"], ascending=[False, False], kind="stable").reset_index(drop=True)
    )


def confirmation_candidates(
    trials: pd.DataFrame, params: Sequence[str], top_k: int = 3, metric: str = "val_accuracy"
) -> pd.DataFrame:
    """The `top_k` configurations with the highest mean `metric` (ties: more seeds first), to be trained on more
    seeds; one row each (params, n, mean). Configurations with every seed diverged are never candidates."""
    table = config_table(trials, params, metric)
    table = table[table["diverged"] < table["n"]]
    return table.head(top_k)[[*params, "n", "mean"]].reset_index(drop=True)


def choose(
    trials: pd.DataFrame, params: Sequence[str], metric: str = "val_accuracy", collapse_gap: float = 0.15
) -> tuple[pd.Series, pd.DataFrame]:
    """The stability-aware final choice among the configurations with the most seed runs (the confirmed ones).

    A candidate whose seeds collapsed (one diverged, or one more than `collapse_gap` below its best seed) is
    refused; the best mean of the others wins. If every candidate collapsed (a cell at the edge of stability
    everywhere near its best search runs), the best configuration that ran fewer seeds and none of them collapsed
    wins, or, if there is none, the best mean; `reason` says which. Returns the chosen row (params, n, mean, min,
    median, max, std, diverged, collapsed, reason) and the candidates' table with a `refused` column.
    """
    table = config_table(trials, params, metric, collapse_gap)
    if table.empty:
        raise ValueError("no trials to choose from")
    candidates = table[table["n"] == table["n"].max()].copy()
    candidates["refused"] = np.where(
        candidates["diverged"] > 0,
        "a seed diverged",
        np.where(candidates["collapsed"], f"a seed fell more than {collapse_gap:g} below the best seed", ""),
    )
    stable = candidates[candidates["refused"] == ""]
    unconfirmed = table[(table["n"] < table["n"].max()) & ~table["collapsed"]]
    if len(stable):
        chosen = stable.iloc[0].copy()
        chosen["reason"] = f"best mean of {len(stable)} stable candidate(s) on {int(chosen['n'])} seeds"
    elif len(unconfirmed):
        chosen = unconfirmed.iloc[0].copy()
        chosen["reason"] = (
            f"every candidate collapsed: the best configuration with no collapsed seed, on {int(chosen['n'])} seed(s)"
        )
    else:
        chosen = candidates.iloc[0].copy()
        chosen["reason"] = f"every candidate collapsed: the best mean of {len(candidates)}"
    return chosen.drop("refused", errors="ignore"), candidates.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: ranges that adapt
# ---------------------------------------------------------------------------------------------------------------
def _position(value: float, rng: Range) -> float:
    """Where `value` lies in `rng`: 0 at low, 1 at high (log space for log ranges)."""
    if rng.log:
        return (math.log(value) - math.log(rng.low)) / (math.log(rng.high) - math.log(rng.low))
    return (value - rng.low) / (rng.high - rng.low)


def at_edge(
    trials: pd.DataFrame, ranges: Mapping[str, Range], metric: str = "val_accuracy", edge: float = 0.1
) -> dict[str, str]:
    """{parameter: 'low' | 'high'} for each parameter of `ranges` whose value in the best configuration (highest
    mean `metric`) lies within `edge` of that bound (as a fraction of the range's width); {} when none does."""
    params = list(ranges)
    table = config_table(trials, params, metric)
    if table.empty:
        return {}
    best = table.iloc[0]
    out = {}
    for name, rng in ranges.items():
        position = _position(float(best[name]), rng)
        if position <= edge:
            out[name] = "low"
        elif position >= 1 - edge:
            out[name] = "high"
    return out


def extend_ranges(
    ranges: Mapping[str, Range],
    edges: Mapping[str, str],
    original: Mapping[str, Range],
    extend_by: float = 0.25,
    max_extensions: int = 2,
    limits: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, Range]:
    """`ranges` with each bound named in `edges` ({parameter: 'low' | 'high'}, as `at_edge` gives) moved out by
    `extend_by` of the `original` range's width (log width for log ranges), unless that bound has moved
    `max_extensions` times already; a bound never passes `limits[name]` (e.g. momentum < 1). Returns a new dict;
    equal to `ranges` when no bound could move (the search then stops extending)."""
    out = dict(ranges)
    for name, side in edges.items():
        rng, first = ranges[name], original[name]
        low, high = (math.log(first.low), math.log(first.high)) if first.log else (first.low, first.high)
        step = extend_by * (high - low)
        current = _transform(rng.low if side == "low" else rng.high, first.log)
        done = round(abs(current - (low if side == "low" else high)) / step)
        if done >= max_extensions:
            continue
        moved = _untransform(current - step if side == "low" else current + step, first.log)
        lo_limit, hi_limit = (limits or {}).get(name, (-math.inf, math.inf))
        moved = float(f"{min(max(moved, lo_limit), hi_limit):.6g}")  # (0.0001, not 9.999999999999991e-05)
        if side == "low" and moved < rng.low:
            out[name] = Range(moved, rng.high, rng.log)
        elif side == "high" and moved > rng.high:
            out[name] = Range(rng.low, moved, rng.log)
    return out


def _transform(value: float, log: bool) -> float:
    return math.log(value) if log else value


def _untransform(value: float, log: bool) -> float:
    return math.exp(value) if log else value


def warm_start(
    study: optuna.Study,
    trials: pd.DataFrame,
    dists: Mapping[str, BaseDistribution],
    metric: str = "val_accuracy",
) -> int:
    """Add every configuration of `trials` inside `dists` to `study` as a finished trial whose value is its mean
    `metric` over seeds (a diverged run counts 0), so that a new study over wider ranges (after `extend_ranges`)
    starts from what is known. Returns how many were added."""
    params = list(dists)
    table = config_table(trials, params, metric)
    added = 0
    for _, row in table.iterrows():
        values = {name: row[name] for name in params}
        if not all(_inside(v, dists[name]) for name, v in values.items()):
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params={k: float(v) if isinstance(dists[k], FloatDistribution) else v for k, v in values.items()},
                distributions=dict(dists),
                value=float(row["mean"]),
                state=TrialState.COMPLETE,
                user_attrs={"warm_start": True, "seeds": int(row["n"])},
            )
        )
        added += 1
    return added


def _inside(value: Any, dist: BaseDistribution) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, (int, float, np.number)) and dist.low <= value <= dist.high


# ---------------------------------------------------------------------------------------------------------------
# The three phases in one loop (the reference an engine follows; Optuna ask-and-tell, no Ray)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tuned:
    """What `tune_cell` found."""

    chosen: pd.Series
    """The chosen configuration: params, n, mean, min, median, max, std, diverged, collapsed, reason."""
    candidates: pd.DataFrame
    """The configurations it was chosen from, with `refused` (why one could not win; '' if it could)."""
    trials: pd.DataFrame
    """Every training run: params, seed, metric, status, phase ('search' | 'extension' | 'confirm')."""
    ranges: dict[str, Range]
    """The ranges at the end (wider than the initial ones after an extension)."""
    extensions: int
    """Extension rounds run."""


def tune_cell(
    evaluate: Callable[[dict[str, float], int], Mapping[str, Any]],
    ranges: Mapping[str, Range],
    recipe: Recipe = RECIPE,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    limits: Mapping[str, tuple[float, float]] | None = None,
    sampler: Callable[[int], BaseSampler] | None = None,
    metric: str = "val_accuracy",
) -> Tuned:
    """Tune one cell: search, extend the ranges while the best sits at an edge, confirm, choose.

    `evaluate(params, seed)` trains one run and returns at least `metric` and optionally `status`. The search
    trials use `seeds[:recipe.search_seeds]`, the confirmation the next `recipe.confirm_seeds` (default seeds:
    0, 1, 2, ...). `sampler(seed)` replaces `make_sampler` (e.g. to compare other samplers); each extension round
    gets a sampler seeded anew and warm-started with every run so far. `limits`: hard bounds for `extend_ranges`.
    """
    names = list(ranges)
    seeds = list(range(recipe.seeds_needed)) if seeds is None else list(seeds)
    if len(seeds) < recipe.seeds_needed:
        raise ValueError(f"need {recipe.seeds_needed} seeds (search + confirmation), got {seeds}")
    search_seeds = seeds[: recipe.search_seeds]
    confirm_seeds = seeds[recipe.search_seeds : recipe.seeds_needed]
    factory = sampler or (lambda s: make_sampler(recipe, s, names))
    rows: list[dict] = []

    def run(params: dict[str, float], run_seeds: Sequence[int], phase: str) -> float:
        values = []
        for s in run_seeds:
            out = evaluate(dict(params), s)
            status = out.get("status", "completed")
            value = 0.0 if status == "diverged" or not _finite(out.get(metric)) else float(out[metric])
            rows.append({**params, "seed": s, metric: value, "status": status, "phase": phase})
            values.append(value)
        return float(np.mean(values))

    def search(study: optuna.Study, n: int, current: Mapping[str, Range], phase: str) -> None:
        for _ in range(n):
            trial = study.ask()
            params = {k: trial.suggest_float(k, r.low, r.high, log=r.log) for k, r in current.items()}
            study.tell(trial, run(params, search_seeds, phase))

    current = dict(ranges)
    study = optuna.create_study(direction="maximize", sampler=factory(seed))
    search(study, recipe.trials, current, "search")
    extensions = 0
    while recipe.max_extensions > 0:
        edges = at_edge(pd.DataFrame(rows), current, metric, recipe.edge)
        wider = extend_ranges(current, edges, ranges, recipe.extend_by, recipe.max_extensions, limits)
        if wider == current:
            break
        current, extensions = wider, extensions + 1
        study = optuna.create_study(direction="maximize", sampler=factory(seed + 1000 * extensions))
        warm_start(study, pd.DataFrame(rows), distributions(current), metric)
        search(study, recipe.extension_trials, current, "extension")
    if recipe.confirm_top and confirm_seeds:
        for _, candidate in confirmation_candidates(pd.DataFrame(rows), names, recipe.confirm_top, metric).iterrows():
            run({k: candidate[k] for k in names}, confirm_seeds, "confirm")
    trials = pd.DataFrame(rows)
    gap = recipe.collapse_gap if recipe.choice == "stable" else math.inf
    chosen, candidates = choose(trials, names, metric, gap)
    return Tuned(chosen, candidates, trials, current, extensions)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and math.isfinite(value)
