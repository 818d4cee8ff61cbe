"""From a study's history to its findings: the cells table, warnings, comparisons, summary.json and report.html.

Everything here reads the study's protocol (`gradalign.protocol.StudyProtocol`, recorded in `study.json`) for the
target, the ranges, the budget and the tolerance, never the command line: a report rebuilt with `--report-only`
states the protocol of the run that made the data. Pure pandas: no Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from .analysis import COUNTER, best_trials, collapsed_seeds, edge_warnings, summarize_cells, trial_table
from .protocol import StudyProtocol
from .provenance import provenance
from .report import significance_tables, write_report
from .tables import save_table


def scientific_group(history: pd.DataFrame, x: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """algorithm x the study's axis, plus any axis that varies (workers, ...)."""
    group = ["algorithm", x, *extra]
    if "workers" in history and history["workers"].nunique() > 1:
        group.append("workers")
    return tuple(dict.fromkeys(group))


def build_report(
    out: Path,
    history: pd.DataFrame,
    protocol: StudyProtocol,
    *,
    x: str,
    title: str,
    command: str,
    extra_axes: Sequence[str] = (),
    comparisons: Sequence[tuple[str, str]] = (("gradalign", "large_batch_sgd"),),
    reference: str | None = "sgd",
    by: str | None = None,
    figures: Callable[[pd.DataFrame, pd.DataFrame], list] | None = None,
    cost: str = "steps_to_target",
    num_classes: int | None = None,
    verdict: Callable[[pd.DataFrame, pd.DataFrame, pd.DataFrame], list[str]] | None = None,
    export: Sequence[str] = (),
) -> Path:
    """Write cells.{parquet,csv}, summary.json and report.html into `out`; returns the report's path.

    `comparisons` are tested at each value of `x`; every algorithm is also tested against `reference` (the
    small-batch SGD cell, which sits at one batch size only), to give the gap to the reference at each x.
    Significance is computed per value of `by` (default `x`) on the final test accuracy and on `cost` (to the
    target); `figures(history, cells)` replaces the default figures. Seed runs that collapsed (far below their
    cell's others, or at chance for `num_classes`) are warned about. `verdict(history, cells, significance)` gives
    the plain sentences that open the report (and summary.json's "verdict"; `print_outcome` prints them).
    `export` (png, svg, pdf) also writes the report's figures as out/figures/<figure_id>.<format>.
    """
    target, search_ranges = protocol.target, protocol.search_ranges()
    save_table(history, out / "history")  # (derived from the cells' tables: rebuilt here when missing or damaged)
    group = scientific_group(history, x, extra_axes)
    cells = summarize_cells(history, target, group=group)
    save_table(cells, out / "cells")
    tuned = history[history["phase"] == "tune"]
    # the configuration a cell chose is the one its seed runs ran; for a cell without seed runs yet, its best tuning
    # trial (best_trials picks it by the study's own rule, studies.cells.best_config)
    seeded = history[history["phase"] == "seed"]
    unseeded = ~tuned.set_index(list(group)).index.isin(seeded.set_index(list(group)).index)
    chosen = pd.concat([seeded, tuned[unseeded]])
    warnings = (
        edge_warnings(best_trials(chosen, group=group, reduce="last"), search_ranges, label=group)
        if len(chosen)
        else []
    )
    warnings += _divergence_warnings(history)
    warnings += _collapse_warnings(history, group, num_classes)
    sig = compare(history, by or x, target, comparisons, reference, cost)
    summary = {
        "target accuracy": target,
        "cells with seed runs": int(len(cells)),
        "tuning trials": int(tuned["trial_id"].nunique()) if len(tuned) else 0,
        "seed runs": int(history.loc[history["phase"] == "seed", "trial_id"].nunique()),
        **headline(cells, sig, by or x),
    }
    prov = {"command": command, **provenance()}
    sentences = verdict(history, cells, sig) if verdict is not None and len(cells) else []
    budget = protocol.description()
    record = {
        "title": title,
        "protocol": protocol.to_json(),
        "verdict": sentences,
        "summary": summary,
        "warnings": warnings,
        "budget": dict(budget),
        "provenance": prov,
        "significance": sig.to_dict(orient="records"),
        "cells": cells.to_dict(orient="records"),
    }
    (out / "summary.json").write_text(json.dumps(_strict(record), indent=2, default=str))
    return write_report(
        out / "report.html",
        history,
        cells,
        summary,
        warnings,
        prov,
        budget,
        title=title,
        x=x,
        significance_table=sig,
        figures=figures(history, cells) if figures else None,
        verdict=sentences,
        export=export,
    )


