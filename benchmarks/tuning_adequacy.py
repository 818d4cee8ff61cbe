"""Is each cell tuned to its optimum? A dense grid with several seeds, through the library (no Ray), against a study.

    python benchmarks/tuning_adequacy.py --cache /work/tuning-cache               # the default study's cells
    python benchmarks/tuning_adequacy.py --cache /work/tuning-cache --study results/batch-scaling
    python benchmarks/tuning_adequacy.py --cells gradalign-256 large_batch_sgd-256 --seeds 4 --top-seeds 4
    python benchmarks/tuning_adequacy.py --model mlp --cells sgd-32 gradalign-128 large_batch_sgd-512 --profile
    python benchmarks/tuning_adequacy.py --dataset digits --model mlp --budget-examples 1024 --cells sgd-32 \\
        --lr-values 0.05 0.1 --seeds 1                                           # a quick check that it runs

A cell is ALGORITHM-B: `sgd-32` is small-batch SGD at batch 32 (one client); `large_batch_sgd-256` and
`gradalign-256` split B = 256 into B/b micro-batches (clients) of b = --micro-batch. Every cell is trained at every
grid point (step size x β for GradAlign) with --seeds seeds; the points whose mean validation accuracy is within
--top-margin of the cell's best get seeds up to --top-seeds (they decide the optimum; the rest are clearly worse).
The fixed setting is the default study's: MNIST-1D, the 1-D CNN, 72,704 training examples per run, momentum 0.9,
10% linear warmup + cosine decay, a 10% validation split.

A diverged run scores 0. The grid's best point is chosen on mean validation accuracy (as a study chooses); its test
accuracy (mean, n, sample std, range over seeds) is what a perfectly tuned cell reaches. With --study, the study's
choice per cell (its `cells.parquet`: lr, beta, acc_mean, n_seeds) stands beside it, with `grid@study` (the grid's
mean test accuracy at the grid point nearest the study's choice, in log space) and `gap` (grid best - study, points).

Every run is cached as a line of a JSON-lines file per cell grid in --cache (keyed by the full configuration and
seed): a rerun trains nothing twice, and `tuning_strategies.py` replays the grid to simulate tuning strategies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

from gradalign.config import DATASETS, MODELS, ConfigError, TrainConfig
from gradalign.data import load_dataset
from gradalign.provenance import provenance
from gradalign.splits import with_validation
from gradalign.training import Trainer, planned_updates
from gradalign.tuning import RECIPE, Range, tune_cell

CELL_ALGORITHMS = ("sgd", "large_batch_sgd", "gradalign")
DEFAULT_CELLS = ("sgd-32", "large_batch_sgd-64", "gradalign-64", "large_batch_sgd-256", "gradalign-256")
"""The cells of the default study that issue 24 measured (the reference and both algorithms at B = 64 and 256)."""
DEFAULT_LR = tuple(round(0.001 * 2 ** (k / 2), 6) for k in [*range(0, 10, 2), *range(10, 23)])
"""0.001 .. 2.048: factors of 2 up to 0.016, then factors of sqrt(2) (where the optima and the edge of stability
lie), reaching 4x past the default study's upper bound 0.5 so that a range extension can be replayed."""
DEFAULT_BETA = tuple(round(10 ** (k / 2), 6) for k in range(-8, 1))
"""1e-4 .. 1, two points per decade (the default study's range; β >= 3 trains to chance accuracy here)."""
BUDGET_EXAMPLES = 72704
"""The default study's budget: 20 epochs of MNIST-1D's 3,600-example training split, rounded up to a multiple of
every batch size up to 1024."""


@dataclass(frozen=True)
class Cell:
    algorithm: str
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.algorithm}-{self.batch_size}"

    @property
    def has_beta(self) -> bool:
        return self.algorithm == "gradalign"


def parse_cell(text: str) -> Cell:
    """'gradalign-256' -> Cell('gradalign', 256); argparse type."""
    algorithm, _, batch = text.rpartition("-")
    if algorithm not in CELL_ALGORITHMS or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid cell {text!r}: write ALGORITHM-B with ALGORITHM one of {', '.join(CELL_ALGORITHMS)} and B a "
            "positive batch size, e.g. gradalign-256"
        )
    return Cell(algorithm, int(batch))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be a positive number")
    return value


