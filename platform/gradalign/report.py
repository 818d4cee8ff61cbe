"""One self-contained HTML report of a scaling study (opens offline: plotly.js is embedded once, in the head).

Input is the *history* frame, one row per (trial_id, evaluation), with columns
  study, cell, phase ('tune' | 'seed'), trial_id, algorithm, batch_size (global), clients, workers, lr, beta, momentum,
  weight_decay, local_steps, mu, participation, alpha, partition, seed, evaluation, epochs, steps, rounds, examples,
  communications, messages, values_sent, train_loss, val_loss, val_accuracy, test_loss, test_accuracy (in [0, 1]),
  grad_variance, grad_cosine, grad_norm_sq, gns_simple, gns_trace, gns_grad_sq, label_tv,
  wall_time (s since trial start), status ('running' | 'completed' | 'diverged' | 'error' | 'stopped'),
  git_commit, python, torch, ray, optuna, hardware,
plus the cells frame of `gradalign.analysis.summarize_cells`. Sections: overview (title, command, summary),
budget & fixed parameters, figures, cells, significance, warnings, provenance. With `export=("png", "pdf", ...)` the
same figure objects are also written as static files in `figures/` next to the report (see `gradalign.export`).

The same code serves the federated study: pass `x="alpha"` (or "participation"); the McCandlish scaling figure
only appears when x is the batch size.
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from . import figures as F
from .analysis import CONFIG_COLUMNS, fit_critical_batches, noise_scale_from_history, significance
from .export import ExportUnavailable, parse_formats, write_figures

__all__ = [
    "default_figures",
    "critical_batch_table",
    "comparison_table",
    "fixed_parameters",
    "noise_by_algorithm",
    "provenance_from_history",
    "significance_tables",
    "write_report",
]

PROVENANCE_COLUMNS = ("git_commit", "python", "torch", "ray", "optuna", "hardware")
COMPARISONS = (
    ("gradalign", "large_batch_sgd"),
    ("gradalign", "sgd"),
    ("fedga", "fedavg"),
    ("fedga", "fedprox"),
    ("fedga", "scaffold"),
)
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
pre { background: #f5f5f5; padding: 0.6em; overflow-x: auto; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td.text, th.text { text-align: left; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
.warning { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.4em 0.8em; margin: 0.3em 0; }
.ok { color: #2a7a2a; }
.verdict { background: #eef5ff; border-left: 4px solid #3070c0; padding: 0.2em 1em; margin: 0.6em 0; }
.verdict h2 { border: none; margin-top: 0.4em; } .verdict li { margin: 0.3em 0; font-size: 1.05em; }
"""


def _fmt(value) -> str:
    """A table cell: NaN as an en dash, integers without decimals, floats to 4 significant digits."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if isinstance(value, Mapping):
        return json.dumps({str(k): v for k, v in value.items()}, default=str)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _table(frame: pd.DataFrame, empty: str = "No rows.") -> str:
    """An HTML table of formatted values (escaped); all-NaN columns are left out."""
    if frame is None or frame.empty:
        return f"<p>{html.escape(empty)}</p>"
    frame = frame.loc[:, frame.notna().any(axis=0)]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _cell(value) -> str:
    numeric = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
    return f"<td>{html.escape(_fmt(value))}</td>" if numeric else f'<td class="text">{html.escape(_fmt(value))}</td>'


def _dict_table(values: Mapping, empty: str = "Nothing recorded.") -> str:
    if not values:
        return f"<p>{html.escape(empty)}</p>"
    rows = "".join(
        f'<tr><th class="text">{html.escape(str(k))}</th><td class="text">{html.escape(_fmt(v))}</td></tr>'
        for k, v in values.items()
    )
    return f"<table><tbody>{rows}</tbody></table>"


def fixed_parameters(history: pd.DataFrame) -> dict:
    """Configuration columns that hold one value across the whole history (the fixed hyperparameters)."""
    out = {}
    for column in CONFIG_COLUMNS:
        if column in history.columns and column != "cell":
            values = history[column].dropna().unique()
            if len(values) == 1:
                out[column] = values[0].item() if hasattr(values[0], "item") else values[0]
    return out


def provenance_from_history(history: pd.DataFrame) -> dict:
    """The provenance columns' distinct values (more than one commit or library version is worth seeing)."""
    out = {}
    for column in PROVENANCE_COLUMNS:
        if column in history.columns:
            values = [str(v) for v in history[column].dropna().unique()]
            if values:
                out[column] = ", ".join(values)
    return out


