"""Plotly figures of a scaling study, each drawn by one small function from a tidy frame.

Data first, figures second: the frames come from `gradalign.analysis` (the cells frame of `summarize_cells`, the
history frame, the fit dicts of `fit_critical_batches`); the functions here only draw. The x-axis column is a
parameter everywhere, so a federated study reuses them with `x="alpha"` or `x="participation"`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .analysis import pareto_front
from .config import ALGORITHMS

__all__ = [
    "algorithm_colors",
    "accuracy_vs_x",
    "steps_vs_batch",
    "pareto_figure",
    "alignment_over_training",
    "hyperparameters_vs_x",
]

_PALETTE = plotly.colors.qualitative.Plotly
_LABELS = {
    "batch_size": "global batch size B",
    "acc_mean": "test accuracy (end of budget)",
    "acc_max_mean": "test accuracy (best evaluation)",
    "val_mean": "validation accuracy (end of budget)",
    "steps_to_target_mean": "steps to target",
    "communications_to_target_mean": "communications to target",
    "messages_to_target_mean": "messages to target",
    "rounds_to_target_mean": "rounds to target",
    "label_tv_mean": "measured label heterogeneity (mean TV distance)",
    "examples_to_target_mean": "examples to target",
    "wall_time_mean": "wall time per run (s)",
    "wall_to_target_mean": "wall time to target (s)",
    "grad_variance": "gradient variance V",
    "grad_cosine": "mean pairwise gradient cosine",
    "examples": "training examples seen",
    "alpha": "Dirichlet alpha (heterogeneity)",
    "participation": "client participation",
}


def _label(column: str) -> str:
    return _LABELS.get(column, column.replace("_", " "))


def algorithm_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per algorithm (same across figures and studies); unknown names take the colours after."""
    known = list(ALGORITHMS) + sorted({str(n) for n in names} - set(ALGORITHMS))
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(known)}


def _groups(frame: pd.DataFrame, color: str):
    """(name, rows, colour) per value of `color`, in the fixed algorithm order."""
    if color not in frame.columns or frame.empty:
        return []
    colors = algorithm_colors(frame[color].dropna().unique())
    order = [c for c in colors if c in set(frame[color].astype(str))]
    return [(name, frame[frame[color].astype(str) == name], colors[name]) for name in order]


def _axis_ticks(values) -> dict:
    """Ticks at the measured values (powers of two for batch sizes) on a log axis."""
    values = np.unique(np.asarray(pd.Series(values).dropna(), dtype=float))
    values = values[values > 0]
    if values.size == 0 or values.size > 12:
        return {}
    return {"tickvals": list(values), "ticktext": [f"{v:g}" for v in values]}


def _no_data(fig: go.Figure) -> go.Figure:
    """Partial studies: an empty figure says so instead of showing bare axes."""
    if not fig.data:
        fig.add_annotation(
            text="no data for this figure (yet)",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
            font={"size": 16, "color": "gray"},
        )
    return fig


