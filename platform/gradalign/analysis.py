"""Analysis of scaling studies: tidy pandas frames in, tidy frames (or plain dicts) out.

The input is the *history* frame: one row per (trial, epoch) with the columns listed in the module docs of
`gradalign.report` (study, cell, phase, trial_id, algorithm, batch_size, ..., test_accuracy, grad_variance, ...).
Everything here is pure pandas / numpy / scipy (no Ray, no torch) and works on partial studies: missing cells, a
single seed, trials that diverged or never reach the target give NaN together with a count or a reason, not an
exception.

Conventions
- A *trial* is one training run: the rows that share (study, phase, trial_id).
- A *cell* is one setting of the scientific hyperparameters, `group` (default: algorithm x batch size). Its *seeds*
  are the 'seed'-phase trials that rerun the cell's tuned configuration with different seeds.
- Accuracy is reported twice: at the final epoch (`acc_*`: what the budget buys) and at the best epoch
  (`acc_max_*`: optimistic, since it picks the epoch on the test set).
- Steps / examples / wall time to target are averaged over the seeds that reach the target; `n_reached` says how
  many did.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

__all__ = [
    "DEFAULT_GROUP", "steps_to_target", "trial_table", "rank_trials", "best_trials", "summarize_cells",
    "fit_critical_batch", "fit_critical_batches", "noise_scale_from_history", "significance", "pareto_front",
    "edge_warnings",
]

DEFAULT_GROUP = ("algorithm", "batch_size")
CONFIG_COLUMNS = (
    "cell", "algorithm", "batch_size", "clients", "workers", "lr", "beta", "momentum", "weight_decay",
    "local_steps", "mu", "participation", "alpha", "partition",
)
_TRIAL_KEYS = ("study", "phase", "trial_id")
_TRIAL_METRICS = (
    "epochs", "acc_final", "acc_max", "steps_to_target", "examples_to_target", "wall_to_target", "reached",
    "wall_time", "grad_variance_mean", "grad_cosine_mean", "status", "diverged", "error",
)
# (output prefix, trial_table column) averaged over the seeds of a cell.
_CELL_STATS = (
    ("acc", "acc_final"), ("acc_max", "acc_max"), ("steps_to_target", "steps_to_target"),
    ("examples_to_target", "examples_to_target"), ("wall_to_target", "wall_to_target"), ("wall_time", "wall_time"),
)
_CHOSEN = ("lr", "beta", "momentum", "weight_decay", "local_steps", "mu", "participation", "alpha", "clients")
NAN = float("nan")


def _trial_keys(history: pd.DataFrame) -> list[str]:
    if "trial_id" not in history.columns:
        raise ValueError("history needs a 'trial_id' column")
    return [k for k in _TRIAL_KEYS if k in history.columns]


def _select_phase(history: pd.DataFrame, phase: str | None) -> pd.DataFrame:
    if phase is None or "phase" not in history.columns:
        return history
    return history[history["phase"] == phase]


def _require(frame: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; have {list(frame.columns)}")


def _first_valid(values: pd.Series):
    values = values.dropna()
    return values.iloc[0] if len(values) else NAN


def _as_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _floats(frame: pd.DataFrame, column: str) -> pd.Series:
    """The column as floats, or all-NaN when the frame lacks it."""
    if column not in frame.columns:
        return pd.Series(NAN, index=frame.index, dtype=float)
    return pd.to_numeric(frame[column], errors="coerce").astype(float)


def steps_to_target(history_of_one_trial: pd.DataFrame, target: float) -> tuple[float, float, float]:
    """(steps, examples, wall_time) at the first epoch whose test accuracy reaches `target`; NaNs if none does."""
    rows = history_of_one_trial.sort_values("epoch")
    hit = rows[rows["test_accuracy"] >= target]
    if hit.empty:
        return (NAN, NAN, NAN)
    first = hit.iloc[0]
    return tuple(float(first.get(c, NAN)) for c in ("steps", "examples", "wall_time"))


def trial_table(history: pd.DataFrame, target: float | None = None, phase: str | None = None,
                carry: Sequence[str] = ()) -> pd.DataFrame:
    """One row per trial: its configuration, final / best accuracy, cost to reach `target`, mean alignment, status.

    The configuration columns (CONFIG_COLUMNS, seed, and any extra `carry` columns) hold each trial's first
    non-missing value; the "to target" columns follow `steps_to_target` (vectorised over trials).
    """
    keys = _trial_keys(history)
    rows = _select_phase(history, phase).sort_values("epoch", kind="stable").reset_index(drop=True)
    config = [c for c in dict.fromkeys([*CONFIG_COLUMNS, "seed", *carry]) if c in rows.columns and c not in keys]
    if rows.empty:
        return pd.DataFrame(columns=[*keys, *config, *_TRIAL_METRICS])
    trial = rows.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()  # 0..n-1 in order of appearance
    by, position = rows.groupby(trial, sort=True), pd.Series(np.arange(len(rows)))
    last = rows.iloc[position.groupby(trial).last().to_numpy()].reset_index(drop=True)
    out = pd.concat([last[keys], by[config].first().reset_index(drop=True)], axis=1)
    out["epochs"] = by["epoch"].max().to_numpy()
    out["acc_final"] = _floats(last, "test_accuracy").to_numpy()
    out["acc_max"] = by["test_accuracy"].max().to_numpy(dtype=float)
    hit = (rows["test_accuracy"] >= target).to_numpy() if target is not None else np.zeros(len(rows), bool)
    first_hit = position[hit].groupby(trial[hit]).first()
    for column, source in (("steps_to_target", "steps"), ("examples_to_target", "examples"),
                           ("wall_to_target", "wall_time")):
        values = _floats(rows, source).to_numpy()[first_hit.to_numpy()]
        out[column] = pd.Series(values, index=first_hit.index, dtype=float).reindex(range(len(out))).to_numpy()
    out["reached"] = np.isin(np.arange(len(out)), first_hit.index)
    out["wall_time"] = _floats(last, "wall_time").to_numpy()
    out["grad_variance_mean"] = _floats(rows, "grad_variance").groupby(trial).mean().to_numpy()
    out["grad_cosine_mean"] = _floats(rows, "grad_cosine").groupby(trial).mean().to_numpy()
    status = rows["status"] if "status" in rows.columns else pd.Series(NAN, index=rows.index)
    out["status"] = last["status"].to_numpy() if "status" in last.columns else NAN
    out["diverged"] = (status == "diverged").groupby(trial).any().to_numpy()
    out["error"] = (status == "error").groupby(trial).any().to_numpy()
    return out[[*keys, *config, *_TRIAL_METRICS]]


def rank_trials(trials: pd.DataFrame, score: str, mode: str = "max") -> pd.DataFrame:
    """`trials` (one row per trial) best first, by the rule every choice of a best trial here follows: trials that
    did not diverge first, then `score` under `mode` (NaN last); a tie goes to the lower `test_loss` (when there is
    such a column: the final test loss), then to the smallest `trial_id`. The same rows give the same order, whatever
    order they come in."""
    ranked = trials.assign(_diverged=trials["status"].eq("diverged") if "status" in trials else False)
    keys = ["_diverged", score, *(["test_loss"] if "test_loss" in ranked and score != "test_loss" else []), "trial_id"]
    ranked = ranked.sort_values(keys, ascending=[True, mode == "min", *[True] * (len(keys) - 2)], na_position="last",
                                kind="stable")
    return ranked.drop(columns="_diverged")


def _last_value(values: pd.Series):
    """The final epoch's value, NaN included (groupby's "last" skips NaN)."""
    return values.iloc[-1]


def best_trials(history: pd.DataFrame, metric: str = "test_accuracy", group: Sequence[str] = DEFAULT_GROUP,
                mode: str = "max", reduce: str = "max", phase: str | None = None) -> pd.DataFrame:
    """Per cell, the trial whose `metric` (reduced over epochs by 'max', 'min' or 'last') is best under `mode`.

    The order is `rank_trials`' (as for a study's choice, `studies.cells.best_config`): trials that did not diverge
    first; a tie in the score goes to the lower final test loss, then to the smallest trial id.
    Returns the trial_table row of that trial plus a `score` column. A cell whose trials all have NaN scores
    (e.g. all diverged) still gets a row (score NaN), so its configuration can be inspected.
    """
    if mode not in ("max", "min") or reduce not in ("max", "min", "last"):
        raise ValueError(f"mode must be 'max'/'min' and reduce 'max'/'min'/'last', got {mode!r}, {reduce!r}")
    history = _select_phase(history, phase)
    _require(history, [*group, metric])
    keys = _trial_keys(history)
    by_trial = history.sort_values("epoch", kind="stable").groupby(keys, sort=False, dropna=False)
    score = by_trial[metric].agg(_last_value if reduce == "last" else reduce).rename("score")
    extra = [score]
    tie_loss = "test_loss" in history.columns and metric != "test_loss"
    if tie_loss:  # (trial_table has no test loss column: the final one is added for the ranking only)
        extra.append(by_trial["test_loss"].agg(_last_value).rename("test_loss"))
    trials = trial_table(history, carry=group).merge(pd.concat(extra, axis=1).reset_index(), on=keys, how="left")
    best = rank_trials(trials, "score", mode).drop_duplicates(list(group))
    if tie_loss:
        best = best.drop(columns="test_loss")
    return best.sort_values(list(group)).reset_index(drop=True)


def summarize_cells(history: pd.DataFrame, target: float, group: Sequence[str] = DEFAULT_GROUP,
                    phase: str | None = "seed") -> pd.DataFrame:
    """The cells frame: per cell of `group`, statistics over its seed trials (rows of `phase`; None = all rows).

    Columns: the group, `cell` (ids joined), `n_seeds`; `acc_mean/std` (final-epoch test accuracy), `acc_max_mean/
    std` (best epoch); `steps_to_target_*`, `examples_to_target_*`, `wall_to_target_*` (mean/std over the
    `n_reached` seeds that reach `target`); `wall_time_*` (whole run); `grad_variance_mean`, `grad_cosine_mean`
    (V and cosine averaged over training, then seeds); the chosen hyperparameters (lr, beta, momentum, ...);
    `diverged`, `errors` (trial counts); `target`. Std is the sample std (NaN with one seed).
    """
    group = list(group)
    _require(history, group)
    trials = trial_table(history, target, phase, carry=group)
    stat_cols = [f"{p}_{s}" for p, _ in _CELL_STATS for s in ("mean", "std")]
    chosen = [c for c in _CHOSEN if c in trials.columns and c not in group]
    columns = [*group, "cell", "n_seeds", *stat_cols, "n_reached", "grad_variance_mean", "grad_cosine_mean",
               *chosen, "diverged", "errors", "target"]
    rows = []
    for key, cell in trials.groupby(group, sort=True, dropna=False):
        row = dict(zip(group, _as_tuple(key)))
        row["cell"] = "+".join(sorted(map(str, cell["cell"].dropna().unique()))) if "cell" in cell else ""
        row["n_seeds"] = len(cell)
        for prefix, column in _CELL_STATS:
            row[f"{prefix}_mean"], row[f"{prefix}_std"] = cell[column].mean(), cell[column].std()
        row["n_reached"] = int(cell["reached"].sum())
        row["grad_variance_mean"] = cell["grad_variance_mean"].mean()
        row["grad_cosine_mean"] = cell["grad_cosine_mean"].mean()
        row.update({c: _first_valid(cell[c]) for c in chosen})
        row["diverged"], row["errors"] = int(cell["diverged"].sum()), int(cell["error"].sum())
        row["target"] = target
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def fit_critical_batch(batch_sizes: Sequence[float], steps_to_target: Sequence[float], n_curve: int = 100) -> dict:
    """Fit McCandlish et al. (2018): S = S_min (1 + B_crit / B), i.e. E = B S = E_min (1 + B / B_crit).

    Least squares on log S over (log S_min, log B_crit) with scipy; NaN / non-positive points (cells that never
    reached the target) are dropped. Returns dict(S_min, E_min, B_crit, n_points, rms_log_residual, reason, curve)
    where `curve` is a frame (batch_size, steps, examples) of the fit and `reason` is None for a clean fit, else
    why the numbers are NaN (< 2 batch sizes) or only a bound (B_crit pinned at the edge of the search range).
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps_to_target, dtype=float)
    keep = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
    b, s = b[keep], s[keep]
    out = {"S_min": NAN, "E_min": NAN, "B_crit": NAN, "n_points": int(b.size), "rms_log_residual": NAN,
           "reason": None, "curve": pd.DataFrame(columns=["batch_size", "steps", "examples"], dtype=float)}
    if np.unique(b).size < 2:
        out["reason"] = f"need steps-to-target at >= 2 batch sizes, have {np.unique(b).size}"
        return out
    log_s = np.log(s)
    lo, hi = math.log(b.min() / 1e3), math.log(b.max() * 1e3)

    def residuals(theta):
        return log_s - theta[0] - np.log1p(np.exp(theta[1]) / b)

    # Profile out log S_min on a grid of log B_crit (closed form), then refine both jointly.
    grid = np.linspace(lo, hi, 400)
    profile = [np.var(log_s - np.log1p(np.exp(t) / b)) for t in grid]
    t0 = grid[int(np.argmin(profile))]
    theta0 = [np.mean(log_s - np.log1p(np.exp(t0) / b)), t0]
    fit = optimize.least_squares(residuals, theta0, bounds=([-np.inf, lo], [np.inf, hi]), xtol=1e-14, ftol=1e-14)
    s_min, b_crit = float(np.exp(fit.x[0])), float(np.exp(fit.x[1]))
    out.update(S_min=s_min, B_crit=b_crit, E_min=s_min * b_crit,
               rms_log_residual=float(np.sqrt(np.mean(fit.fun ** 2))))
    if fit.x[1] < lo + 0.01 * (hi - lo) or fit.x[1] > hi - 0.01 * (hi - lo):
        shape = "no speed-up" if fit.x[1] < (lo + hi) / 2 else "perfect scaling"
        out["reason"] = f"B_crit is pinned at the edge of the fit range ({shape} over the measured batch sizes)"
    grid_b = np.geomspace(b.min() / 2, b.max() * 2, n_curve)
    steps = s_min * (1 + b_crit / grid_b)
    out["curve"] = pd.DataFrame({"batch_size": grid_b, "steps": steps, "examples": steps * grid_b})
    return out


