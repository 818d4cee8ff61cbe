"""Comparisons with stated outcomes: per-seed values of two cells in, one record per comparison out.

An outcome says what the confidence interval of the difference a - b shows, and nothing more:

- `better`: the whole interval above 0 (below 0 for a cost, `larger_is_better=False`);
- `worse`: the whole interval on the other side of 0;
- `equivalent`: the whole interval inside [-tolerance, +tolerance];
- `undetermined`: anything else, including a comparison the data cannot test (fewer than 2 values on a side, no
  spread, NaN), which says why in `reason` (never p = 0).

Precedence: an interval above 0 *and* inside the tolerance is `better` (`worse` likewise): a difference whose sign
is resolved is reported as one, however small; the record's `within_tolerance` says it is also smaller than the
tolerance, so a sentence may add "by less than 1 point".

Pairing: two cells that ran the same seeds (each once) share initialisation and batch order by construction, so
they are compared per seed (`scipy.stats.ttest_rel`); otherwise with Welch's test (`ttest_ind(equal_var=False)`).
Intervals are scipy's `confidence_interval`. With a `SequentialDesign` the comparison is replayed look by look on
the first n seeds (in seed order) at the look's level and stops at the first decided look, which is exactly what a
study that adds seeds only while undetermined does; so the outcome does not change when seeds are added later for
another comparison's sake.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .sequential import FIXED_LEVEL, SequentialDesign

__all__ = [
    "OUTCOMES",
    "decide",
    "t_interval",
    "sequential_outcomes",
    "seeds_needed",
    "compare_cells",
    "comparison_records",
    "open_comparisons",
    "seeds_wanted",
]

OUTCOMES = ("better", "worse", "equivalent", "undetermined")
NAN = float("nan")
MAX_SEEDS = 10_000
"""`seeds_needed` gives up beyond this many seeds per side."""


def decide(ci_low, ci_high, tolerance: float, larger_is_better: bool = True):
    """The outcome of an interval (scalars or arrays); NaN ends give `undetermined`. See the module's precedence."""
    low, high = np.asarray(ci_low, dtype=float), np.asarray(ci_high, dtype=float)
    above, below = low > 0, high < 0
    if not larger_is_better:
        above, below = below, above
    inside = (low >= -tolerance) & (high <= tolerance)
    out = np.select([above, below, inside], ["better", "worse", "equivalent"], "undetermined")
    return str(out) if out.ndim == 0 else out


def t_interval(a, b, *, paired: bool, level: float = FIXED_LEVEL) -> dict:
    """The mean difference a - b along the last axis with its `level` interval and p-value, from scipy's paired
    (`ttest_rel`) or Welch (`ttest_ind(equal_var=False)`) t-test. NaNs are left out (pairwise when paired).

    Returns arrays (scalars for 1-D input): mean_a, mean_b, diff, ci_low, ci_high, p_value, n_a, n_b; the interval
    and p are NaN where the data cannot be tested (fewer than 2 values on a side, or no spread).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if paired:
        both = np.isfinite(a) & np.isfinite(b)
        a, b = np.where(both, a, NAN), np.where(both, b, NAN)
    n_a, n_b = np.isfinite(a).sum(axis=-1), np.isfinite(b).sum(axis=-1)
    policy = "propagate" if np.isfinite(a).all() and np.isfinite(b).all() else "omit"
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # scipy warns on n < 2 and constant samples: those are NaN below
        if paired:
            result = stats.ttest_rel(a, b, axis=-1, nan_policy=policy)
            spread = np.nanvar(a - b, axis=-1)
        else:
            result = stats.ttest_ind(a, b, axis=-1, equal_var=False, nan_policy=policy)
            spread = np.nanvar(a, axis=-1) + np.nanvar(b, axis=-1)
        ci = result.confidence_interval(confidence_level=level)
        mean_a, mean_b = np.nanmean(a, axis=-1), np.nanmean(b, axis=-1)
    ok = (n_a >= 2) & (n_b >= 2) & (spread > 0) & np.isfinite(result.statistic)
    return {
        "mean_a": mean_a,
        "mean_b": mean_b,
        "diff": mean_a - mean_b,
        "ci_low": np.where(ok, ci.low, NAN),
        "ci_high": np.where(ok, ci.high, NAN),
        "p_value": np.where(ok, result.pvalue, NAN),
        "n_a": n_a,
        "n_b": n_b,
    }


def _looks(design: SequentialDesign | None, n_a: int, n_b: int) -> list[tuple[int | None, float]]:
    """(seeds used per side, level) of each look the data has reached. No design: one look at every seed, 95%.
    Fewer seeds than the first look: one look at what there is, at the first look's (strictest) level."""
    if design is None:
        return [(None, FIXED_LEVEL)]
    reached = [(n, level) for n, level in zip(design.looks, design.levels) if n <= min(n_a, n_b)]
    return reached or [(min(n_a, n_b), design.levels[0])]


