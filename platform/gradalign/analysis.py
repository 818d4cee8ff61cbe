"""Analysis of scaling studies: tidy pandas frames in, tidy frames (or plain dicts) out.

The input is the *history* frame: one row per (trial, evaluation) with the columns listed in the module docs of
`gradalign.report` (study, cell, phase, trial_id, algorithm, batch_size, ..., val_accuracy, test_accuracy,
grad_variance, ...). Everything here is pure pandas / numpy / scipy (no Ray, no torch) and works on partial studies:
missing cells, a single seed, trials that diverged or never reach the target give NaN together with a count or a
reason, not an exception.

Conventions (the protocol of MLCommons AlgoPerf and Shallue et al.)
- A *trial* is one training run: the rows that share (study, phase, trial_id).
- A *cell* is one setting of the scientific hyperparameters, `group` (default: algorithm x batch size). Its *seeds*
  are the 'seed'-phase trials that rerun the cell's tuned configuration with seeds of their own.
- Whatever *chooses* reads the validation split: the best trial (`rank_trials`: validation score, then the lower
  validation loss), and the target of "steps to target" (`TARGET_METRIC`, the first time the validation accuracy
  reaches it, interpolated between the two evaluations around the crossing). The test split is only reported:
  `acc_*` is the final test accuracy (what the budget buys), `acc_max_*` the best evaluation's (optimistic).
- Costs to the target are averaged over the seeds that reach it; `n_reached` (and `reached`, "2/3") say how many.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .stats import compare_groups, fit_critical_batch, fit_critical_batches, welch

__all__ = [
    "DEFAULT_GROUP",
    "TARGET_METRIC",
    "COUNTER",
    "trial_table",
    "rank_trials",
    "best_trials",
    "summarize_cells",
    "fit_critical_batch",
    "fit_critical_batches",
    "noise_scale_from_history",
    "significance",
    "welch",
    "pareto_front",
    "edge_warnings",
    "collapsed_seeds",
]

DEFAULT_GROUP = ("algorithm", "batch_size")
TARGET_METRIC = "val_accuracy"
"""What a target accuracy is about: the validation split (tuning and targets never read the test split)."""
COUNTER = "evaluation"
"""The column that orders a trial's rows."""
CONFIG_COLUMNS = (
    "cell",
    "algorithm",
    "batch_size",
    "clients",
    "workers",
    "lr",
    "beta",
    "momentum",
    "weight_decay",
    "local_steps",
    "mu",
    "participation",
    "alpha",
    "partition",
)
_TRIAL_KEYS = ("study", "phase", "trial_id")
COSTS = ("steps", "examples", "rounds", "communications", "messages", "wall_time")
"""Costs counted to the target: `<cost>_to_target` (wall_time -> wall_to_target)."""
_FINAL = ("epochs", "steps", "examples", "rounds", "communications", "messages", "values_sent", "label_tv")
_TRIAL_METRICS = (
    "evaluations",
    "acc_final",
    "acc_max",
    "val_final",
    "val_loss_final",
    *(f"{c}_to_target" for c in ("steps", "examples", "rounds", "communications", "messages", "wall")),
    "reached",
    *_FINAL,
    "wall_time",
    "grad_variance_mean",
    "grad_cosine_mean",
    "status",
    "diverged",
    "error",
)
# (output prefix, trial_table column) averaged over the seeds of a cell.
_CELL_STATS = (
    ("acc", "acc_final"),
    ("acc_max", "acc_max"),
    ("val", "val_final"),
    ("steps_to_target", "steps_to_target"),
    ("examples_to_target", "examples_to_target"),
    ("rounds_to_target", "rounds_to_target"),
    ("communications_to_target", "communications_to_target"),
    ("messages_to_target", "messages_to_target"),
    ("wall_to_target", "wall_to_target"),
    ("wall_time", "wall_time"),
    ("label_tv", "label_tv"),
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


def _ordered(history: pd.DataFrame) -> pd.DataFrame:
    order = COUNTER if COUNTER in history.columns else "steps"
    return history.sort_values(order, kind="stable").reset_index(drop=True)


def _crossings(rows: pd.DataFrame, trial: np.ndarray, target: float | None, metric: str) -> pd.DataFrame:
    """Per trial number (index), every cost at the first crossing of `target` by `metric`, interpolated linearly
    between the evaluation before the crossing and the first at or above it (the first evaluation itself when it
    already is). Trials that never reach the target are absent. `rows` are ordered within each trial."""
    columns = [f"{'wall' if c == 'wall_time' else c}_to_target" for c in COSTS]
    if target is None or metric not in rows.columns:
        return pd.DataFrame(columns=columns, dtype=float)
    score = _floats(rows, metric).to_numpy()
    hit = np.flatnonzero(score >= target)
    if hit.size == 0:
        return pd.DataFrame(columns=columns, dtype=float)
    first = pd.Series(hit).groupby(trial[hit]).first()
    i = first.to_numpy()
    before = np.where((i > 0) & (trial[np.maximum(i - 1, 0)] == trial[i]), i - 1, i)
    lo, hi = score[before], score[i]
    frac = np.where(before < i, (target - lo) / np.where(hi > lo, hi - lo, 1.0), 1.0)
    frac = np.clip(frac, 0.0, 1.0)
    out = {}
    for name, cost in zip(columns, COSTS):
        values = _floats(rows, cost).to_numpy()
        out[name] = values[before] + frac * (values[i] - values[before])
    return pd.DataFrame(out, index=first.index)


def steps_to_target(
    history_of_one_trial: pd.DataFrame, target: float, metric: str = TARGET_METRIC
) -> tuple[float, float, float]:
    """(steps, examples, wall_time) when `metric` first reaches `target` (interpolated); NaNs if it never does."""
    rows = _ordered(history_of_one_trial)
    found = _crossings(rows, np.zeros(len(rows), dtype=int), target, metric)
    if found.empty:
        return (NAN, NAN, NAN)
    return tuple(float(found[c].iloc[0]) for c in ("steps_to_target", "examples_to_target", "wall_to_target"))


def trial_table(
    history: pd.DataFrame,
    target: float | None = None,
    phase: str | None = None,
    carry: Sequence[str] = (),
    metric: str = TARGET_METRIC,
) -> pd.DataFrame:
    """One row per trial: its configuration, final / best accuracy, cost to reach `target`, mean alignment, status.

    The configuration columns (CONFIG_COLUMNS, seed, and any extra `carry` columns) hold each trial's first
    non-missing value; `acc_final`/`acc_max` are test accuracies (reported), `val_final`/`val_loss_final` the
    final validation ones (what chooses); the "to target" columns follow `steps_to_target` (vectorised); the
    counters (`steps`, `examples`, `communications`, ...) are the trial's final ones.
    """
    keys = _trial_keys(history)
    rows = _ordered(_select_phase(history, phase))
    config = [c for c in dict.fromkeys([*CONFIG_COLUMNS, "seed", *carry]) if c in rows.columns and c not in keys]
    if rows.empty:
        return pd.DataFrame(columns=[*keys, *config, *_TRIAL_METRICS])
    trial = rows.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()  # 0..n-1 in order of appearance
    contiguous = np.argsort(trial, kind="stable")  # each trial's rows together, in evaluation order
    rows, trial = rows.iloc[contiguous].reset_index(drop=True), trial[contiguous]
    by, position = rows.groupby(trial, sort=True), pd.Series(np.arange(len(rows)))
    last = rows.iloc[position.groupby(trial).last().to_numpy()].reset_index(drop=True)
    out = pd.concat([last[keys], by[config].first().reset_index(drop=True)], axis=1)
    out["evaluations"] = by.size().to_numpy()
    out["acc_final"] = _floats(last, "test_accuracy").to_numpy()
    out["acc_max"] = _floats(rows, "test_accuracy").groupby(trial).max().to_numpy()
    out["val_final"] = _floats(last, "val_accuracy").to_numpy()
    out["val_loss_final"] = _floats(last, "val_loss").to_numpy()
    found = _crossings(rows, trial, target, metric)
    crossings = found.reindex(range(len(out)))
    for column in crossings.columns:
        out[column] = crossings[column].to_numpy(dtype=float)
    out["reached"] = np.isin(np.arange(len(out)), found.index)
    for column in _FINAL:
        out[column] = _floats(last, column).to_numpy()
    out["wall_time"] = _floats(last, "wall_time").to_numpy()
    out["grad_variance_mean"] = _floats(rows, "grad_variance").groupby(trial).mean().to_numpy()
    out["grad_cosine_mean"] = _floats(rows, "grad_cosine").groupby(trial).mean().to_numpy()
    status = rows["status"] if "status" in rows.columns else pd.Series(NAN, index=rows.index)
    out["status"] = last["status"].to_numpy() if "status" in last.columns else NAN
    out["diverged"] = (status == "diverged").groupby(trial).any().to_numpy()
    out["error"] = (status == "error").groupby(trial).any().to_numpy()
    return out[[*keys, *config, *_TRIAL_METRICS]]


def rank_trials(trials: pd.DataFrame, score: str, mode: str = "max", tie: str = "val_loss") -> pd.DataFrame:
    """`trials` (one row per trial) best first, by the rule every choice of a best trial here follows: trials that
    did not diverge first, then `score` under `mode` (NaN last); a tie goes to the lower `tie` column (when there is
    one: the final validation loss), then to the smallest `trial_id`. Nothing here reads the test split. The same
    rows give the same order, whatever order they come in."""
    ranked = trials.assign(_diverged=trials["status"].eq("diverged") if "status" in trials else False)
    keys = ["_diverged", score, *([tie] if tie in ranked and score != tie else []), "trial_id"]
    ranked = ranked.sort_values(
        keys, ascending=[True, mode == "min", *[True] * (len(keys) - 2)], na_position="last", kind="stable"
    )
    return ranked.drop(columns="_diverged")


def _last_value(values: pd.Series):
    """The final evaluation's value, NaN included (groupby's "last" skips NaN)."""
    return values.iloc[-1]


def best_trials(
    history: pd.DataFrame,
    metric: str = "val_accuracy",
    group: Sequence[str] = DEFAULT_GROUP,
    mode: str = "max",
    reduce: str = "last",
    phase: str | None = None,
) -> pd.DataFrame:
    """Per cell, the trial whose `metric` (reduced over evaluations by 'last', 'max' or 'min') is best under `mode`.

    The order is `rank_trials`' (as for a study's choice, `ray_adapter.engine.best_config`): trials that did not diverge
    first; a tie in the score goes to the lower final validation loss, then to the smallest trial id.
    Returns the trial_table row of that trial plus a `score` column. A cell whose trials all have NaN scores
    (e.g. all diverged) still gets a row (score NaN), so its configuration can be inspected.
    """
    if mode not in ("max", "min") or reduce not in ("max", "min", "last"):
        raise ValueError(f"mode must be 'max'/'min' and reduce 'max'/'min'/'last', got {mode!r}, {reduce!r}")
    history = _select_phase(history, phase)
    _require(history, [*group, metric])
    keys = _trial_keys(history)
    by_trial = _ordered(history).groupby(keys, sort=False, dropna=False)
    score = by_trial[metric].agg(_last_value if reduce == "last" else reduce).rename("score")
    trials = trial_table(history, carry=group).merge(score.reset_index(), on=keys, how="left")
    best = rank_trials(trials, "score", mode, tie="val_loss_final").drop_duplicates(list(group))
    return best.sort_values(list(group)).reset_index(drop=True)


def summarize_cells(
    history: pd.DataFrame,
    target: float,
    group: Sequence[str] = DEFAULT_GROUP,
    phase: str | None = "seed",
    metric: str = TARGET_METRIC,
) -> pd.DataFrame:
    """The cells frame: per cell of `group`, statistics over its seed trials (rows of `phase`; None = all rows).

    Columns: the group, `cell` (ids joined), `n_seeds`, `seeds` (which ran); `acc_mean/std` (final test accuracy),
    `acc_max_mean/std` (best evaluation), `val_mean/std` (final validation accuracy); `<cost>_to_target_mean/std`
    for steps, examples, rounds, communications, messages and wall time (over the `n_reached` seeds whose `metric`
    reaches `target`; `reached` is "n_reached/n_seeds"); `wall_time_*` (whole run); `label_tv_mean/std` (the
    measured heterogeneity of the seeds' client splits); `epochs`, `examples`, `steps`, `communications` (the
    budget each seed spent: its mean); `grad_variance_mean`, `grad_cosine_mean`; the chosen hyperparameters;
    `diverged`, `errors` (trial counts); `target`. Std is the sample std (NaN with one seed).
    """
    group = list(group)
    _require(history, group)
    trials = trial_table(history, target, phase, carry=group, metric=metric)
    stat_cols = [f"{p}_{s}" for p, _ in _CELL_STATS for s in ("mean", "std")]
    chosen = [c for c in _CHOSEN if c in trials.columns and c not in group]
    spent = ("epochs", "examples", "steps", "communications")
    columns = [
        *group,
        "cell",
        "n_seeds",
        "seeds",
        *stat_cols,
        "n_reached",
        "reached",
        *spent,
        "grad_variance_mean",
        "grad_cosine_mean",
        *chosen,
        "diverged",
        "errors",
        "target",
    ]
    rows = []
    for key, cell in trials.groupby(group, sort=True, dropna=False):
        row = dict(zip(group, _as_tuple(key)))
        row["cell"] = "+".join(sorted(map(str, cell["cell"].dropna().unique()))) if "cell" in cell else ""
        row["n_seeds"] = len(cell)
        row["seeds"] = ", ".join(str(int(v)) for v in sorted(cell["seed"].dropna())) if "seed" in cell else ""
        for prefix, column in _CELL_STATS:
            row[f"{prefix}_mean"], row[f"{prefix}_std"] = cell[column].mean(), cell[column].std()
        row["n_reached"] = int(cell["reached"].sum())
        row["reached"] = f"{row['n_reached']}/{len(cell)}"
        row.update({c: cell[c].mean() for c in spent})
        row["grad_variance_mean"] = cell["grad_variance_mean"].mean()
        row["grad_cosine_mean"] = cell["grad_cosine_mean"].mean()
        row.update({c: _first_valid(cell[c]) for c in chosen})
        row["diverged"], row["errors"] = int(cell["diverged"].sum()), int(cell["error"].sum())
        row["target"] = target
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def noise_scale_from_history(
    history: pd.DataFrame, group: Sequence[str] = DEFAULT_GROUP, phase: str | None = "seed"
) -> pd.DataFrame:
    """Per cell, the simple gradient noise scale B_simple = mean tr(Sigma) / mean |G|^2 (McCandlish et al.).

    Numerator and denominator are averaged separately over all evaluations and seeds (the per-evaluation ratio
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


def significance(
    history: pd.DataFrame,
    a: str = "gradalign",
    b: str = "large_batch_sgd",
    by: str = "batch_size",
    metric: str = "acc_final",
    target: float | None = None,
    phase: str | None = "seed",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Welch comparison of algorithm `a` vs `b` over seeds, separately for each value of `by`.

    `metric` is a trial_table column (acc_final, acc_max, val_final, <cost>_to_target, wall_time, ...);
    'test_accuracy' means acc_final. Columns: by, a, b, metric, mean_a, mean_b, diff (a - b), ci_low, ci_high (its
    95% confidence interval), n_a, n_b (seeds with a value: for a cost to the target, those that reached it),
    n_a_total, n_b_total (all seeds), t, df, p_value, verdict ("not testable: ..." for n < 2 or no variance).
    """
    metric = "acc_final" if metric == "test_accuracy" else metric
    if metric.endswith("_to_target") and target is None:
        raise ValueError(f"metric={metric!r} needs a target accuracy")
    trials = trial_table(history, target, phase, carry=[by])
    _require(trials, [by, metric, "algorithm"])
    return compare_groups(trials, a, b, by, metric, alpha)


def collapsed_seeds(
    trials: pd.DataFrame, group: Sequence[str], num_classes: int | None = None, gap: float = 0.1
) -> pd.DataFrame:
    """Seed runs that collapsed without diverging: final test accuracy more than `gap` below the median of their
    cell's other seeds, or at chance level (<= 1.5 / num_classes). Such a run says the chosen configuration sits at
    the edge of stability; a mean over seeds would hide it. Returns the offending rows of `trials`."""
    flagged = []
    for _, cell in trials.groupby(list(group), sort=True, dropna=False):
        for index, row in cell.iterrows():
            others = cell.drop(index)["acc_final"].dropna()
            acc = row["acc_final"]
            if row.get("diverged", False) or not np.isfinite(acc):
                continue
            chance = num_classes is not None and acc <= 1.5 / num_classes
            if chance or (len(others) and acc < others.median() - gap):
                flagged.append(index)
    return trials.loc[flagged]


def pareto_front(
    cells: pd.DataFrame,
    x: str = "batch_size",
    y: str = "acc_mean",
    maximize_x: bool = True,
    maximize_y: bool = True,
    by: str | None = None,
) -> pd.DataFrame:
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


def edge_warnings(
    best_configs: pd.DataFrame,
    search_ranges: Mapping,
    tol: float = 0.05,
    params: Sequence[str] | None = None,
    label: Sequence[str] = ("algorithm", "batch_size"),
) -> list[str]:
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
                messages.append(
                    f"{param}={_fmt(value)} is {where} [{_fmt(lo)}, {_fmt(hi)}] for "
                    f"{_cell_label(row, label)}: widen the range"
                )
    return messages


def tuning_trials(history: pd.DataFrame, objective: str = "val_accuracy") -> pd.DataFrame:
    """Every tuning (and confirmation) trial with what chose it: one row per trial with `cell`, `algorithm`, `phase`,
    the searched parameters (lr, beta, momentum, ...), `score` (`objective` at its last evaluation), `status`, and
    `chosen` (True for the configuration the cell's seed runs ran). What the report's tuning figure draws."""
    keys = _trial_keys(history)
    rows = _ordered(history[history["phase"].isin(["tune", "confirm"])]) if "phase" in history else history.iloc[0:0]
    params = [c for c in ("lr", "beta", "momentum", "weight_decay", "mu", "server_lr", "batch_size") if c in rows]
    columns = ["cell", "algorithm", "phase", "trial_id", *params, "seed", "score", "status", "chosen"]
    if rows.empty or "cell" not in rows:
        return pd.DataFrame(columns=columns)
    last = rows.groupby(keys, sort=False, dropna=False).tail(1).reset_index(drop=True)
    out = last[[c for c in ("cell", "algorithm", "phase", "trial_id", *params, "seed") if c in last]].copy()
    out["score"] = _floats(last, objective).to_numpy()
    out["status"] = last["status"].to_numpy() if "status" in last else NAN
    if "trial_status" in last:  # (a trial ASHA stopped early: its score is from part of the budget)
        out.loc[(last["trial_status"] == "stopped").to_numpy(), "status"] = "stopped"
    seeded = history[history["phase"] == "seed"] if "phase" in history else history.iloc[0:0]
    chosen = seeded.groupby("cell")[params].first() if len(seeded) and params else pd.DataFrame()
    out["chosen"] = [
        cell in chosen.index and all(_same(row[p], chosen.loc[cell, p]) for p in params)
        for cell, (_, row) in zip(out["cell"], out.iterrows())
    ]
    return out.reindex(columns=columns)


def _same(a, b) -> bool:
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number)):
        return bool(np.isclose(a, b, rtol=1e-9, atol=0.0) or (np.isnan(a) and np.isnan(b)))
    return a == b
