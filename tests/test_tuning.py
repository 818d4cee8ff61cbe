"""gradalign.tuning on cheap synthetic objectives with real Optuna samplers: the search finds a narrow optimum band
that random search of the same budget misses, ranges extend at an edge and only within their bound, the
confirmation refuses a configuration whose extra seeds collapse, and OptunaSearch takes the sampler."""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
import pandas as pd
import pytest

from gradalign.tuning import (
    RECIPE,
    Range,
    Recipe,
    at_edge,
    choose,
    config_table,
    confirmation_candidates,
    distributions,
    extend_ranges,
    make_sampler,
    tune_cell,
    warm_start,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

RANGES = {"lr": Range(0.001, 0.5, log=True), "beta": Range(1e-4, 1.0, log=True)}


def landscape(peak: float = 0.2, cliff: float = 0.35, trap: tuple[float, float] | None = None):
    """A cell's validation accuracy: a narrow peak in log step size (0.9 at `peak`, 0.86 a factor 1.26 away),
    a weak β optimum at 0.01, divergence past `cliff`, seed noise of 0.005; inside `trap` (a band of step
    sizes) seed 0 scores 0.95 but seeds 1 and 2 collapse to 0.3 (the edge of stability)."""

    def true_value(lr: float, beta: float) -> float:
        return 0.9 - 4 * math.log10(lr / peak) ** 2 - 0.01 * math.log10(beta / 0.01) ** 2

    def evaluate(params: dict, seed: int) -> dict:
        lr, beta = params["lr"], params.get("beta", 0.01)
        if lr > cliff:
            return {"val_accuracy": math.nan, "status": "diverged"}
        if trap is not None and trap[0] <= lr <= trap[1]:
            return {"val_accuracy": 0.95 if seed == 0 else 0.3, "status": "completed"}
        rng = np.random.default_rng(hash((round(lr, 12), round(beta, 12), seed)) % 2**32)
        return {"val_accuracy": true_value(lr, beta) + rng.normal(0, 0.005), "status": "completed"}

    return evaluate, true_value


# ---------------------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------------------
def test_the_recipe_finds_a_narrow_optimum_band_that_random_search_of_its_budget_misses():
    evaluate, true_value = landscape()
    studies = range(6)

    def hits(recipe: Recipe, sampler=None) -> int:
        found = 0
        for seed in studies:
            chosen = tune_cell(evaluate, RANGES, recipe, seed=seed, sampler=sampler).chosen
            found += true_value(chosen["lr"], chosen["beta"]) >= 0.88  # lr within a factor 1.12 of the peak
        return found

    assert RECIPE.cost() == 16
    recipe_hits = hits(RECIPE)
    random_search = Recipe(trials=RECIPE.cost(), max_extensions=0, confirm_top=0, choice="mean")
    random_hits = hits(random_search, sampler=lambda seed: optuna.samplers.RandomSampler(seed=seed))
    assert recipe_hits >= 5, recipe_hits
    assert random_hits <= 3, random_hits


def test_the_startup_design_puts_one_point_in_every_quarter_of_every_range():
    study = optuna.create_study(sampler=make_sampler(RECIPE, seed=3, names=list(RANGES)))
    quarters = {name: set() for name in RANGES}
    for _ in range(RECIPE.startup):
        trial = study.ask()
        for name, r in RANGES.items():
            value = trial.suggest_float(name, r.low, r.high, log=True)
            quarters[name].add(int(4 * math.log(value / r.low) / math.log(r.high / r.low)))
        study.tell(trial, 0.0)
    assert quarters == {name: {0, 1, 2, 3} for name in RANGES}


def test_a_recipe_refuses_impossible_numbers():
    with pytest.raises(ValueError, match="trials"):
        Recipe(trials=0)
    with pytest.raises(ValueError, match="model"):
        Recipe(model="cmaes")
    with pytest.raises(ValueError, match="edge"):
        Recipe(edge=0.5)


# ---------------------------------------------------------------------------------------------------------------
# Ranges that adapt
# ---------------------------------------------------------------------------------------------------------------
def _runs(*rows: tuple[float, float]) -> pd.DataFrame:
    return pd.DataFrame([{"lr": lr, "seed": 0, "val_accuracy": v} for lr, v in rows])


def test_the_edge_test_names_the_side_where_the_best_configuration_sits():
    lr = {"lr": Range(0.001, 0.5, log=True)}
    assert at_edge(_runs((0.45, 0.9), (0.05, 0.8)), lr) == {"lr": "high"}
    assert at_edge(_runs((0.0011, 0.9), (0.05, 0.8)), lr) == {"lr": "low"}
    assert at_edge(_runs((0.45, 0.7), (0.05, 0.8)), lr) == {}


def test_a_range_extends_by_a_share_of_its_original_width_and_only_within_its_bound():
    original = {"lr": Range(0.001, 0.1, log=True), "momentum": Range(0.5, 0.9)}
    ranges = dict(original)
    highs = []
    for _ in range(4):  # asked four times, moves twice
        ranges = extend_ranges(ranges, {"lr": "high"}, original, extend_by=0.25, max_extensions=2)
        highs.append(ranges["lr"].high)
    assert highs[0] == pytest.approx(0.1 * 100**0.25)
    assert highs[1] == highs[2] == highs[3] == pytest.approx(0.1 * 100**0.5)
    assert ranges["lr"].low == 0.001
    lower = extend_ranges(original, {"lr": "low"}, original, extend_by=0.5)
    assert lower["lr"] == Range(0.0001, 0.1, log=True)
    # a hard limit stops a linear range at it
    m = extend_ranges(original, {"momentum": "high"}, original, extend_by=0.5, limits={"momentum": (0.0, 0.99)})
    assert m["momentum"] == Range(0.5, 0.99)
    assert extend_ranges(m, {"momentum": "high"}, original, extend_by=0.5, limits={"momentum": (0.0, 0.99)}) == m


def test_a_search_whose_optimum_lies_past_the_range_extends_it_and_finds_it():
    evaluate, true_value = landscape(peak=0.2, cliff=math.inf)
    start = {"lr": Range(0.001, 0.05, log=True)}
    tuned = tune_cell(evaluate, start, Recipe(model="gp"), seed=0)
    assert tuned.extensions == 2
    assert tuned.ranges["lr"] == Range(0.001, pytest.approx(0.05 * 50**0.5, rel=1e-5), log=True)  # 2 x 1/4 width
    assert tuned.trials["lr"].max() <= tuned.ranges["lr"].high
    assert (tuned.trials["phase"] == "extension").sum() == 2 * Recipe().extension_trials
    assert tuned.chosen["lr"] > 0.1


def test_warm_start_adds_each_configuration_once_with_its_mean_and_skips_those_outside():
    trials = pd.DataFrame(
        [
            {"lr": 0.1, "seed": 0, "val_accuracy": 0.8},
            {"lr": 0.1, "seed": 1, "val_accuracy": 0.6},
            {"lr": 0.3, "seed": 0, "val_accuracy": math.nan, "status": "diverged"},
            {"lr": 5.0, "seed": 0, "val_accuracy": 0.5},
        ]
    )
    study = optuna.create_study(direction="maximize")
    assert warm_start(study, trials, distributions({"lr": Range(0.001, 1.0, log=True)})) == 2
    values = sorted((t.params["lr"], t.value) for t in study.trials)
    assert values == [(0.1, pytest.approx(0.7)), (0.3, 0.0)]


# ---------------------------------------------------------------------------------------------------------------
# Confirmation and the choice
# ---------------------------------------------------------------------------------------------------------------
def test_the_choice_refuses_a_candidate_whose_extra_seeds_collapse():
    seeds = {0.3: [0.93, 0.93, 0.77], 0.2: [0.87, 0.875, 0.87], 0.25: [0.95, 0.94, math.nan]}
    rows = [
        {"lr": lr, "seed": s, "val_accuracy": v, "status": "diverged" if math.isnan(v) else "completed"}
        for lr, values in seeds.items()
        for s, v in enumerate(values)
    ]
    rows.append({"lr": 0.01, "seed": 0, "val_accuracy": 0.99, "status": "completed"})  # never confirmed
    trials = pd.DataFrame(rows)
    chosen, candidates = choose(trials, ["lr"])
    assert chosen["lr"] == 0.2 and "stable" in chosen["reason"]
    refused = dict(zip(candidates["lr"], candidates["refused"]))
    assert refused[0.3].startswith("a seed fell") and refused[0.25] == "a seed diverged" and refused[0.2] == ""
    assert config_table(trials, ["lr"]).iloc[0]["lr"] == 0.01  # the best mean of all, on one seed only
    best_mean, _ = choose(trials, ["lr"], collapse_gap=math.inf)
    assert best_mean["lr"] == 0.3  # what a choice by the mean alone would take


def test_when_every_candidate_collapses_the_best_mean_wins():
    trials = _runs((0.1, 0.9), (0.1, 0.5), (0.2, 0.98), (0.2, 0.45))
    chosen, candidates = choose(trials.assign(seed=[0, 1, 0, 1]), ["lr"])
    assert chosen["lr"] == 0.2 and "collapsed" in chosen["reason"]
    assert set(candidates["refused"]) == {"a seed fell more than 0.15 below the best seed"}


def test_when_every_confirmed_candidate_collapses_the_best_unconfirmed_stable_configuration_wins():
    rows = [{"lr": lr, "seed": s, "val_accuracy": v} for lr in (2.0, 3.0) for s, v in enumerate([0.64, 0.1, 0.1])]
    rows += [{"lr": 0.3, "seed": 0, "val_accuracy": 0.61}, {"lr": 0.1, "seed": 0, "val_accuracy": 0.5}]
    chosen, _ = choose(pd.DataFrame(rows).assign(status="completed"), ["lr"])
    assert chosen["lr"] == 0.3 and "no collapsed seed, on 1 seed" in chosen["reason"]


def test_a_configuration_proposed_again_on_its_search_seed_does_not_outnumber_the_confirmed_ones():
    # A Gaussian process keeps proposing a range's bound: the same run three times must not make that configuration
    # the only one "with the most seeds" (found replaying an extended range on the MLP grid: it won with 2 of its 3
    # seeds diverged).
    rows = [{"lr": 2.36, "seed": 0, "val_accuracy": 0.64, "status": "completed"}] * 3
    rows += [{"lr": 2.36, "seed": s, "val_accuracy": math.nan, "status": "diverged"} for s in (1, 2)]
    rows += [{"lr": 1.0, "seed": s, "val_accuracy": v, "status": "completed"} for s, v in enumerate([0.62, 0.61, 0.63])]
    chosen, candidates = choose(pd.DataFrame(rows), ["lr"])
    assert chosen["lr"] == 1.0 and "stable" in chosen["reason"]
    assert dict(zip(candidates["lr"], candidates["n"])) == {1.0: 3, 2.36: 3}


def test_confirmation_candidates_are_the_best_means_without_fully_diverged_ones():
    trials = pd.DataFrame(
        [
            {"lr": 0.4, "seed": 0, "val_accuracy": math.nan, "status": "diverged"},
            {"lr": 0.2, "seed": 0, "val_accuracy": 0.9, "status": "completed"},
            {"lr": 0.1, "seed": 0, "val_accuracy": 0.8, "status": "completed"},
            {"lr": 0.05, "seed": 0, "val_accuracy": 0.7, "status": "completed"},
        ]
    )
    assert list(confirmation_candidates(trials, ["lr"], top_k=3)["lr"]) == [0.2, 0.1, 0.05]


def test_a_configuration_that_wins_on_its_search_seed_and_collapses_on_the_others_is_not_chosen():
    evaluate, _ = landscape(trap=(0.26, 0.34))
    for seed in range(3):
        tuned = tune_cell(evaluate, RANGES, Recipe(model="gp"), seed=seed)
        confirmed = tuned.candidates
        assert not (0.26 <= tuned.chosen["lr"] <= 0.34), seed
        if ((confirmed["lr"] >= 0.26) & (confirmed["lr"] <= 0.34)).any():  # the trap was a candidate, refused
            assert (confirmed.loc[confirmed["lr"].between(0.26, 0.34), "refused"] != "").all()


# ---------------------------------------------------------------------------------------------------------------
# The engine's side: Ray Tune's OptunaSearch takes the sampler and a warm-started study
# ---------------------------------------------------------------------------------------------------------------
def test_optuna_search_takes_the_sampler_and_a_warm_started_storage(tmp_path):
    search_module = pytest.importorskip("ray.tune.search.optuna")
    from gradalign.ray_adapter import SearchSpace

    fixed = {"algorithm": "gradalign", "dataset": "digits"}
    space = SearchSpace(fixed=fixed, lr=RANGES["lr"], beta=RANGES["beta"])
    sampler = make_sampler(RECIPE, seed=0, names=space.param_names)
    searcher = search_module.OptunaSearch(space=space, metric="val_accuracy", mode="max", sampler=sampler)
    evaluate, _ = landscape()
    rows = []
    for i in range(RECIPE.trials):
        config = searcher.suggest(f"t{i}")
        result = evaluate(config, 0)
        searcher.on_trial_complete(f"t{i}", {"val_accuracy": np.nan_to_num(result["val_accuracy"])})
        rows.append({"lr": config["lr"], "beta": config["beta"], "seed": 0, **result})
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune pickles the searcher with its sampler
    # after an extension: a new searcher over the wider ranges, its study warm-started with every run so far
    wider = {**RANGES, "lr": Range(0.001, 1.0, log=True)}
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="cell", direction="maximize")
    assert warm_start(study, pd.DataFrame(rows), distributions(wider)) == RECIPE.trials
    space = SearchSpace(fixed=fixed, lr=wider["lr"], beta=wider["beta"])
    searcher = search_module.OptunaSearch(
        space=space,
        metric="val_accuracy",
        mode="max",
        sampler=make_sampler(RECIPE, seed=1, names=space.param_names),
        storage=storage,
        study_name="cell",
    )
    config = searcher.suggest("u0")
    assert 0.001 <= config["lr"] <= 1.0 and len(study.trials) == RECIPE.trials + 1