def _lr_band(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid band {text!r}: write LOW,HIGH") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"invalid band {text!r}: need 0 <= LOW <= HIGH")
    return low, high


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be an integer >= {minimum}")
        return value

    return parse


# ---------------------------------------------------------------------------------------------------------------
# Configurations and the cache
# ---------------------------------------------------------------------------------------------------------------
def cell_config(cell: Cell, args: argparse.Namespace, lr: float, beta: float | None) -> TrainConfig:
    """The TrainConfig of `cell` at one grid point (seed 0; `run_key` leaves the seed out)."""
    clients = 1 if cell.algorithm == "sgd" else cell.batch_size // args.micro_batch
    base = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        algorithm=cell.algorithm,
        batch_size=cell.batch_size,
        clients=clients,
        lr=lr,
        beta=beta if cell.has_beta else None,
        momentum=args.momentum,
        budget_examples=args.budget_examples,
        lr_schedule=args.lr_schedule,
        warmup=args.warmup,
        val_fraction=args.val_fraction,
        device="cpu",
        seed=0,
    )
    # four evaluations (quarters of the budget): the final one scores the run, the others let a simulation replay
    # early stopping (ASHA rungs)
    return base.replace(eval_every=max(1, math.ceil(planned_updates(base, args.train_size) / 4)))


def run_key(config: TrainConfig) -> str:
    """Cache key of a configuration, seed excluded (the seed is a separate field of each record)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("seed", "data_dir", "download")}
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def grid_file(cache: Path, cell: Cell, args: argparse.Namespace) -> Path:
    """One JSON-lines file per cell grid: its name says the setting, its records say the rest."""
    return cache / f"{args.dataset}-{args.model}-{cell.name}-b{args.micro_batch}-{args.budget_examples}.jsonl"


def read_records(path: Path) -> list[dict]:
    """The cached runs of one grid file (a torn last line, e.g. after a kill, is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def train_one(config: TrainConfig, seed: int) -> dict:
    """Train one run; its final validation and test accuracy (0 when diverged) and its quarter-budget curve."""
    start = time.perf_counter()
    history = Trainer(config.replace(seed=seed)).fit()
    last = history[-1]
    diverged = last["status"] == "diverged"
    return {
        "val_accuracy": 0.0 if diverged else float(last["val_accuracy"]),
        "test_accuracy": 0.0 if diverged else float(last["test_accuracy"]),
        "status": last["status"],
        "curve": [[round(h["epochs"], 4), h["val_accuracy"], h["test_accuracy"]] for h in history],
        "seconds": round(time.perf_counter() - start, 3),
    }


# ---------------------------------------------------------------------------------------------------------------
# Running the grids
# ---------------------------------------------------------------------------------------------------------------
class Progress:
    """'# [k/n] ...' lines with an ETA from the mean seconds per run so far (per cell where known)."""

    def __init__(self, planned: dict[str, int]):
        self.planned = dict(planned)
        self.done = 0
        self.seconds: dict[str, list[float]] = {}

    def add(self, cells: dict[str, int]) -> None:
        for name, n in cells.items():
            self.planned[name] = self.planned.get(name, 0) + n

    def tick(self, cell: str, seconds: float, text: str) -> None:
        self.done += 1
        self.planned[cell] -= 1
        self.seconds.setdefault(cell, []).append(seconds)
        overall = np.mean([s for v in self.seconds.values() for s in v])
        eta = sum(n * np.mean(self.seconds.get(c, [overall])) for c, n in self.planned.items())
        left = sum(self.planned.values())
        print(f"# [{self.done}/{self.done + left}] {text} ({seconds:.1f} s), ETA {_duration(eta)}", flush=True)


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 90
        else f"{seconds / 60:.0f} min"
        if seconds < 5400
        else f"{seconds / 3600:.1f} h"
    )