def fit_critical_batches(cells: pd.DataFrame, by: str = "algorithm", x: str = "batch_size",
                         y: str = "steps_to_target_mean") -> dict:
    """`fit_critical_batch` for each value of `by` in the cells frame: {value: fit dict}."""
    _require(cells, [by, x, y])
    return {key: fit_critical_batch(part[x], part[y]) for key, part in cells.groupby(by, sort=True)}


def noise_scale_from_history(history: pd.DataFrame, group: Sequence[str] = DEFAULT_GROUP,
                             phase: str | None = "seed") -> pd.DataFrame:
    """Per cell, the simple gradient noise scale B_simple = mean tr(Sigma) / mean |G|^2 (McCandlish et al.).

    Numerator and denominator are averaged separately over all epochs and seeds (the per-epoch ratio
    `gns_simple` is noisy and can be negative). Where the trace columns are missing or empty, falls back to the
    median of the positive finite `gns_simple` values; `source` says which was used. This is the *predicted*
    critical batch size, to compare with the fitted B_crit.
    """
    group = list(group)
    history = _select_phase(history, phase)
    _require(history, group)
    rows = []
    for key, cell in history.groupby(group, sort=True, dropna=False):
        row = dict(zip(group, _as_tuple(key)))
        trace, grad_sq, simple = (_floats(cell, c) for c in ("gns_trace", "gns_grad_sq", "gns_simple"))
        both = np.isfinite(trace) & np.isfinite(grad_sq)
        simple = simple[np.isfinite(simple) & (simple > 0)]
        row.update(B_simple=NAN, n_estimates=int(both.sum()), B_simple_median=simple.median(), source="none")
        if both.any() and grad_sq[both].mean() > 0:
            row.update(B_simple=float(trace[both].mean() / grad_sq[both].mean()), source="trace/grad_sq")
        elif len(simple):
            row.update(B_simple=float(simple.median()), n_estimates=len(simple), source="median gns_simple")
        rows.append(row)
    return pd.DataFrame(rows, columns=[*group, "B_simple", "n_estimates", "B_simple_median", "source"])