def critical_batch_table(fits: Mapping[str, dict], noise: Mapping[str, float]) -> pd.DataFrame:
    """Per algorithm: fitted S_min, E_min, B_crit (McCandlish) next to the predicted B_simple; with the bootstrap's
    95% intervals when the fits carry them (`gradalign.critical_batch.critical_batch_intervals`)."""
    rows = []
    for name, fit in fits.items():
        row = {"algorithm": name, "S_min": fit["S_min"], "E_min": fit["E_min"], "B_crit (fit)": fit["B_crit"]}
        if "B_crit_low" in fit:
            row.update({f"B_crit {end}": fit[f"B_crit_{end}"] for end in ("low", "high")})
        row.update(
            {
                "B_simple (predicted)": noise.get(name, np.nan),
                "points": fit["n_points"],
                "rms log residual": fit["rms_log_residual"],
                "note": fit["reason"] or "",
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


COMPARISON_COLUMNS = (
    "a",
    "b",
    "x",
    "metric",
    "diff",
    "ci_low",
    "ci_high",
    "level",
    "n_a",
    "n_b",
    "paired",
    "tolerance",
    "outcome",
    "n_needed",
    "n_needed_reason",
    "reason",
)


def comparison_table(records: Sequence[Mapping]) -> pd.DataFrame:
    """The comparison records (`gradalign.comparisons.comparison_records`) as the report's table: one row each, the
    columns of `COMPARISON_COLUMNS` that the records have (pass it as `write_report(significance_table=...)`)."""
    frame = pd.DataFrame([dict(r) for r in records])
    return frame[[c for c in COMPARISON_COLUMNS if c in frame.columns]] if len(frame) else frame


def significance_tables(
    history: pd.DataFrame,
    by: str = "batch_size",
    target: float | None = None,
    comparisons: Sequence[tuple[str, str]] = COMPARISONS,
    cost: str = "steps_to_target",
) -> pd.DataFrame:
    """Welch comparisons (difference, 95% CI, p, n) for every comparison whose two algorithms both appear: final
    test accuracy, and the `cost` to the target (steps; a federated study: communications)."""
    present = set(history["algorithm"].dropna()) if "algorithm" in history.columns else set()
    if by not in history.columns:
        return pd.DataFrame()
    metrics = ["acc_final"] + ([cost] if target is not None else [])
    parts = [
        significance(history, a, b, by=by, metric=m, target=target)
        for a, b in comparisons
        if a in present and b in present
        for m in metrics
    ]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def noise_by_algorithm(history: pd.DataFrame) -> dict:
    """B_simple pooled over all seed runs of an algorithm (tr(Sigma) and |G|^2 do not depend on the batch size)."""
    if "algorithm" not in history.columns:
        return {}
    table = noise_scale_from_history(history, group=("algorithm",))
    return {row.algorithm: row.B_simple for row in table.itertuples()}


def default_figures(
    history: pd.DataFrame,
    cells: pd.DataFrame,
    x: str = "batch_size",
    fits: Mapping[str, dict] | None = None,
    noise: Mapping[str, float] | None = None,
) -> list[tuple[str, str, go.Figure]]:
    """The standard figures as (id, caption, figure); the scaling figure only when `x` is the batch size."""
    out = [
        (
            "fig-accuracy",
            "Test accuracy at the end of the budget; error bars are the std over seeds.",
            F.accuracy_vs_x(cells, x=x),
        )
    ]
    if x == "batch_size":
        out.append(
            (
                "fig-scaling",
                "Dotted grey: perfect scaling. Dashed: McCandlish fit S = S_min(1 + B_crit/B). "
                "Stars and dashed verticals: fitted B_crit; dotted verticals: B_simple from the gradient noise.",
                F.steps_vs_batch(cells, fits=fits, noise=noise, x=x),
            )
        )
    out.append(
        (
            "fig-pareto-parallelism",
            "Cells not dominated in (parallelism, accuracy).",
            F.pareto_figure(cells, x=x, y="acc_mean", maximize_x=True),
        )
    )
    out.append(
        (
            "fig-pareto-time",
            "Cells not dominated in (wall time per run, accuracy).",
            F.pareto_figure(
                cells,
                x="wall_time_mean",
                y="acc_mean",
                maximize_x=False,
                title="Pareto frontier: test accuracy vs wall time (less is better)",
            ),
        )
    )
    out.append(
        (
            "fig-alignment",
            "V = mean_i ||g_i - g||^2 and the mean pairwise cosine of client gradients.",
            F.alignment_over_training(history, color=x),
        )
    )
    out.append(
        (
            "fig-hyperparameters",
            "The lr and beta the tuning phase chose for each cell.",
            F.hyperparameters_vs_x(cells, x=x),
        )
    )
    return out


def _comparisons_heading(table: pd.DataFrame | None) -> str:
    if table is not None and "outcome" in table.columns:
        return "Comparisons over seeds (paired t-test where the seeds are shared, else Welch)"
    return "Significance (Welch t-test over seeds)"


def _figure_html(fig_id: str, caption: str, fig: go.Figure, files: Mapping[str, Path] | None = None) -> str:
    div = fig.to_html(
        full_html=False, include_plotlyjs=False, div_id=fig_id, config={"responsive": True, "displaylogo": False}
    )
    links = " ".join(
        f'<a class="static" href="{html.escape(f"{p.parent.name}/{p.name}")}">{fmt.upper()}</a>'
        for fmt, p in (files or {}).items()
    )
    caption = html.escape(caption) + (f' <span class="static">Static copies: {links}</span>' if links else "")
    return f'<figure class="plot" data-figure="{fig_id}">{div}<figcaption>{caption}</figcaption></figure>'


def write_report(
    path: str | Path,
    history: pd.DataFrame,
    cells: pd.DataFrame,
    summary: Mapping,
    warnings: Sequence[str],
    provenance: Mapping,
    budget: Mapping,
    title: str = "GradAlign batch-scaling study",
    *,
    x: str = "batch_size",
    significance_table: pd.DataFrame | None = None,
    figures: Sequence[tuple[str, str, go.Figure]] | None = None,
    verdict: Sequence[str] = (),
    export: Sequence[str] = (),
    browser: str | None = None,
    fits: Mapping[str, dict] | None = None,
    extra_figures: Sequence[tuple[str, str, go.Figure]] = (),
) -> Path:
    """Write the study's report as ONE self-contained HTML file and return its path.

    `summary`: headline facts (e.g. target, best cell); `warnings`: messages (e.g. from `edge_warnings`);
    `provenance`: command, commit, versions, hardware (the history's provenance columns fill in what is missing);
    `budget`: the budget and how it is counted (steps or examples); `verdict`: the plain sentences that open the
    report (`gradalign.verdict`). `significance_table` defaults to
    `significance_tables(history, by=x, target)`; `figures` to `default_figures(history, cells, x)`.
    `export` (formats among png, svg, pdf) also writes each figure as `figures/<figure_id>.<format>` beside the
    report, with `browser` (default: `gradalign.export.find_browser()`); the HTML links them. The HTML is written
    even when the export fails (its error is raised afterwards). `extra_figures` come after the others. `fits` (per
    algorithm, e.g. the "fits" of `gradalign.critical_batch.critical_batch_intervals`, with intervals) replaces the
    McCandlish fits of the cells.
    """
    export = parse_formats(export) if export else ()  # an unknown format is refused before anything is written
    target = summary.get("target", cells["target"].iloc[0] if "target" in cells and len(cells) else None)
    noise = {}
    if x == "batch_size" and {"algorithm", "steps_to_target_mean"} <= set(cells.columns):
        fits, noise = (fit_critical_batches(cells) if fits is None else fits), noise_by_algorithm(history)
    fits = fits or {}
    if figures is None:
        figures = default_figures(history, cells, x=x, fits=fits, noise=noise)
    figures = [*figures, *extra_figures]
    if significance_table is None:
        significance_table = significance_tables(history, by=x, target=target)
    provenance = {**provenance_from_history(history), **provenance}
    command = provenance.get("command", summary.get("command", ""))
    cell_table = cells.drop(columns=[c for c in ("target",) if c in cells.columns])
    warn_html = (
        "".join(f'<div class="warning">{html.escape(str(w))}</div>' for w in warnings)
        or '<p class="ok">No warnings.</p>'
    )
    path, exported, failure = Path(path), {}, None
    if export:
        try:
            exported = write_figures(figures, path.parent / "figures", export, browser=browser)
        except ExportUnavailable as err:  # the interactive report is worth having all the same: raised at the end
            failure = err
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    verdict_html = "".join(f"<li>{html.escape(s)}</li>" for s in verdict)
    sections = [
        f'<section id="overview"><h1>{html.escape(title)}</h1>'
        + (f'<div id="verdict" class="verdict"><h2>Verdict</h2><ul>{verdict_html}</ul></div>' if verdict else "")
        + f"<p>Generated {stamp}.</p>"
        f'<pre class="command">{html.escape(str(command) or "(command not recorded)")}</pre>'
        f"{_dict_table(summary, 'No summary.')}"
        + (f"<h3>Critical batch size</h3>{_table(critical_batch_table(fits, noise))}" if fits else "")
        + "</section>",
        f'<section id="budget"><h2>Budget and fixed parameters</h2>{_dict_table(budget, "Budget not recorded.")}'
        f"<h3>Fixed across the study</h3>{_dict_table(fixed_parameters(history))}</section>",
        '<section id="figures"><h2>Figures</h2>'
        + "".join(_figure_html(*f, exported.get(f[0])) for f in figures)
        + "</section>",
        f'<section id="cells"><h2>Cells</h2><p>Seed-phase statistics per cell (target accuracy {_fmt(target)}); '
        f'"to target" columns average the n_reached seeds that reach it.</p>'
        f"{_table(cell_table, 'No cells.')}</section>",
        f'<section id="significance"><h2>{_comparisons_heading(significance_table)}</h2>'
        f"{_table(significance_table, 'No pair of compared algorithms in this study.')}</section>",
        f'<section id="warnings"><h2>Warnings</h2>{warn_html}</section>',
        f'<section id="provenance"><h2>Provenance</h2>{_dict_table(provenance)}</section>',
    ]
    document = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<style>{_CSS}</style>\n<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n<body>\n'
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    if failure is not None:
        raise failure
    return path