def sequential_outcomes(
    a, b, design: SequentialDesign | None, *, paired: bool, tolerance: float, larger_is_better: bool = True
) -> dict:
    """Replay a sequential study on per-seed values in seed order (last axis; leading axes are independent studies):
    at each look the data has reached, compare the first n seeds of each side at the look's level, and keep the
    first decided look. Returns `t_interval`'s arrays at that look (or the last one) plus outcome, level, look (1-based
    index into the design's looks) and seeds (per side, the look's n). Without a design: one 95% look at all seeds.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    out, done = None, np.zeros(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]), dtype=bool)
    for k, (n, level) in enumerate(_looks(design, a.shape[-1], b.shape[-1]), start=1):
        look = t_interval(a[..., :n], b[..., :n], paired=paired, level=level)
        look["outcome"] = decide(look["ci_low"], look["ci_high"], tolerance, larger_is_better)
        look.update(level=np.full(done.shape, level), look=np.full(done.shape, k))
        look["seeds"] = np.full(done.shape, n if n is not None else max(a.shape[-1], b.shape[-1]))
        out = look if out is None else {key: np.where(done, out[key], look[key]) for key in out}
        done = done | (np.asarray(out["outcome"]) != "undetermined")
    return out


def seeds_needed(
    a, b, *, paired: bool, tolerance: float, design: SequentialDesign | None = None, limit: int = MAX_SEEDS
) -> tuple[int | None, str | None]:
    """Seeds per side that would likely decide an undetermined comparison, or None and why not.

    A planning number from the observed values (NaNs left out): the n at which the interval's half-width, t x the
    observed spread / sqrt(n) at the level of the look n falls in (95% without a design), shrinks to the distance
    from the estimate to the nearest decision boundary (0 to become better/worse, the tolerance to become
    equivalent). If the true difference equals the estimate, about half of such studies decide at that n; the
    spread itself is a guess from few seeds.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if paired:
        both = np.isfinite(a) & np.isfinite(b)
        a, b = a[both], b[both]
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if min(a.size, b.size) < 2:
        return None, f"needs at least 2 values per side to estimate the spread (have {a.size} vs {b.size})"
    diff = abs(a.mean() - b.mean())
    distance = max(diff, tolerance - diff)
    var_a, var_b = (float(np.var(a - b, ddof=1)), 0.0) if paired else (float(a.var(ddof=1)), float(b.var(ddof=1)))
    if var_a + var_b == 0:
        return None, "no spread between seeds to extrapolate from"
    if distance <= 0:
        return None, "the estimate sits on the decision boundary (difference 0, tolerance 0): no n decides it"
    n = np.arange(max(a.size, b.size) + 1, limit + 1)
    if paired:
        df = n - 1.0
    else:
        df = (n - 1.0) * (var_a + var_b) ** 2 / (var_a**2 + var_b**2)
    levels = design.level_at(n) if design is not None else FIXED_LEVEL
    half = stats.t.ppf(0.5 + levels / 2, df) * np.sqrt((var_a + var_b) / n)
    hit = np.flatnonzero(half <= distance)
    return (int(n[hit[0]]), None) if hit.size else (None, f"more than {limit} seeds per side")


def _plain(value):
    """numpy scalars as Python ones (the records go to JSON)."""
    return value.item() if hasattr(value, "item") else value


def _untestable(n_a: int, n_b: int, ci_low: float, paired: bool) -> str | None:
    if math.isfinite(ci_low):
        return None
    if min(n_a, n_b) < 2:
        return f"not testable: n = {n_a} vs {n_b} (need at least 2 on each side)"
    if paired:
        return "not testable: every per-seed difference is the same (no spread)"
    return "not testable: no spread on either side (identical values)"