def significance(history: pd.DataFrame, a: str = "gradalign", b: str = "large_batch_sgd", by: str = "batch_size",
                 metric: str = "acc_final", target: float | None = None, phase: str | None = "seed",
                 alpha: float = 0.05) -> pd.DataFrame:
    """Welch's t-test of algorithm `a` vs `b` over seeds, separately for each value of `by`.

    `metric` is a trial_table column (acc_final, acc_max, steps_to_target, examples_to_target, wall_to_target,
    wall_time, grad_variance_mean, grad_cosine_mean); 'test_accuracy' means acc_final. Seeds with NaN are left
    out (n counts the rest). Columns: by, a, b, metric, mean_a, mean_b, diff (a - b), n_a, n_b, t, p_value, verdict.
    """
    metric = "acc_final" if metric == "test_accuracy" else metric
    if metric in ("steps_to_target", "examples_to_target", "wall_to_target") and target is None:
        raise ValueError(f"metric={metric!r} needs a target accuracy")
    trials = trial_table(history, target, phase, carry=[by])
    _require(trials, [by, metric, "algorithm"])
    columns = [by, "a", "b", "metric", "mean_a", "mean_b", "diff", "n_a", "n_b", "t", "p_value", "verdict"]
    trials = trials[trials["algorithm"].isin([a, b])]
    rows = []
    for value, part in trials.groupby(by, sort=True):
        va = part.loc[part["algorithm"] == a, metric].dropna().to_numpy(float)
        vb = part.loc[part["algorithm"] == b, metric].dropna().to_numpy(float)
        mean_a, mean_b = (float(v.mean()) if v.size else NAN for v in (va, vb))
        t, p, verdict = NAN, NAN, "too few seeds (n<2)"
        if va.size >= 2 and vb.size >= 2:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                t, p = (float(v) for v in stats.ttest_ind(va, vb, equal_var=False))
            if math.isnan(p):  # both groups constant: the difference is exact (or exactly zero)
                p = 1.0 if mean_a == mean_b else 0.0
            direction = "higher" if mean_a > mean_b else "lower"
            verdict = f"significant at {alpha} ({a} {direction})" if p < alpha else "not significant"
        rows.append({by: value, "a": a, "b": b, "metric": metric, "mean_a": mean_a, "mean_b": mean_b,
                     "diff": mean_a - mean_b, "n_a": int(va.size), "n_b": int(vb.size), "t": t, "p_value": p,
                     "verdict": verdict})
    return pd.DataFrame(rows, columns=columns)