def grid_points(
    cell: Cell, lrs: Sequence[float], betas: Sequence[float], full_beta: tuple[float, float] = (0.0, math.inf)
) -> list[tuple[float, float | None]]:
    """The cell's (lr, beta) points: every β at step sizes inside `full_beta`, every other β outside it (where
    the step size alone decides: far too small to train, or far past the edge of stability)."""
    if not cell.has_beta:
        return [(lr, None) for lr in lrs]
    thin = list(betas[::2]) if len(betas) > 2 else list(betas)
    return [(lr, beta) for lr in lrs for beta in (betas if full_beta[0] <= lr <= full_beta[1] else thin)]


class CachedRuns:
    """One cell's runs in one JSON-lines file: `get` trains a (point, seed) only when the file lacks it."""

    def __init__(self, path: Path, cell: Cell, args: argparse.Namespace, progress: Progress):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.cell, self.args, self.progress = path, cell, args, progress
        self.known = {(r["key"], r["seed"]): r for r in read_records(path)}

    def has(self, point: tuple[float, float | None], seed: int) -> bool:
        return (run_key(cell_config(self.cell, self.args, *point)), seed) in self.known

    def get(self, point: tuple[float, float | None], seed: int) -> dict:
        config = cell_config(self.cell, self.args, *point)
        key = run_key(config)
        if (key, seed) in self.known:
            return self.known[(key, seed)]
        result = train_one(config, seed)
        record = {"key": key, "seed": seed, "cell": self.cell.name, "lr": point[0], "beta": point[1], **result}
        record["config"] = {k: v for k, v in config.to_dict().items() if k != "seed"}
        record["provenance"] = _provenance()
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.known[(key, seed)] = record
        beta = "" if point[1] is None else f" beta {point[1]:.3g}"
        text = f"{self.cell.name} lr {point[0]:.4g}{beta} seed {seed}: val {result['val_accuracy']:.3f}"
        self.progress.tick(self.cell.name, result["seconds"], f"{text} test {result['test_accuracy']:.3f}")
        return record


def run_cell(cell: Cell, args: argparse.Namespace, progress: Progress) -> pd.DataFrame:
    """Train what the cache lacks of one cell's grid; return its runs (a row per point and seed)."""
    runs = CachedRuns(grid_file(args.cache, cell, args), cell, args, progress)
    points = grid_points(cell, args.lr_values, args.beta_values, args.full_beta)
    base = [args.seed_offset + i for i in range(args.seeds)]
    extra = [args.seed_offset + i for i in range(args.seeds, max(args.seeds, args.top_seeds))]
    rows = [runs.get(p, s) for p in points for s in base]
    if extra:
        means = {p: np.mean([runs.get(p, s)["val_accuracy"] for s in base]) for p in points}
        best = max(means.values())
        near = [(p, s) for p in points if means[p] >= best - args.top_margin for s in extra]
        progress.add({cell.name: sum(not runs.has(p, s) for p, s in near)})
        rows += [runs.get(p, s) for p, s in near]
    return runs_frame(rows)


def tune_with_recipe(cell: Cell, args: argparse.Namespace, progress: Progress, study: int) -> dict:
    """One tuning of `cell` by `gradalign.tuning.tune_cell` (the studies' recipe) with real runs, then its choice
    trained on --final-seeds fresh seeds: the chosen configuration, its test accuracy, the runs it cost."""
    path = grid_file(args.cache, cell, args)
    runs = CachedRuns(path.with_suffix(".recipe.jsonl"), cell, args, progress)
    ranges = {"lr": Range(*args.lr_range, log=True)}
    if cell.has_beta:
        ranges["beta"] = Range(*args.beta_range, log=True)

    def evaluate(params: dict, seed: int) -> dict:
        return runs.get((params["lr"], params.get("beta")), seed)

    seeds = [1000 + 100 * study + i for i in range(RECIPE.seeds_needed)]
    tuned = tune_cell(evaluate, ranges, RECIPE, seed=study, seeds=seeds)
    point = (float(tuned.chosen["lr"]), float(tuned.chosen["beta"]) if cell.has_beta else None)
    finals = [runs.get(point, 2000 + 100 * study + i)["test_accuracy"] for i in range(args.final_seeds)]
    return {
        "cell": cell.name,
        "study": study,
        "lr": point[0],
        "beta": point[1],
        "test": float(np.mean(finals)),
        "test_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else math.nan,
        "n": len(finals),
        "runs": len(tuned.trials),
        "extensions": tuned.extensions,
        "reason": tuned.chosen["reason"],
    }


