"""Tuning strategies replayed on dense grids: how often, and by how much, each misses a cell's optimum.

    python benchmarks/tuning_strategies.py --cache /work/tuning-cache                 # every strategy, 100 studies
    python benchmarks/tuning_strategies.py --cache /work/tuning-cache --strategies today studies --repeats 300
    python benchmarks/tuning_strategies.py --cache /work/tuning-cache --model mlp \\
        --cells sgd-32 large_batch_sgd-128 gradalign-128 large_batch_sgd-512 gradalign-512
    python benchmarks/tuning_strategies.py --cache /work/tuning-cache --lr-range 0.001,0.05   # a range too low

Reads the grids that `tuning_adequacy.py` cached (same setting options) and simulates a cell's tuning with real
Optuna samplers: every configuration a strategy asks for is snapped to the nearest grid point (in log space) and
answered with one of that point's seed runs, drawn without replacement within a simulated study (cycling when a
point has fewer seeds than asked for). The chosen configuration's true accuracy is the grid's mean test accuracy
at its point; the shortfall is the grid best's (chosen on mean validation accuracy) minus that, in points.
Per strategy and cell: mean and 90th-percentile shortfall, the share of studies more than 1 (and 3) points short,
the worst, and the cost in training runs (a run stopped early counts its share of the budget).

The search, range extension, confirmation and choice are `gradalign.tuning`'s functions, as the studies run them.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import optuna
import pandas as pd
from tuning_adequacy import (
    DEFAULT_CELLS,
    _int_at_least,
    grid_file,
    parse_cell,
    point_table,
    read_records,
    resolve,
    runs_frame,
)

from gradalign.config import DATASETS, MODELS, ConfigError
from gradalign.tuning import (
    Range,
    Recipe,
    at_edge,
    choose,
    confirmation_candidates,
    distributions,
    extend_ranges,
    make_sampler,
    tune_cell,
    warm_start,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(frozen=True)
class Strategy:
    """A way to tune one cell: `recipe` (gradalign.tuning.Recipe: trials, seeds per trial, startup, model,
    extension, confirmation, choice) run by `tuning.tune_cell`, with `sampler` 'staged' (tuning.make_sampler:
    Sobol startup, then the recipe's model), 'tpe' (Optuna's TPESampler, `tpe_startup` random trials,
    multivariate) or 'random'. `halving`: successive halving over a Sobol design of that many configurations
    (rungs at 1/4 and 1/2 of the budget, keeping a third, then a half, before full runs) replaces the search."""

    name: str
    recipe: Recipe = field(default_factory=Recipe)
    sampler: str = "staged"
    tpe_startup: int = 10
    halving: int = 0
    asha: tuple[float, int] = ()
    """(grace period as a share of the budget, reduction factor): Ray Tune's ASHA over the recipe's Sobol design,
    trials one after another, as the studies run it by default (`--asha`)."""
    note: str = ""


def strategies() -> dict[str, Strategy]:
    r = Recipe()
    plain = dict(max_extensions=0, confirm_top=0, choice="mean")
    out = [
        Strategy("today", Recipe(trials=8, search_seeds=2, **plain), "tpe", tpe_startup=2, note="TPE, 2 startup"),
        Strategy("random-8x2", Recipe(trials=8, search_seeds=2, **plain), "random", note="TPE with 10 startup"),
        Strategy("random-16", Recipe(trials=16, **plain), "random"),
        Strategy("tpe4-16", Recipe(trials=16, **plain), "tpe", tpe_startup=4),
        Strategy("sobol4-tpe-16", Recipe(trials=16, **plain)),
        Strategy("sobol4-gp-16", Recipe(trials=16, model="gp", **plain)),
        Strategy("sobol4-tpe-10+c3x2", replace(r, max_extensions=0)),
        Strategy("sobol4-tpe-10+c3x2-mean", replace(r, max_extensions=0, choice="mean")),
        Strategy("sobol4-gp-10+c3x2", replace(r, max_extensions=0, model="gp")),
        Strategy("sobol4-gp-12+c2x2", replace(r, max_extensions=0, model="gp", trials=12, confirm_top=2)),
        Strategy("sobol4-gp-8+c4x2", replace(r, max_extensions=0, model="gp", trials=8, confirm_top=4)),
        Strategy("sobol6-gp-10+c3x2", replace(r, max_extensions=0, model="gp", startup=6)),
        Strategy("halving-24+c3x2", replace(r, max_extensions=0), halving=24),
        Strategy("halving-20+c3x2", replace(r, max_extensions=0), halving=20),
        Strategy("sobol4-gp-10+ext+c3x2", replace(r, model="gp"), note="the studies' recipe with --no-asha"),
        Strategy("asha-20-rf2+c3x2", replace(r, trials=20, startup=20, max_extensions=0), asha=(0.25, 2)),
        Strategy("asha-20-rf3+c3x2", replace(r, trials=20, startup=20, max_extensions=0), asha=(0.25, 3)),
        Strategy(
            "studies",
            replace(r, trials=20, startup=20),
            asha=(0.25, 3),
            note="what the studies run by default: ASHA (grace 1/4, rf 3) over 20 Sobol trials, range extensions, "
            "c3x2, stable choice",
        ),
    ]
    return {s.name: s for s in out}


# ---------------------------------------------------------------------------------------------------------------
# A grid as an oracle
# ---------------------------------------------------------------------------------------------------------------
class GridOracle:
    """Answers a configuration and seed with that seed's run at the nearest grid point (the nearest step size in
    log space, then the nearest β run there); a point that lacks the seed answers with one of its runs at random."""

    def __init__(self, records: list[dict], rng: np.random.Generator):
        runs = runs_frame(records)
        self.lrs = np.array(sorted(runs["lr"].unique()))
        self.betas = {  # per step size: the β values run there (fewer far from the optimum)
            lr: np.array(sorted(group["beta"].dropna().unique())) for lr, group in runs.groupby("lr")
        }
        self.seeds = sorted(runs["seed"].unique())
        self.runs: dict[tuple, dict[int, dict]] = {}
        for r in records:
            self.runs.setdefault((r["lr"], r["beta"]), {})[r["seed"]] = r
        points = point_table(runs)
        self.truth = {(p.lr, None if pd.isna(p.beta) else p.beta): p.test_mean for p in points.itertuples()}
        best = points.sort_values(["val_mean", "n", "lr"], ascending=[False, False, True]).iloc[0]
        self.best_test = float(best["test_mean"])
        self.rng = rng
        self.calls = 0.0

    @property
    def limits(self) -> dict[str, tuple[float, float]]:
        """The grid's span: a range extension stops there (past it the oracle could only repeat the edge's runs)."""
        betas = np.concatenate([b for b in self.betas.values() if len(b)] or [np.array([math.nan])])
        return {"lr": (float(self.lrs.min()), float(self.lrs.max())), "beta": (float(betas.min()), float(betas.max()))}

    def snap(self, params: dict) -> tuple:
        lr = float(self.lrs[np.argmin(np.abs(np.log(self.lrs) - math.log(params["lr"])))])
        betas, beta = self.betas[lr], None
        if len(betas):
            beta = float(betas[np.argmin(np.abs(np.log(betas) - math.log(params["beta"])))])
        return lr, beta

    def run(self, params: dict, seed: int) -> dict:
        runs = self.runs[self.snap(params)]
        if seed in runs:
            return runs[seed]
        return list(runs.values())[self.rng.integers(len(runs))]

    def evaluate(self, params: dict, seed: int) -> dict:
        self.calls += 1
        return self.run(params, seed)


def rung_value(record: dict, fraction: float) -> float:
    """Validation accuracy at `fraction` of the budget (the first evaluation at or past it; 0 once diverged)."""
    curve = record["curve"]
    if record["status"] == "diverged":
        return 0.0 if fraction >= 0.999 else float(curve[0][1]) if fraction <= curve[0][0] else 0.0
    for epochs, val, _ in curve:
        if epochs >= fraction * curve[-1][0] - 1e-9:
            return float(val) if math.isfinite(val) else 0.0
    return 0.0


# ---------------------------------------------------------------------------------------------------------------
# One simulated tuning of one cell
# ---------------------------------------------------------------------------------------------------------------
def simulate(strategy: Strategy, oracle: GridOracle, ranges: dict[str, Range], rep: int) -> dict:
    """Tune one cell once against `oracle` (study `rep`: sampler seed and the order of the grid's seeds)."""
    rng = np.random.default_rng(rep)
    recipe = strategy.recipe
    seeds = [int(s) for s in rng.permutation(oracle.seeds)]
    seeds += [max(seeds) + 1 + i for i in range(max(0, recipe.seeds_needed - len(seeds)))]
    oracle.calls = 0.0
    extensions = 0
    if strategy.asha:
        chosen, extensions = asha(strategy, oracle, ranges, rep, seeds)
    elif strategy.halving:
        chosen = halving(strategy, oracle, ranges, rep, seeds)
    else:
        tuned = tune_cell(
            oracle.evaluate,
            ranges,
            recipe,
            seed=rep,
            seeds=seeds,
            limits=oracle.limits,
            sampler=_factory(strategy, ranges),
        )
        chosen, extensions = tuned.chosen, tuned.extensions
    point = oracle.snap({k: chosen[k] for k in ranges})
    truth = oracle.truth[point]
    return {
        "lr": point[0],
        "beta": point[1],
        "truth": truth,
        "shortfall": 100 * (oracle.best_test - truth),
        "cost": oracle.calls,
        "extensions": extensions,
    }


def _factory(strategy: Strategy, ranges: dict[str, Range]):
    if strategy.sampler == "random":
        return lambda seed: optuna.samplers.RandomSampler(seed=seed)
    if strategy.sampler == "tpe":
        startup = strategy.tpe_startup
        return lambda seed: optuna.samplers.TPESampler(multivariate=True, n_startup_trials=startup, seed=seed)
    return lambda seed: make_sampler(strategy.recipe, seed=seed, names=list(ranges))


def halving(strategy: Strategy, oracle: GridOracle, ranges: dict[str, Range], rep: int, seeds: list[int]):
    """Synchronous successive halving over a Sobol design on the first seed, then the recipe's confirmation and
    choice; returns the chosen row (oracle.calls counts a run stopped early by its share of the budget)."""
    recipe, names = strategy.recipe, list(ranges)
    sampler = make_sampler(replace(recipe, startup=strategy.halving), seed=rep, names=names)
    study = optuna.create_study(sampler=sampler)
    configs = []
    for _ in range(strategy.halving):
        trial = study.ask()
        configs.append({k: trial.suggest_float(k, r.low, r.high, log=r.log) for k, r in ranges.items()})
        study.tell(trial, 0.0)
    runs = [oracle.run(c, seeds[0]) for c in configs]
    alive = list(range(len(configs)))
    for fraction, keep in ((0.25, 1 / 3), (0.5, 1 / 2)):
        oracle.calls += 0.25 * len(alive)
        alive = sorted(alive, key=lambda i: -rung_value(runs[i], fraction))[: max(1, round(len(alive) * keep))]
    oracle.calls += 0.5 * len(alive)
    rows = [
        {**configs[i], "seed": seeds[0], "val_accuracy": runs[i]["val_accuracy"], "status": runs[i]["status"]}
        for i in alive
    ]
    return confirm_and_choose(recipe, names, rows, oracle, seeds)


def asha(strategy: Strategy, oracle: GridOracle, ranges: dict[str, Range], rep: int, seeds: list[int]):
    """Ray Tune's ASHA rule (`async_hyperband._Bracket`: a trial stops at a rung when its value there falls below
    the (1 - 1/rf) quantile of the values recorded there so far) over the recipe's Sobol design, trials one after
    another; then, as `cell_tuning.tune_cells` does, range extensions while the best full run sits at an edge (each
    `recipe.extension_trials` more trials from a Gaussian process warm-started with the full runs, under the same
    rule), the confirmation among the trials that ran the whole budget, and the recipe's choice."""
    recipe, names = strategy.recipe, list(ranges)
    grace, rf = strategy.asha
    rungs = [grace * rf**k for k in range(8) if grace * rf**k < 1 - 1e-9]
    recorded: dict[float, list[float]] = {m: [] for m in rungs}
    rows: list[dict] = []

    def search(study: optuna.Study, n: int, current: dict[str, Range]) -> None:
        for _ in range(n):
            trial = study.ask()
            params = {k: trial.suggest_float(k, r.low, r.high, log=r.log) for k, r in current.items()}
            run, stopped_at = oracle.run(params, seeds[0]), None
            for m in rungs:
                value = rung_value(run, m)
                cut = np.percentile(recorded[m], (1 - 1 / rf) * 100) if recorded[m] else None
                recorded[m].append(value)
                if cut is not None and value < cut:
                    stopped_at = m
                    break
            oracle.calls += stopped_at if stopped_at is not None else 1.0
            study.tell(trial, rung_value(run, stopped_at) if stopped_at is not None else _score(run)["val_accuracy"])
            if stopped_at is None:
                rows.append({**params, "seed": seeds[0], **_score(run)})

    current, extensions = dict(ranges), 0
    search(
        optuna.create_study(direction="maximize", sampler=make_sampler(recipe, seed=rep, names=names)),
        recipe.trials,
        current,
    )
    while recipe.max_extensions > 0:
        wider = extend_ranges(
            current,
            at_edge(pd.DataFrame(rows), current, edge=recipe.edge),
            ranges,
            recipe.extend_by,
            recipe.max_extensions,
            oracle.limits,
        )
        if wider == current:
            break
        current, extensions = wider, extensions + 1
        study = optuna.create_study(
            direction="maximize", sampler=make_sampler(replace(recipe, startup=0), seed=rep + 1000 * extensions)
        )
        warm_start(study, pd.DataFrame(rows), distributions(current))
        search(study, recipe.extension_trials, current)
    return confirm_and_choose(recipe, names, rows, oracle, seeds), extensions


def confirm_and_choose(recipe: Recipe, names: list[str], rows: list[dict], oracle: GridOracle, seeds: list[int]):
    """The recipe's confirmation (its best `confirm_top` full runs on the next seeds) and choice, after a search
    that left its full runs in `rows`; returns the chosen row."""
    confirm = seeds[recipe.search_seeds : recipe.seeds_needed]
    for _, candidate in confirmation_candidates(pd.DataFrame(rows), names, recipe.confirm_top).iterrows():
        for s in confirm:
            run = oracle.evaluate({k: candidate[k] for k in names}, s)
            rows.append({**{k: candidate[k] for k in names}, "seed": s, **_score(run)})
    return choose(pd.DataFrame(rows), names, collapse_gap=recipe.collapse_gap)[0]


def _score(run: dict) -> dict:
    return {"val_accuracy": run["val_accuracy"], "status": run["status"]}


# ---------------------------------------------------------------------------------------------------------------
# Many studies, one table
# ---------------------------------------------------------------------------------------------------------------
def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and cell: studies, mean / p90 / worst shortfall, share > 1 and > 3 points, mean cost."""
    grouped = results.groupby(["strategy", "cell"], sort=False)
    table = grouped["shortfall"].agg(
        studies="size",
        mean="mean",
        p90=lambda s: s.quantile(0.9),
        worst="max",
        over1=lambda s: (s > 1).mean(),
        over3=lambda s: (s > 3).mean(),
    )
    table["cost"] = grouped["cost"].mean()
    table["extended"] = grouped["extensions"].apply(lambda s: (s > 0).mean())
    return table.reset_index()


def format_summary(table: pd.DataFrame) -> str:
    header = (
        f"{'strategy':<26} {'cell':<20} {'n':>4} {'mean':>6} {'p90':>6} {'worst':>6} {'>1pt':>5} {'>3pt':>5} "
        f"{'runs':>5} {'ext':>4}"
    )
    lines = [header]
    for strategy, rows in table.groupby("strategy", sort=False):
        for r in rows.itertuples():
            lines.append(
                f"{strategy:<26} {r.cell:<20} {r.studies:>4} {r.mean:>6.2f} {r.p90:>6.2f} {r.worst:>6.2f} "
                f"{r.over1:>5.0%} {r.over3:>5.0%} {r.cost:>5.1f} {r.extended:>4.0%}"
            )
        lines.append(
            f"{strategy:<26} {'(all cells)':<20} {rows.studies.sum():>4} {rows['mean'].mean():>6.2f} "
            f"{rows.p90.mean():>6.2f} {rows.worst.max():>6.2f} {rows.over1.mean():>5.0%} {rows.over3.mean():>5.0%} "
            f"{rows.cost.mean():>5.1f} {rows.extended.mean():>4.0%}"
        )
    return "\n".join(lines)


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid range {text!r}: write LOW,HIGH") from None
    if not 0 < low < high:
        raise argparse.ArgumentTypeError(f"invalid range {text!r}: need 0 < LOW < HIGH")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, type=__import__("pathlib").Path, help="tuning_adequacy.py's cache")
    p.add_argument("--cells", type=parse_cell, nargs="+", default=[parse_cell(c) for c in DEFAULT_CELLS])
    p.add_argument("--dataset", default="mnist1d", choices=DATASETS)
    p.add_argument("--model", default="cnn", choices=MODELS)
    p.add_argument("--micro-batch", type=_int_at_least(1), default=32)
    p.add_argument("--budget-examples", type=_int_at_least(1), default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--strategies", nargs="+", default=None, help=f"default all: {', '.join(strategies())}")
    p.add_argument("--repeats", type=_int_at_least(1), default=100, help="simulated studies per strategy and cell")
    p.add_argument("--lr-range", type=_range, default=(0.001, 0.5), help="initial step-size range (log)")
    p.add_argument("--beta-range", type=_range, default=(1e-4, 1.0), help="initial β range (log)")
    p.add_argument("--csv", type=__import__("pathlib").Path, default=None, help="write every simulated study here")
    return p


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = build_parser()
    args = parser.parse_args(argv)
    known = strategies()
    names = args.strategies or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown strategies {', '.join(unknown)}: choose from {', '.join(known)}")
    args.lr_values, args.beta_values, args.lr_grid = [1.0], [1.0], None  # (resolve checks a corner)
    args.momentum, args.lr_schedule, args.warmup = 0.9, "cosine", 0.1
    try:
        resolve(args)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    grids = {}
    for cell in args.cells:
        records = read_records(grid_file(args.cache, cell, args))
        if not records:
            parser.error(f"no cached grid for {cell.name} in {args.cache}: run tuning_adequacy.py with these options")
        grids[cell] = records
    results = []
    start = time.perf_counter()
    for name in names:
        strategy = known[name]
        for cell, records in grids.items():
            oracle = GridOracle(records, np.random.default_rng(0))
            ranges = {"lr": Range(*args.lr_range, log=True)}
            if cell.has_beta:
                ranges["beta"] = Range(*args.beta_range, log=True)
            for rep in range(args.repeats):
                out = simulate(strategy, oracle, ranges, rep)
                results.append({"strategy": name, "cell": cell.name, "repeat": rep, **out})
        print(f"# {name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    frame = pd.DataFrame(results)
    if args.csv is not None:
        frame.to_csv(args.csv, index=False)
    print(format_summary(summarize(frame)), flush=True)
    return frame


if __name__ == "__main__":
    main()