def pareto_front(cells: pd.DataFrame, x: str = "batch_size", y: str = "acc_mean", maximize_x: bool = True,
                 maximize_y: bool = True, by: str | None = None) -> pd.DataFrame:
    """The rows of `cells` not dominated in (x, y), sorted by x; rows with NaN in x or y are ignored.

    A row is dominated when another is at least as good in both and better in one. With `by`, one front per
    value of that column (e.g. per algorithm).
    """
    _require(cells, [x, y] + ([by] if by else []))
    if by is not None:
        parts = [pareto_front(p, x, y, maximize_x, maximize_y) for _, p in cells.groupby(by, sort=True)]
        return pd.concat(parts, ignore_index=True) if parts else cells.iloc[0:0]
    data = cells.dropna(subset=[x, y])
    gx = data[x].astype(float) * (1 if maximize_x else -1)
    gy = data[y].astype(float) * (1 if maximize_y else -1)
    order = np.lexsort((-gy.to_numpy(), -gx.to_numpy()))  # best x first, ties: best y first
    keep, best_y = [], -np.inf
    for i in order:
        if gy.iloc[i] > best_y:
            keep.append(i)
            best_y = gy.iloc[i]
    return data.iloc[keep].sort_values(x, kind="stable").reset_index(drop=True)