def missing_base_runs(cell: Cell, args: argparse.Namespace) -> int:
    """How many of the cell's runs at --seeds seeds the cache lacks (the ETA's first estimate)."""
    known = {(r["key"], r["seed"]) for r in read_records(grid_file(args.cache, cell, args))}
    keys = [
        run_key(cell_config(cell, args, *p))
        for p in grid_points(cell, args.lr_values, args.beta_values, args.full_beta)
    ]
    return sum((k, args.seed_offset + i) not in known for k in keys for i in range(args.seeds))


_PROVENANCE: dict | None = None


def _provenance() -> dict:
    global _PROVENANCE
    if _PROVENANCE is None:
        info = provenance()
        _PROVENANCE = {k: info[k] for k in ("git_commit", "torch", "hardware")}
    return _PROVENANCE


def runs_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Cached records -> a frame: cell, lr, beta (NaN without), seed, val_accuracy, test_accuracy, status."""
    columns = ["cell", "lr", "beta", "seed", "val_accuracy", "test_accuracy", "status"]
    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in records], columns=columns)
    frame["beta"] = pd.to_numeric(frame["beta"], errors="coerce")
    return frame.sort_values(["cell", "lr", "beta", "seed"], na_position="first").reset_index(drop=True)


def load_grid(path: Path) -> pd.DataFrame:
    """A cached grid file as `runs_frame` (for replaying it without training)."""
    return runs_frame(read_records(path))


# ---------------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------------
def point_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell and grid point: n, val_mean, test_mean, test_std, test_min, test_max, diverged (seed runs)."""
    keys = ["cell", "lr", "beta"]
    grouped = runs.groupby(keys, dropna=False, sort=True)
    out = grouped.agg(
        n=("seed", "size"),
        val_mean=("val_accuracy", "mean"),
        test_mean=("test_accuracy", "mean"),
        test_std=("test_accuracy", "std"),
        test_min=("test_accuracy", "min"),
        test_max=("test_accuracy", "max"),
        diverged=("status", lambda s: int((s == "diverged").sum())),
    )
    return out.reset_index()


def grid_best(points: pd.DataFrame) -> pd.DataFrame:
    """Per cell, the grid point with the highest mean validation accuracy (ties: more seeds, then smaller lr)."""
    ranked = points.sort_values(["cell", "val_mean", "n", "lr"], ascending=[True, False, False, True])
    return ranked.drop_duplicates("cell").reset_index(drop=True)


def read_study(folder: Path) -> pd.DataFrame:
    """A study's choice per cell from `cells.parquet` (or `cells.csv`): algorithm, batch_size, lr, beta, acc_mean,
    n_seeds, acc_std; missing columns are NaN. Raises FileNotFoundError naming what it looked for."""
    for name in ("cells.parquet", "cells.csv"):
        path = folder / name
        if path.exists():
            frame = pd.read_parquet(path) if name.endswith("parquet") else pd.read_csv(path)
            break
    else:
        raise FileNotFoundError(f"no cells.parquet or cells.csv in {folder} (run the study, or give its --out)")
    for column in ("algorithm", "batch_size", "lr", "beta", "acc_mean", "acc_std", "n_seeds"):
        if column not in frame:
            frame[column] = math.nan
    if "workers" in frame and frame["workers"].nunique() > 1:  # one row per cell: the single-worker runs
        frame = frame[frame["workers"] == frame["workers"].min()]
    frame = frame.dropna(subset=["algorithm", "batch_size"])
    frame["cell"] = frame["algorithm"].astype(str) + "-" + frame["batch_size"].astype(int).astype(str)
    return frame[["cell", "lr", "beta", "acc_mean", "acc_std", "n_seeds"]].drop_duplicates("cell")