def print_outcome(out: Path, report: Path) -> None:
    """The last lines of a study's output: where its files are, then its verdict."""
    print(
        f"report: {report}\ntables: {out}/history.parquet, {out}/cells.parquet (and .csv), summary: {out}/summary.json"
    )
    sentences = json.loads((out / "summary.json").read_text()).get("verdict") or []
    if sentences:
        print("\nverdict:\n" + "\n".join(f"- {s}" for s in sentences), flush=True)


def compare(
    history: pd.DataFrame,
    x: str,
    target: float,
    comparisons: Sequence[tuple[str, str]],
    reference: str | None,
    cost: str = "steps_to_target",
) -> pd.DataFrame:
    """Welch comparisons over seeds: each pair in `comparisons` per value of x, and every algorithm vs the
    reference."""
    parts = [significance_tables(history, by=x, target=target, comparisons=comparisons, cost=cost)]
    seeds = history[history["phase"] == "seed"]
    if reference and reference in set(seeds["algorithm"]):
        ref = seeds[seeds["algorithm"] == reference]
        others = seeds[seeds["algorithm"] != reference]
        # the reference runs at one x (its own batch size): compare it with every x of the other algorithms
        copies = [
            ref.assign(**{x: value, "trial_id": ref["trial_id"].astype(str) + f"@{value}"})
            for value in sorted(others[x].dropna().unique())
        ]
        if copies:
            paired = pd.concat([others, *copies], ignore_index=True)
            pairs = [(a, reference) for a in sorted(others["algorithm"].unique())]
            parts.append(significance_tables(paired, by=x, target=target, comparisons=pairs, cost=cost))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def headline(cells: pd.DataFrame, sig: pd.DataFrame, x: str) -> dict[str, str]:
    """One line per compared value of x: the test-accuracy difference, its 95% CI, p-value and n (never one lucky
    run)."""
    out = {}
    if sig.empty:
        return out
    acc = sig[sig["metric"] == "acc_final"]
    for row in acc.itertuples():
        value = getattr(row, x) if hasattr(row, x) else row[1]
        ci = (
            f", 95% CI [{row.ci_low:+.4f}, {row.ci_high:+.4f}], Welch p={row.p_value:.3g}"
            if math.isfinite(row.p_value)
            else ""
        )
        out[f"{row.a} - {row.b} at {x}={value}"] = (
            f"{row.diff:+.4f} test accuracy (n={row.n_a} vs {row.n_b}{ci}: {row.verdict})"
        )
    return out


def _divergence_warnings(history: pd.DataFrame) -> list[str]:
    last = history.sort_values(COUNTER).groupby(["phase", "cell", "trial_id"]).tail(1)
    out = []
    for (phase, cell), part in last.groupby(["phase", "cell"]):
        diverged = int((part["status"] == "diverged").sum())
        if phase == "seed" and diverged:
            out.append(f"{cell}: {diverged} of {len(part)} seed runs of the best configuration diverged")
        elif phase == "tune" and diverged == len(part):
            out.append(f"{cell}: every tuning trial diverged: lower the step-size range")
    return out


def _collapse_warnings(history: pd.DataFrame, group: Sequence[str], num_classes: int | None) -> list[str]:
    trials = trial_table(history, phase="seed", carry=group)
    out = []
    for row in collapsed_seeds(trials, group, num_classes).itertuples():
        others = trials[(trials["cell"] == row.cell) & (trials["trial_id"] != row.trial_id)]["acc_final"]
        out.append(
            f"{row.cell}: the seed-{int(row.seed)} run collapsed to {row.acc_final:.3f} test accuracy (the "
            f"cell's other seeds: {', '.join(f'{v:.3f}' for v in others)}) without diverging: the chosen "
            "configuration sits at the edge of stability (score the tuning on more seeds, --tuning-seeds, or "
            "narrow the lr range)"
        )
    return out


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    item = getattr(value, "item", None)
    return _strict(item()) if callable(item) and not isinstance(value, (str, bytes)) else value
