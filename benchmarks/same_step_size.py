"""Is a difference between two cells of a study the algorithms', or where their tuning landed? Swap step sizes.

    python benchmarks/same_step_size.py --study results/batch-scaling --cells gradalign-B256 large_batch_sgd-B256

Reads each cell's chosen configuration and final seed runs from the study's `history.parquet`, trains each cell
again on the same seeds with the OTHER cell's step size (everything else as the study chose it: β, momentum,
schedule, budget, split), and prints four paired comparisons A - B of final test accuracy, in points: as the study
chose (its own numbers), and at each of the two step sizes. If the difference vanishes at a common step size, the
study's difference came from the step sizes its tuning picked, not from the algorithms; then tune more (more trials
per cell) or check the cells against a dense grid (`tuning_adequacy.py --study`) before calling it a finding.

Diagnostic only: it reads test accuracy of configurations the study already fixed on validation, and chooses nothing.
Runs through the library on this machine (no Ray), one seed after another.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pandas as pd

from gradalign import TrainConfig, Trainer
from gradalign.comparisons import t_interval

FIELDS = set(TrainConfig.__dataclass_fields__)


def chosen_config(history: pd.DataFrame, cell: str) -> dict:
    """The TrainConfig fields of `cell`'s seed runs (the chosen configuration), without the seed."""
    rows = history[(history["phase"] == "seed") & (history["cell"] == cell)]
    if rows.empty:
        cells = sorted(history.loc[history["phase"] == "seed", "cell"].unique())
        raise SystemExit(f"error: --cells {cell}: no seed runs of that cell in the study (cells: {', '.join(cells)})")
    last = rows.iloc[-1]
    config = {}
    for name in FIELDS & set(rows.columns):
        value = last[name]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        config[name] = value.item() if hasattr(value, "item") else value
    config.pop("seed", None)
    return config


def final_test(history: pd.DataFrame, cell: str) -> pd.Series:
    """Final test accuracy per seed of `cell`'s seed runs."""
    rows = history[(history["phase"] == "seed") & (history["cell"] == cell)]
    return rows.sort_values("evaluation", kind="stable").groupby("seed")["test_accuracy"].last()


def train(config: dict, seeds: list[int], label: str) -> pd.Series:
    out, start = {}, time.perf_counter()
    for i, seed in enumerate(seeds, 1):
        metrics = Trainer(TrainConfig(**{**config, "seed": seed})).fit()
        out[seed] = float(metrics[-1]["test_accuracy"])
        left = (time.perf_counter() - start) / i * (len(seeds) - i)
        print(f"# {label} seed {seed}: test {out[seed]:.3f} ({i}/{len(seeds)}, ETA {left:.0f} s)", flush=True)
    return pd.Series(out)


def line(label: str, a: pd.Series, b: pd.Series) -> str:
    both = a.index.intersection(b.index)
    r = t_interval(a[both].to_numpy(), b[both].to_numpy(), paired=True)
    return (
        f"{label:<44} {100 * r['mean_a']:6.1f} {100 * r['mean_b']:6.1f} {100 * r['diff']:+7.1f}  "
        f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]  {len(both)}"
    )


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", type=Path, required=True, help="a study's output folder (with history.parquet)")
    p.add_argument("--cells", nargs=2, required=True, metavar=("A", "B"), help="two cells, e.g. gradalign-B256 ...")
    args = p.parse_args(argv)
    table = args.study / "history.parquet"
    if not table.is_file():
        p.error(f"--study {args.study}: no history.parquet there (run the study, or --report-only to rebuild it)")
    history = pd.read_parquet(table)
    a_name, b_name = args.cells
    a_cfg, b_cfg = chosen_config(history, a_name), chosen_config(history, b_name)
    a_runs, b_runs = final_test(history, a_name), final_test(history, b_name)
    seeds = sorted(set(a_runs.index) & set(b_runs.index))
    if len(seeds) < 2:
        p.error(f"--cells {a_name} {b_name}: fewer than 2 seeds in common")
    a_lr, b_lr = a_cfg["lr"], b_cfg["lr"]
    a_at_b = train({**a_cfg, "lr": b_lr}, seeds, f"{a_name} at lr {b_lr:.3g}")
    b_at_a = train({**b_cfg, "lr": a_lr}, seeds, f"{b_name} at lr {a_lr:.3g}")
    out = [
        f"# {args.study}: {a_name} (lr {a_lr:.3g}) vs {b_name} (lr {b_lr:.3g}); final test accuracy %, paired by "
        "seed, 95% CI",
        f"{'comparison A - B':<44} {'A':>6} {'B':>6} {'diff':>7}  CI             n",
        line("as the study chose", a_runs, b_runs),
        line(f"both at lr {b_lr:.3g} ({b_name}'s)", a_at_b, b_runs),
        line(f"both at lr {a_lr:.3g} ({a_name}'s)", a_runs, b_at_a),
    ]
    print("\n".join(out), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