def _finish(fig: go.Figure, title: str, x_title: str, y_title: str, height: int = 450) -> go.Figure:
    _no_data(fig)
    fig.update_layout(
        title={"text": title},
        template="plotly_white",
        height=height,
        legend={"title": {"text": ""}},
        margin={"l": 70, "r": 30, "t": 60, "b": 60},
    )
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def accuracy_vs_x(
    cells: pd.DataFrame,
    x: str = "batch_size",
    y: str = "acc_mean",
    err: str = "acc_std",
    color: str = "algorithm",
    log_x: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Mean test accuracy vs `x`, one line per `color` value, error bars = std over seeds, n in the hover."""
    fig = go.Figure()
    for name, part, rgb in _groups(cells, color):
        part = part.dropna(subset=[x]).sort_values(x)
        n = part["n_seeds"] if "n_seeds" in part else pd.Series(np.nan, index=part.index)
        std = part[err] if err in part else pd.Series(np.nan, index=part.index)
        fig.add_trace(
            go.Scatter(
                x=part[x],
                y=part[y],
                name=name,
                mode="lines+markers",
                line={"color": rgb},
                error_y={"type": "data", "array": std.fillna(0), "visible": True},
                customdata=np.column_stack([n, std]),
                hovertemplate=f"{name}<br>{x}=%{{x}}<br>{y}=%{{y:.4f}} ± %{{customdata[1]:.4f}}"
                "<br>n=%{customdata[0]}<extra></extra>",
            )
        )
    if log_x:
        fig.update_xaxes(type="log", **_axis_ticks(cells.get(x, [])))
    return _finish(fig, title or f"Test accuracy vs {_label(x)} (mean ± std over seeds)", _label(x), _label(y))


def _vertical(
    x: float, y_range: tuple[float, float], name: str, rgb: str, dash: str, showlegend: bool = True
) -> go.Scatter:
    return go.Scatter(
        x=[x, x],
        y=list(y_range),
        mode="lines",
        name=name,
        line={"color": rgb, "dash": dash},
        legendgroup=name,
        showlegend=showlegend,
        hovertemplate=f"{name}<extra></extra>",
    )


def steps_vs_batch(
    cells: pd.DataFrame,
    fits: Mapping[str, dict] | None = None,
    noise: Mapping[str, float] | None = None,
    x: str = "batch_size",
    y: str = "steps_to_target_mean",
    err: str = "steps_to_target_std",
    color: str = "algorithm",
    title: str | None = None,
) -> go.Figure:
    """Steps to target vs batch size, log-log: measured points, perfect scaling (S ∝ 1/B), fitted McCandlish curve.

    `fits` maps an algorithm to a `fit_critical_batch` dict (curve drawn dashed; B_crit marked by a star on the
    curve and a dashed vertical); `noise` maps an algorithm to its B_simple, the predicted critical batch (dotted
    vertical).
    """
    fig, fits, noise = go.Figure(), fits or {}, noise or {}
    points = cells.dropna(subset=[x, y]) if {x, y} <= set(cells.columns) else cells.iloc[0:0]
    points = points[(points[x] > 0) & (points[y] > 0)]
    y_range = (float(points[y].min()), float(points[y].max())) if len(points) else (1.0, 10.0)
    if len(points):
        x_ref = points[x].min()
        y_ref = points.loc[points[x] == x_ref, y].min()
        xs = np.geomspace(x_ref, points[x].max(), 2 if points[x].max() > x_ref else 1)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=y_ref * x_ref / xs,
                mode="lines",
                name="perfect scaling (S ∝ 1/B)",
                line={"color": "gray", "dash": "dot"},
            )
        )
    for name, part, rgb in _groups(points, color):
        part = part.sort_values(x)
        reached = part[["n_reached", "n_seeds"]] if {"n_reached", "n_seeds"} <= set(part.columns) else None
        fig.add_trace(
            go.Scatter(
                x=part[x],
                y=part[y],
                name=name,
                mode="markers",
                marker={"color": rgb, "size": 9},
                error_y={"type": "data", "array": part[err].fillna(0) if err in part else None, "visible": True},
                customdata=reached.to_numpy() if reached is not None else None,
                hovertemplate=f"{name}<br>B=%{{x}}<br>steps=%{{y:.4g}}"
                + ("<br>reached: %{customdata[0]}/%{customdata[1]} seeds" if reached is not None else "")
                + "<extra></extra>",
            )
        )
    for name, rgb in algorithm_colors(list(fits) + list(noise)).items():
        fit = fits.get(name)
        if fit is not None and np.isfinite(fit.get("B_crit", np.nan)) and len(fit["curve"]):
            curve = fit["curve"]
            fig.add_trace(
                go.Scatter(
                    x=curve["batch_size"],
                    y=curve["steps"],
                    mode="lines",
                    name=f"{name} fit",
                    line={"color": rgb, "dash": "dash"},
                )
            )
            if fit.get("reason") is None:  # a pinned fit only bounds B_crit: no marker far off the data
                label = f"{name} B_crit={fit['B_crit']:.3g} (fit)"
                fig.add_trace(
                    go.Scatter(
                        x=[fit["B_crit"]],
                        y=[2 * fit["S_min"]],
                        mode="markers",
                        name=label,
                        legendgroup=label,
                        marker={"color": rgb, "symbol": "star", "size": 15},
                    )
                )
                fig.add_trace(_vertical(fit["B_crit"], y_range, label, rgb, "dash", showlegend=False))
        b_simple = noise.get(name, np.nan)
        if b_simple is not None and np.isfinite(b_simple) and b_simple > 0:
            fig.add_trace(_vertical(b_simple, y_range, f"{name} B_simple={b_simple:.3g} (predicted)", rgb, "dot"))
    fig.update_xaxes(type="log", **_axis_ticks(points[x] if len(points) else []))
    fig.update_yaxes(type="log")
    return _finish(
        fig, title or "Steps to target vs batch size (log-log) with the McCandlish fit", _label(x), _label(y)
    )


def pareto_figure(
    cells: pd.DataFrame,
    x: str = "batch_size",
    y: str = "acc_mean",
    maximize_x: bool = True,
    color: str = "algorithm",
    log_x: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Every cell as a point, coloured by `color`, with the Pareto frontier over all of them as a staircase."""
    fig = go.Figure()
    points = cells.dropna(subset=[x, y]) if {x, y} <= set(cells.columns) else cells.iloc[0:0]
    for name, part, rgb in _groups(points, color):
        fig.add_trace(
            go.Scatter(
                x=part[x],
                y=part[y],
                name=name,
                mode="markers",
                marker={"color": rgb, "size": 9},
                text=part.get("cell"),
                hovertemplate=f"{name} %{{text}}<br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4f}}<extra></extra>",
            )
        )
    front = pareto_front(points, x=x, y=y, maximize_x=maximize_x) if len(points) else points
    if len(front):
        fig.add_trace(
            go.Scatter(
                x=front[x],
                y=front[y],
                name="Pareto front",
                mode="lines",
                line={"color": "black", "shape": "vh" if maximize_x else "hv", "width": 1.5},
            )
        )
    if log_x:
        fig.update_xaxes(type="log", **(_axis_ticks(cells[x]) if x == "batch_size" and x in cells else {}))
    better = "more is better" if maximize_x else "less is better"
    return _finish(fig, title or f"Pareto frontier: {_label(y)} vs {_label(x)} ({better})", _label(x), _label(y))


def _alignment_data(
    history: pd.DataFrame, x: str, metrics: Sequence[str], facet: str, color: str, phase: str | None
) -> pd.DataFrame:
    """Per (facet, color, evaluation): x and each metric averaged over the seeds."""
    if phase is not None and "phase" in history.columns:
        history = history[history["phase"] == phase]
    metrics = [m for m in metrics if m in history.columns]
    keys = [facet, color, "evaluation"]
    if not set([*keys, x]) <= set(history.columns):
        return pd.DataFrame(columns=[*keys, x, *metrics])
    return history.groupby(keys, sort=True, dropna=False)[[x, *metrics]].mean().reset_index()


def alignment_over_training(
    history: pd.DataFrame,
    x: str = "examples",
    metrics: Sequence[str] = ("grad_variance", "grad_cosine"),
    facet: str = "algorithm",
    color: str = "batch_size",
    phase: str | None = "seed",
    title: str | None = None,
) -> go.Figure:
    """Gradient variance V and client-gradient cosine over training: a row per metric, a column per `facet`
    value (algorithm), one line per `color` value (batch size), each the mean over seeds."""
    data = _alignment_data(history, x, metrics, facet, color, phase)
    metrics = [m for m in metrics if m in data.columns]
    facets = [name for name, _, _ in _groups(data, facet)] or [""]
    fig = make_subplots(
        rows=max(len(metrics), 1),
        cols=len(facets),
        column_titles=facets,
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.04,
        vertical_spacing=0.08,
    )
    levels = sorted(data[color].dropna().unique()) if color in data else []
    shades = plotly.colors.sample_colorscale("Viridis", np.linspace(0, 0.9, max(len(levels), 2)))
    for col, name in enumerate(facets, start=1):
        for row, metric in enumerate(metrics, start=1):
            for level, shade in zip(levels, shades):
                part = data[(data[facet].astype(str) == name) & (data[color] == level)].dropna(subset=[metric])
                if part.empty:
                    continue
                label = f"{color}={level:g}" if isinstance(level, (int, float, np.number)) else f"{color}={level}"
                fig.add_trace(
                    go.Scatter(
                        x=part[x],
                        y=part[metric],
                        mode="lines",
                        name=label,
                        legendgroup=label,
                        line={"color": shade},
                        showlegend=(col == 1 and row == 1),
                        hovertemplate=f"{name} {label}<br>{x}=%{{x:.4g}}<br>{metric}=%{{y:.4g}}<extra></extra>",
                    ),
                    row=row,
                    col=col,
                )
            fig.update_yaxes(
                title_text=_label(metric) if col == 1 else None,
                row=row,
                col=col,
                type="log" if metric == "grad_variance" else None,
            )
    fig.update_layout(
        title={"text": title or "Gradient alignment over training (mean over seeds)"},
        template="plotly_white",
        height=280 * max(len(metrics), 1) + 120,
    )
    fig.update_xaxes(title_text=_label(x), row=max(len(metrics), 1))
    return _no_data(fig)


def hyperparameters_vs_x(
    cells: pd.DataFrame,
    x: str = "batch_size",
    params: Sequence[str] = ("lr", "beta"),
    color: str = "algorithm",
    title: str | None = None,
) -> go.Figure:
    """The tuned hyperparameters chosen for each cell vs `x`, one panel per parameter, log-log."""
    params = [p for p in params if p in cells.columns]
    fig = make_subplots(rows=1, cols=max(len(params), 1), subplot_titles=[f"chosen {p}" for p in params])
    for col, param in enumerate(params, start=1):
        for name, part, rgb in _groups(cells.dropna(subset=[x, param]), color):
            part = part.sort_values(x)
            fig.add_trace(
                go.Scatter(
                    x=part[x],
                    y=part[param],
                    name=name,
                    legendgroup=name,
                    mode="lines+markers",
                    line={"color": rgb},
                    showlegend=(col == 1),
                    hovertemplate=f"{name}<br>{x}=%{{x}}<br>{param}=%{{y:.3g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_yaxes(type="log", title_text=param, row=1, col=col)
    fig.update_xaxes(type="log", title_text=_label(x), **_axis_ticks(cells.get(x, [])))
    fig.update_layout(
        title={"text": title or f"Tuned hyperparameters per {_label(x)}"}, template="plotly_white", height=420
    )
    return _no_data(fig)


def _points(fig: go.Figure, at: tuple[int, int], x, y, name: str, marker: dict, legend: bool = False, **more) -> None:
    """A marker trace in panel `at` (row, col), legend group `name`; nothing when there are no points."""
    if len(x):
        trace = go.Scatter(
            x=x, y=y, mode="markers", name=name, marker=marker, showlegend=legend, legendgroup=name, **more
        )
        fig.add_trace(trace, row=at[0], col=at[1])


def tuning_figure(
    trials: pd.DataFrame, ranges: Mapping[str, Mapping[str, tuple]], param: str = "lr", columns: int = 3
) -> go.Figure:
    """One panel per cell: every tuning trial's validation score against `param` (log axis), coloured by log10 β
    where the cell searches β; trials ASHA stopped early as open circles (their score is from part of
    the budget); diverged trials as crosses at 0; the chosen configuration as a star; the search range
    of `param` as dashed verticals (`ranges`: per algorithm {param: (low, high)}). Shows whether the optimum was
    bracketed."""
    trials = trials.dropna(subset=[param]) if param in trials else trials.iloc[0:0]
    cells = list(dict.fromkeys(trials["cell"])) if len(trials) else []
    rows = max(1, -(-len(cells) // columns))
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=cells or ["no tuning trials"], vertical_spacing=0.12)
    for i, cell in enumerate(cells):
        row, col = i // columns + 1, i % columns + 1
        part = trials[trials["cell"] == cell]
        healthy = part[~part["status"].isin(["diverged", "stopped"])]
        stopped = part[part["status"] == "stopped"]
        _points(
            fig,
            (row, col),
            stopped[param],
            stopped["score"],
            "stopped early (ASHA)",
            {"symbol": "circle-open", "size": 7, "color": "#999999"},
            legend=i == 0,
            hovertemplate=f"{param}=%{{x:.3g}}<br>score when stopped %{{y:.3f}}<extra></extra>",
        )
        beta = healthy["beta"] if "beta" in healthy and healthy["beta"].notna().any() else None
        marker = {"size": 8, "color": "#636efa"}
        if beta is not None:
            marker = {
                "size": 8,
                "color": np.log10(beta.astype(float)),
                "colorscale": "Viridis",
                "showscale": i == 0,
                "colorbar": {"title": "log10 β", "len": 0.5},
            }
        text = [
            f"{param}={v:.3g}" + (f", β={b:.3g}" if beta is not None else "") + f", {ph}"
            for v, b, ph in zip(healthy[param], beta if beta is not None else healthy[param], healthy["phase"])
        ]
        fig.add_trace(
            go.Scatter(
                x=healthy[param],
                y=healthy["score"],
                mode="markers",
                marker=marker,
                text=text,
                name="trial",
                showlegend=i == 0,
                legendgroup="trial",
                hovertemplate="%{text}<br>score %{y:.3f}<extra></extra>",
            ),
            row=row,
            col=col,
        )
        bad = part[part["status"] == "diverged"]
        _points(
            fig, (row, col), bad[param], np.zeros(len(bad)), "diverged", {"symbol": "x", "size": 9, "color": "#d62728"}
        )
        chosen = part[part["chosen"].astype(bool)]
        star = {"symbol": "star", "size": 16, "color": "#ff7f0e", "line": {"width": 1, "color": "black"}}
        _points(fig, (row, col), chosen[param], chosen["score"], "chosen", star, legend=i == 0)
        algorithm = part["algorithm"].iloc[0] if "algorithm" in part and len(part) else None
        bounds = (ranges.get(cell) or ranges.get(algorithm) or {}).get(param)
        for bound in bounds or ():
            fig.add_vline(x=bound, line={"dash": "dash", "color": "grey"}, row=row, col=col)
        fig.update_xaxes(type="log", title_text=param, row=row, col=col)
        fig.update_yaxes(title_text="validation score", row=row, col=col)
    fig.update_layout(
        title={
            "text": f"Tuning: every trial's validation score against {param}, per cell (dashed: the "
            "search range; star: the chosen configuration)"
        },
        template="plotly_white",
        height=320 * rows + 80,
    )
    return _no_data(fig) if not cells else fig