def compare_cells(
    rows_a: pd.DataFrame,
    rows_b: pd.DataFrame,
    metric: str,
    *,
    tolerance: float,
    design: SequentialDesign | None = None,
    larger_is_better: bool = True,
    pair_by_seed: bool = True,
) -> dict:
    """One comparison of two cells' seed runs (rows with `seed` and `metric`): the record's statistical keys.

    Paired when both ran the same seeds (each once) over the seeds the looks use, else Welch."""
    rows_a, rows_b = rows_a.sort_values("seed", kind="stable"), rows_b.sort_values("seed", kind="stable")
    seeds_a, seeds_b = rows_a["seed"].tolist(), rows_b["seed"].tolist()
    used = None if design is None else min(len(seeds_a), len(seeds_b))
    same = seeds_a[:used] == seeds_b[:used] if used is not None else seeds_a == seeds_b
    paired = bool(pair_by_seed and same and len(set(seeds_a)) == len(seeds_a) and len(set(seeds_b)) == len(seeds_b))
    a, b = (pd.to_numeric(r[metric], errors="coerce").to_numpy(float) for r in (rows_a, rows_b))
    found = sequential_outcomes(a, b, design, paired=paired, tolerance=tolerance, larger_is_better=larger_is_better)
    r = {k: _plain(v) for k, v in found.items()}
    n = r["seeds"]
    at_cap = design is not None and n >= design.cap
    record = {**r, "paired": paired, "tolerance": tolerance, "larger_is_better": larger_is_better}
    record.update(
        runs_a=len(seeds_a),
        runs_b=len(seeds_b),
        reason=_untestable(r["n_a"], r["n_b"], r["ci_low"], paired),
        within_tolerance=bool(r["ci_low"] >= -tolerance and r["ci_high"] <= tolerance),
        open=bool(design is not None and r["outcome"] == "undetermined" and not at_cap),
        at_cap=bool(r["outcome"] == "undetermined" and at_cap),
        design=design.describe() if design is not None else f"fixed: {FIXED_LEVEL:.0%} intervals",
        n_needed=None,
        n_needed_reason="decided",
    )
    if r["outcome"] == "undetermined":
        cut = slice(None) if design is None else slice(n)
        record["n_needed"], record["n_needed_reason"] = seeds_needed(
            a[cut], b[cut], paired=paired, tolerance=tolerance, design=design
        )
    return record


def comparison_records(
    trials: pd.DataFrame,
    *,
    x: str,
    metric: str = "acc_final",
    pairs: Sequence[tuple[str, str]] = (),
    reference: str | None = None,
    tolerance: float = 0.0,
    design: SequentialDesign | None = None,
    within: str | None = None,
    larger_is_better: bool = True,
    pair_by_seed: bool = True,
) -> list[dict]:
    """One plain dict per comparison of a study's seed runs (`trials`: one row per run with `algorithm`, `x`,
    `seed`, `metric`, and `within` if given).

    Each pair (a, b) is compared at every value of `x` where both ran; `reference` (e.g. small-batch SGD, which
    runs at one x only) is compared with every x of every other algorithm. With `within` (e.g. the federated
    study's `split`), only rows sharing its value are compared, and the reference is the one in the same stratum.
    Keys: a, b, x, metric, diff (a - b), ci_low, ci_high, n_a, n_b (values used), paired, tolerance, outcome,
    n_needed, n_needed_reason; and mean_a, mean_b, p_value, level (of the interval), look (1-based), seeds (per
    cell, at that look), x_a, x_b (the cells' own x), runs_a, runs_b (seed runs per cell), reason (why not
    testable), within_tolerance, open (undetermined below the cap: add seeds), at_cap, design, larger_is_better.
    """
    columns = ["algorithm", x, "seed", metric, *([within] if within else [])]
    missing = [c for c in columns if c not in trials.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; have {list(trials.columns)}")
    if tolerance < 0:
        raise ValueError(f"Invalid tolerance value: {tolerance} (>= 0)")
    strata = trials.groupby(within, sort=True) if within else [(None, trials)]
    options = dict(tolerance=tolerance, design=design, larger_is_better=larger_is_better, pair_by_seed=pair_by_seed)
    records = []
    for stratum, part in strata:
        tag = {within: _plain(stratum)} if within else {}
        cells = {key: rows for key, rows in part.groupby(["algorithm", x], sort=True)}
        chosen = [
            ((a, value), (b, value)) for a, b in pairs for (alg, value) in cells if alg == a and (b, value) in cells
        ]
        ref = [key for key in cells if key[0] == reference]
        if len(ref) > 1:
            raise ValueError(f"the reference {reference!r} ran at several {x} values {[v for _, v in ref]}: ambiguous")
        chosen += [(key, ref[0]) for key in cells if ref and key[0] != reference]
        for (a, x_a), (b, x_b) in chosen:
            head = {"a": a, "b": b, "x": _plain(x_a), "metric": metric, "x_a": _plain(x_a), "x_b": _plain(x_b)}
            records.append({**head, **tag, **compare_cells(cells[(a, x_a)], cells[(b, x_b)], metric, **options)})
    return records


def open_comparisons(records: Sequence[dict]) -> list[dict]:
    """The records a sequential study still has to decide: undetermined and below the cap."""
    return [r for r in records if r.get("open")]


def seeds_wanted(records: Sequence[dict], design: SequentialDesign) -> dict[tuple[str, object], int]:
    """{(algorithm, x value): seeds per cell at the next look} for the cells of open comparisons, e.g.
    {("gradalign", 256): 5}. A cell in several open comparisons gets the largest; cells absent need nothing."""
    wanted: dict[tuple[str, object], int] = {}
    for r in open_comparisons(records):
        for side in ("a", "b"):
            cell, runs = (r[side], r[f"x_{side}"]), r[f"runs_{side}"]
            target = design.next_look(min(r["runs_a"], r["runs_b"]))
            if target is not None and target > runs:
                wanted[cell] = max(wanted.get(cell, 0), target)
    return wanted