def _ranges_for(row: pd.Series, search_ranges: Mapping) -> Mapping:
    """Search ranges of a cell: keyed by cell id, else by algorithm, else one global {param: (lo, hi)} dict."""
    for key in ("cell", "algorithm"):
        if key in row.index and row[key] in search_ranges and isinstance(search_ranges[row[key]], Mapping):
            return search_ranges[row[key]]
    return {k: v for k, v in search_ranges.items() if not isinstance(v, Mapping)}


def _cell_label(row: pd.Series, label: Sequence[str]) -> str:
    parts = [c for c in label if c in row.index]
    if not parts:
        return str(row.get("cell", "?"))
    head, rest = str(row[parts[0]]), [f"{'B' if c == 'batch_size' else c}={_fmt(row[c])}" for c in parts[1:]]
    return "@".join([head, ",".join(rest)]) if rest else head


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}" if isinstance(value, (float, np.floating)) else str(value)


def edge_warnings(best_configs: pd.DataFrame, search_ranges: Mapping, tol: float = 0.05,
                  params: Sequence[str] | None = None, label: Sequence[str] = ("algorithm", "batch_size")) -> list[str]:
    """Warn when a chosen hyperparameter lies near an edge of its search range (Google's tuning playbook).

    `search_ranges` is {cell_id: {param: (lo, hi)}}, {algorithm: {...}} or one global {param: (lo, hi)}. Distance
    is measured in log space (linear when lo <= 0) as a fraction of the range's width; within `tol` of an edge
    (or outside the range) gives a warning such as "lr=0.98 is at the upper edge of [0.001, 1] for gradalign@B=512:
    widen the range". NaN values (e.g. beta of plain SGD) and parameters without a range are skipped.
    """
    messages = []
    for _, row in best_configs.iterrows():
        for param, bounds in _ranges_for(row, search_ranges).items():
            if (params is not None and param not in params) or param not in row.index:
                continue
            value, (lo, hi) = row[param], bounds[:2]
            if not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or not hi > lo:
                continue
            f = np.log10 if lo > 0 and value > 0 else (lambda v: v)
            position = (f(value) - f(lo)) / (f(hi) - f(lo))
            where = None
            if position < 0 or position > 1:
                where = "outside"
            elif position <= tol:
                where = "at the lower edge of"
            elif position >= 1 - tol:
                where = "at the upper edge of"
            if where:
                messages.append(f"{param}={_fmt(value)} is {where} [{_fmt(lo)}, {_fmt(hi)}] for "
                                f"{_cell_label(row, label)}: widen the range")
    return messages
