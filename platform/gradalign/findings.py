"""From a study's history to its findings: the cells table, warnings, comparisons, summary.json and report.html.

Everything here reads the study's protocol (`gradalign.protocol.StudyProtocol`, recorded in `study.json`) for the
target, the ranges, the budget and the tolerance, never the command line: a report rebuilt with `--report-only`
states the protocol of the run that made the data. Pure pandas: no Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .analysis import (
    COUNTER,
    best_trials,
    collapsed_seeds,
    edge_warnings,
    summarize_cells,
    trial_table,
    tuning_trials,
)
from .comparisons import comparison_records
from .critical_batch import critical_batch_intervals
from .figures import tuning_figure
from .protocol import StudyProtocol
from .provenance import provenance
from .report import comparison_table, write_report
from .tables import save_table


def scientific_group(history: pd.DataFrame, x: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """algorithm x the study's axis, plus any axis that varies (workers, ...)."""
    group = ["algorithm", x, *extra]
    if "workers" in history and history["workers"].nunique() > 1:
        group.append("workers")
    return tuple(dict.fromkeys(group))


@dataclass(frozen=True)
class Evidence:
    """What a verdict is made from: the history, the cells table, the seed runs (one row each), the comparison
    records (`gradalign.comparisons`) and, on a batch-size axis, the critical-batch fits with intervals."""

    history: pd.DataFrame
    cells: pd.DataFrame
    trials: pd.DataFrame
    records: list[dict]
    critical: dict = field(default_factory=dict)


def comparisons_of(protocol: StudyProtocol, trials: pd.DataFrame) -> list[dict]:
    """The study's comparison records: final test accuracy (what the verdict and the seed rounds decide on), then
    the cost to the target (less is better; no tolerance)."""
    spec = protocol.compare
    if trials.empty or not (spec.pairs or spec.reference):
        return []
    common = dict(x=spec.x, pairs=spec.pairs, reference=spec.reference, design=protocol.design, within=spec.within)
    records = comparison_records(trials, metric="acc_final", tolerance=protocol.tolerance, **common)
    if spec.cost in trials.columns:
        records += comparison_records(trials, metric=spec.cost, tolerance=0.0, larger_is_better=False, **common)
    return records


def build_report(
    out: Path,
    history: pd.DataFrame,
    protocol: StudyProtocol,
    *,
    x: str,
    title: str,
    command: str,
    extra_axes: Sequence[str] = (),
    figures: Callable[[pd.DataFrame, pd.DataFrame], list] | None = None,
    num_classes: int | None = None,
    verdict: Callable[[Evidence], list[str]] | None = None,
    export: Sequence[str] = (),
) -> Path:
    """Write history and cells (.parquet, .csv), summary.json and report.html into `out`; returns the report's path.

    The comparisons are the protocol's (`protocol.compare`), one record each (`gradalign.comparisons`: difference,
    interval, n, paired or not, outcome, seeds that would decide it), on the final test accuracy and on the cost to
    the target; summary.json lists them under "comparisons". On a batch-size axis the critical batch size of each
    algorithm gets a bootstrap interval. `figures(history, cells)` replaces the default figures. Seed runs that
    collapsed (far below their cell's others, or at chance for `num_classes`) are warned about. `verdict(evidence)`
    gives the plain sentences that open the report (and summary.json's "verdict"; `print_outcome` prints them).
    `export` (png, svg, pdf) also writes the report's figures as out/figures/<figure_id>.<format>.
    """
    target, search_ranges, spec = protocol.target, protocol.search_ranges(), protocol.compare
    save_table(history, out / "history")  # (derived from the cells' tables: rebuilt here when missing or damaged)
    group = scientific_group(history, x, extra_axes)
    cells = summarize_cells(history, target, group=group)
    save_table(cells, out / "cells")
    tuned = history[history["phase"] == "tune"]
    # the configuration a cell chose is the one its seed runs ran; for a cell without seed runs yet, its best tuning
    # trial (best_trials picks it by the study's own rule, ray_adapter.engine.best_config)
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
    carry = list(dict.fromkeys([*group, spec.x, *([spec.within] if spec.within else [])]))
    trials = trial_table(history, target, phase="seed", carry=[c for c in carry if c in history.columns])
    records = comparisons_of(protocol, trials)
    critical = {}
    if x == "batch_size" and len(trials) and spec.cost == "steps_to_target":
        scaled = sorted(a for a in trials["algorithm"].dropna().unique() if a != spec.reference)
        pairs = [p for p in spec.pairs if p[0] in scaled and p[1] in scaled]
        critical = critical_batch_intervals(trials, scaled, pairs=pairs)
    evidence = Evidence(history, cells, trials, records, critical)
    summary = {
        "target accuracy": target,
        "cells with seed runs": int(len(cells)),
        "tuning trials": int(tuned["trial_id"].nunique()) if len(tuned) else 0,
        "seed runs": int(seeded["trial_id"].nunique()) if len(seeded) else 0,
        **_outcome_counts(records),
    }
    prov = {"command": command, **provenance()}
    sentences = verdict(evidence) if verdict is not None and len(cells) else []
    budget = protocol.description()
    record = {
        "title": title,
        "protocol": protocol.to_json(),
        "verdict": sentences,
        "summary": summary,
        "comparisons": records,
        "critical_batch": {k: v for k, v in critical.items()},
        "warnings": warnings,
        "budget": dict(budget),
        "provenance": prov,
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
        significance_table=comparison_table(records),
        figures=figures(history, cells) if figures else None,
        verdict=sentences,
        export=export,
        fits=critical.get("fits") if critical else None,
        extra_figures=[tuning_figure_of(history, protocol)],
    )


def tuning_figure_of(history: pd.DataFrame, protocol: StudyProtocol) -> tuple[str, str, object]:
    """The report's tuning figure: every tuning trial of every cell against its step size, with the range searched
    and the configuration chosen, so a reader sees whether each cell's optimum was bracketed."""
    trials = tuning_trials(history, protocol.objective)
    caption = (
        f"Every tuning trial's {protocol.objective.replace('_', ' ')} at the end of its budget against its step size, "
        "per cell (colour: log10 β where it is searched; open circles: stopped early by ASHA; crosses: diverged; "
        "star: the configuration the seed runs ran; dashed: the step-size range searched)."
    )
    return "fig-tuning", caption, tuning_figure(trials, protocol.search_ranges())


def _outcome_counts(records: Sequence[Mapping]) -> dict[str, str]:
    """'comparisons of test accuracy': '3 better, 1 worse, 2 equivalent, 4 undetermined (n = ...)'."""
    acc = [r for r in records if r["metric"] == "acc_final"]
    if not acc:
        return {}
    counts = {o: sum(r["outcome"] == o for r in acc) for o in ("better", "worse", "equivalent", "undetermined")}
    return {"comparisons of test accuracy": ", ".join(f"{n} {o}" for o, n in counts.items() if n)}


def print_outcome(out: Path, report: Path) -> None:
    """The last lines of a study's output: where its files are, then its verdict."""
    print(
        f"report: {report}\ntables: {out}/history.parquet, {out}/cells.parquet (and .csv), summary: {out}/summary.json"
    )
    sentences = json.loads((out / "summary.json").read_text()).get("verdict") or []
    if sentences:
        print("\nverdict:\n" + "\n".join(f"- {s}" for s in sentences), flush=True)


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