def nearest_point(points: pd.DataFrame, lr: float, beta: float) -> pd.Series | None:
    """The grid point nearest (lr, beta) in log space (beta ignored where the cell has none), or None."""
    if not (isinstance(lr, (int, float)) and lr > 0) or points.empty:
        return None
    distance = np.abs(np.log(points["lr"].to_numpy()) - math.log(lr))
    if points["beta"].notna().all() and isinstance(beta, (int, float)) and beta > 0:
        distance = distance + np.abs(np.log10(points["beta"].to_numpy()) - math.log10(beta))
    return points.iloc[int(np.argmin(distance))]


def adequacy_table(points: pd.DataFrame, study: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per cell: the grid's best point and its test accuracy beside the study's choice; gap in points."""
    rows = []
    for _, best in grid_best(points).iterrows():
        row = {
            "cell": best["cell"],
            "points": int((points["cell"] == best["cell"]).sum()),
            "runs": int(points.loc[points["cell"] == best["cell"], "n"].sum()),
            "grid_lr": best["lr"],
            "grid_beta": best["beta"],
            "grid_val": best["val_mean"],
            "grid_test": best["test_mean"],
            "grid_n": int(best["n"]),
            "grid_std": best["test_std"],
            "grid_min": best["test_min"],
            "grid_max": best["test_max"],
        }
        chosen = study[study["cell"] == best["cell"]] if study is not None else pd.DataFrame()
        if len(chosen):
            c = chosen.iloc[0]
            near = nearest_point(points[points["cell"] == best["cell"]], c["lr"], c["beta"])
            row.update(
                study_lr=c["lr"],
                study_beta=c["beta"],
                study_test=c["acc_mean"],
                study_n=c["n_seeds"],
                grid_at_study=near["test_mean"] if near is not None else math.nan,
                gap=100 * (best["test_mean"] - c["acc_mean"]),
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _num(value, fmt: str) -> str:
    try:
        return "-" if value is None or not math.isfinite(float(value)) else format(float(value), fmt)
    except (TypeError, ValueError):
        return "-"


def format_table(table: pd.DataFrame) -> str:
    """The side-by-side table (accuracies in %)."""
    header = (
        f"{'cell':<20} {'points':>6} {'runs':>5} | {'grid best lr':>12} {'beta':>7} {'val %':>6} "
        f"{'test % (n, sd, range)':>27} | {'study lr':>8} {'beta':>7} {'test %':>7} {'n':>2} "
        f"{'grid@study':>10} {'gap':>6}"
    )
    lines = [header]
    for _, r in table.iterrows():
        spread = f"{_num(100 * r['grid_min'], '.1f')}-{_num(100 * r['grid_max'], '.1f')}"
        grid = f"{100 * r['grid_test']:.1f} ({r['grid_n']}, {_num(100 * r['grid_std'], '.1f')}, {spread})"
        lines.append(
            f"{r['cell']:<20} {r['points']:>6} {r['runs']:>5} | {_num(r['grid_lr'], '.3g'):>12} "
            f"{_num(r['grid_beta'], '.2g'):>7} {100 * r['grid_val']:>6.1f} {grid:>27} | "
            f"{_num(r.get('study_lr'), '.3g'):>8} {_num(r.get('study_beta'), '.2g'):>7} "
            f"{_num(100 * r.get('study_test', math.nan), '.1f'):>7} {_num(r.get('study_n'), '.0f'):>2} "
            f"{_num(100 * r.get('grid_at_study', math.nan), '.1f'):>10} {_num(r.get('gap'), '+.1f'):>6}"
        )
    return "\n".join(lines)


def format_profile(points: pd.DataFrame) -> str:
    """Per cell, the mean validation (and test) accuracy per step size at its best β: the shape of the optimum."""
    lines = []
    for cell, rows in points.groupby("cell", sort=True):
        best = rows.sort_values("val_mean", ascending=False).drop_duplicates("lr").sort_values("lr")
        lines.append(f"# {cell}: lr -> val % / test % (n) at the best beta")
        for _, r in best.iterrows():
            beta = "" if pd.isna(r["beta"]) else f" beta {r['beta']:.2g}"
            lines.append(
                f"#   {r['lr']:>8.4g}{beta:<12} {100 * r['val_mean']:5.1f} / {100 * r['test_mean']:5.1f} ({r['n']})"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cells",
        type=parse_cell,
        nargs="+",
        default=[parse_cell(c) for c in DEFAULT_CELLS],
        metavar="ALG-B",
        help=f"cells to grid (default: {' '.join(DEFAULT_CELLS)})",
    )
    p.add_argument("--dataset", default="mnist1d", choices=DATASETS)
    p.add_argument("--model", default="cnn", choices=MODELS)
    p.add_argument("--micro-batch", type=_int_at_least(1), default=32, help="b: each client's batch (default 32)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-examples",
        type=_int_at_least(1),
        default=None,
        help=f"training examples per run (default {BUDGET_EXAMPLES}, the default study's)",
    )
    budget.add_argument(
        "--epochs",
        type=_positive_float,
        default=None,
        help="budget in epochs of the training split instead (rounded up to a multiple of every batch size)",
    )
    p.add_argument("--lr-values", type=_positive_float, nargs="+", default=list(DEFAULT_LR), metavar="LR")
    p.add_argument(
        "--lr-grid",
        type=str,
        default=None,
        metavar="LOW,HIGH,N",
        help="N log-spaced step sizes from LOW to HIGH instead of --lr-values (default: 0.001..2.048, 18 points)",
    )
    p.add_argument(
        "--beta-values",
        type=_positive_float,
        nargs="+",
        default=list(DEFAULT_BETA),
        metavar="BETA",
        help="GradAlign's β values (default: 1e-4..1, two per decade)",
    )
    p.add_argument(
        "--full-beta",
        type=_lr_band,
        default=(0.02, 0.8),
        metavar="LOW,HIGH",
        help="step sizes between which every β value is run; outside, every other one (default 0.02,0.8)",
    )
    p.add_argument("--seeds", type=_int_at_least(1), default=2, help="seeds at every grid point (default 2)")
    p.add_argument(
        "--top-seeds",
        type=_int_at_least(0),
        default=4,
        help="seeds at the points within --top-margin of the cell's best mean validation accuracy (default 4)",
    )
    p.add_argument("--top-margin", type=float, default=0.05, help="validation accuracy margin (default 0.05)")
    p.add_argument("--seed-offset", type=_int_at_least(0), default=100, help="seeds are OFFSET, OFFSET+1, ...")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--lr-schedule", default="cosine", choices=("constant", "linear", "cosine"))
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--study", type=Path, default=None, help="a study's output folder: its choices per cell beside the grid"
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "gradalign" / "tuning-grids",
        help="where the runs are cached, one JSON-lines file per cell grid (default: %(default)s)",
    )
    p.add_argument(
        "--recipe-studies",
        type=_int_at_least(0),
        default=0,
        help="also tune each cell this many times with gradalign.tuning's recipe (real runs, no snapping) and "
        "train each choice on --final-seeds fresh seeds",
    )
    p.add_argument("--final-seeds", type=_int_at_least(1), default=3, help="seeds of a recipe's choice (default 3)")
    p.add_argument("--lr-range", type=_lr_band, default=(0.001, 0.5), help="the recipe's initial step-size range")
    p.add_argument("--beta-range", type=_lr_band, default=(1e-4, 1.0), help="the recipe's initial β range")
    p.add_argument("--profile", action="store_true", help="also print each cell's accuracy against step size")
    p.add_argument("--csv", type=Path, default=None, help="write the per-point table (mean, n, spread) here")
    p.add_argument("--threads", type=_int_at_least(1), default=1, help="torch threads (default 1)")
    return p


def resolve(args: argparse.Namespace) -> None:
    """Check the input (ConfigError names the option and value) and fill in the budget and training-set size."""
    if args.lr_grid is not None:
        try:
            low, high, n = args.lr_grid.split(",")
            low, high, n = float(low), float(high), int(n)
        except ValueError:
            raise ConfigError("lr_grid", args.lr_grid, "write LOW,HIGH,N, e.g. 0.001,2,20") from None
        if not (0 < low < high) or n < 2:
            raise ConfigError("lr_grid", args.lr_grid, "need 0 < LOW < HIGH and N >= 2")
        args.lr_values = [float(v) for v in np.geomspace(low, high, n)]
    args.lr_values = sorted(set(args.lr_values))
    args.beta_values = sorted(set(args.beta_values))
    for cell in args.cells:
        if cell.algorithm != "sgd" and cell.batch_size % args.micro_batch:
            raise ConfigError("cells", cell.name, f"B must be a multiple of the micro-batch b={args.micro_batch}")
    if not 0 < args.val_fraction < 1:
        raise ConfigError("val_fraction", args.val_fraction, "must lie in (0, 1)")
    data = load_dataset(args.dataset)
    args.train_size = len(with_validation(data, args.val_fraction, 0).y_train)
    if args.epochs is not None:
        unit = math.lcm(*(c.batch_size for c in args.cells))
        args.budget_examples = unit * math.ceil(args.epochs * args.train_size / unit)
    elif args.budget_examples is None:
        args.budget_examples = BUDGET_EXAMPLES
    for cell in args.cells:  # every corner is a valid configuration
        cell_config(cell, args, args.lr_values[0], args.beta_values[0])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = build_parser()
    args = parser.parse_args(argv)
    study = None
    try:
        resolve(args)
        if args.study is not None:
            study = read_study(args.study)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_points = {c.name: len(grid_points(c, args.lr_values, args.beta_values, args.full_beta)) for c in args.cells}
    print(
        f"# {args.dataset}/{args.model}, b = {args.micro_batch}, {args.budget_examples} examples per run, momentum "
        f"{args.momentum:g}, {args.lr_schedule} schedule with {args.warmup:g} warmup; grid points per cell: "
        + ", ".join(f"{k} {v}" for k, v in n_points.items())
        + f"; {args.seeds} seeds each, up to {args.top_seeds} within {args.top_margin:g} of the best; "
        f"cache {args.cache}",
        flush=True,
    )
    progress = Progress({c.name: missing_base_runs(c, args) for c in args.cells})
    runs = pd.concat([run_cell(cell, args, progress) for cell in args.cells], ignore_index=True)
    points = point_table(runs)
    if args.csv is not None:
        points.to_csv(args.csv, index=False)
    if args.profile:
        print(format_profile(points))
    table = adequacy_table(points, study)
    if args.recipe_studies:
        progress.add({c.name: args.recipe_studies * (RECIPE.cost() + args.final_seeds) for c in args.cells})
        tuned = pd.DataFrame(
            [tune_with_recipe(c, args, progress, k) for c in args.cells for k in range(args.recipe_studies)]
        )
        table = table.merge(recipe_summary(tuned), on="cell", how="left")
        print(format_recipe(tuned, table))
    print(format_table(table), flush=True)
    return table


def recipe_summary(tuned: pd.DataFrame) -> pd.DataFrame:
    """Per cell: the recipe's studies (mean test accuracy of their choices, worst, mean runs)."""
    grouped = tuned.groupby("cell")
    return pd.DataFrame(
        {
            "recipe_test": grouped["test"].mean(),
            "recipe_worst": grouped["test"].min(),
            "recipe_studies": grouped.size(),
            "recipe_runs": grouped["runs"].mean(),
        }
    ).reset_index()


def format_recipe(tuned: pd.DataFrame, table: pd.DataFrame) -> str:
    """A line per recipe study: its choice, the choice's test accuracy on fresh seeds, the gap to the grid's best."""
    best = table.set_index("cell")["grid_test"]
    lines = [f"# {'recipe study':<24} {'lr':>8} {'beta':>8} {'test % (n, sd)':>18} {'gap':>6} {'runs':>5} ext"]
    for r in tuned.itertuples():
        beta = "-" if r.beta is None or pd.isna(r.beta) else f"{r.beta:.3g}"
        test = f"{100 * r.test:.1f} ({r.n}, {_num(100 * r.test_std, '.1f')})"
        gap = 100 * (best[r.cell] - r.test)
        lines.append(
            f"# {r.cell + ' #' + str(r.study):<24} {r.lr:>8.4g} {beta:>8} {test:>18} {gap:>+6.1f} {r.runs:>5} "
            f"{r.extensions}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
