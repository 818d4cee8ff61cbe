"""Statistics of a study: differences between algorithms over seeds, and the critical batch size.

Pure numpy / scipy / pandas. Every difference comes with its 95% confidence interval, p-value and n; a comparison
the data cannot test (fewer than 2 seeds on a side, or no variance on either side) says so instead of printing
p = 0. These are the fixed-n Welch tables of the report; the verdict's comparisons (paired where the seeds are
shared, with stated outcomes and a sequential design) are `gradalign.comparisons`, the critical batch size's
intervals `gradalign.critical_batch`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

__all__ = ["welch", "compare_groups", "fit_critical_batch", "fit_critical_batches"]

NAN = float("nan")
LEVEL = 0.95


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """Welch's unequal-variance comparison of the means of `a` and `b` (NaNs dropped).

    Returns dict(mean_a, mean_b, diff, ci_low, ci_high, n_a, n_b, t, df, p_value, testable, reason): the
    `level` confidence interval of mean_a - mean_b from scipy's Welch t-test (`ttest_ind(equal_var=False)`). Not
    testable (CI and p NaN, `reason` says why) with fewer than 2 values on a side or when both sides are constant.
    """
    va = np.asarray([v for v in a if np.isfinite(v)], dtype=float)
    vb = np.asarray([v for v in b if np.isfinite(v)], dtype=float)
    mean_a, mean_b = (float(v.mean()) if v.size else NAN for v in (va, vb))
    out = dict(
        mean_a=mean_a,
        mean_b=mean_b,
        diff=mean_a - mean_b,
        ci_low=NAN,
        ci_high=NAN,
        n_a=int(va.size),
        n_b=int(vb.size),
        t=NAN,
        df=NAN,
        p_value=NAN,
        testable=False,
        reason=None,
    )
    if va.size < 2 or vb.size < 2:
        out["reason"] = f"not testable: n={va.size} vs {vb.size} (need >= 2 on each side)"
        return out
    if va.var() + vb.var() == 0:
        out["reason"] = "not testable: no variance on either side (identical values)"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical values: scipy's precision warning
        result = stats.ttest_ind(va, vb, equal_var=False)
        ci = result.confidence_interval(confidence_level=level)
    out.update(
        ci_low=float(ci.low),
        ci_high=float(ci.high),
        t=float(result.statistic),
        df=float(result.df),
        p_value=float(result.pvalue),
        testable=True,
    )
    return out


def verdict(result: dict, a: str, b: str, alpha: float = 1 - LEVEL) -> str:
    """'significant at 0.05 (a higher)', 'not significant' or the reason it is not testable."""
    if not result["testable"]:
        return result["reason"]
    if result["p_value"] < alpha:
        return f"significant at {alpha:.2g} ({a} {'higher' if result['diff'] > 0 else 'lower'})"
    return "not significant"


def compare_groups(
    trials: pd.DataFrame, a: str, b: str, by: str, metric: str, alpha: float = 1 - LEVEL, reached: str | None = None
) -> pd.DataFrame:
    """Welch comparisons of algorithm `a` against `b` on `metric`, per value of `by`, from a trial table.

    With `reached` (a boolean column), `n_a_total`/`n_b_total` count every seed and `metric` is compared over
    those that reached the target only (the others have no value): the table says how many did.
    """
    columns = [
        by,
        "a",
        "b",
        "metric",
        "mean_a",
        "mean_b",
        "diff",
        "ci_low",
        "ci_high",
        "n_a",
        "n_b",
        "n_a_total",
        "n_b_total",
        "t",
        "df",
        "p_value",
        "verdict",
    ]
    rows = []
    for value, part in trials[trials["algorithm"].isin([a, b])].groupby(by, sort=True):
        side_a, side_b = part[part["algorithm"] == a], part[part["algorithm"] == b]
        result = welch(side_a[metric].to_numpy(float), side_b[metric].to_numpy(float))
        rows.append(
            {
                by: value,
                "a": a,
                "b": b,
                "metric": metric,
                **{k: result[k] for k in columns if k in result},
                "n_a_total": len(side_a),
                "n_b_total": len(side_b),
                "verdict": verdict(result, a, b, alpha),
            }
        )
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
    out = {
        "S_min": NAN,
        "E_min": NAN,
        "B_crit": NAN,
        "n_points": int(b.size),
        "rms_log_residual": NAN,
        "reason": None,
        "curve": pd.DataFrame(columns=["batch_size", "steps", "examples"], dtype=float),
    }
    if np.unique(b).size < 2:
        out["reason"] = f"need steps-to-target at >= 2 batch sizes, have {np.unique(b).size}"
        return out
    log_s = np.log(s)
    lo, hi = math.log(b.min() / 1e3), math.log(b.max() * 1e3)

    def residuals(theta):
        return log_s - theta[0] - np.log1p(np.exp(theta[1]) / b)

    # Profile out log S_min on a grid of log B_crit (closed form), then refine both jointly.
    grid = np.linspace(lo, hi, 400)
    profile = np.var(log_s - np.log1p(np.exp(grid)[:, None] / b), axis=1)
    t0 = grid[int(np.argmin(profile))]
    theta0 = [np.mean(log_s - np.log1p(np.exp(t0) / b)), t0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = optimize.least_squares(residuals, theta0, bounds=([-np.inf, lo], [np.inf, hi]), xtol=1e-14, ftol=1e-14)
    s_min, b_crit = float(np.exp(fit.x[0])), float(np.exp(fit.x[1]))
    out.update(S_min=s_min, B_crit=b_crit, E_min=s_min * b_crit, rms_log_residual=float(np.sqrt(np.mean(fit.fun**2))))
    if fit.x[1] < lo + 0.01 * (hi - lo) or fit.x[1] > hi - 0.01 * (hi - lo):
        shape = "no speed-up" if fit.x[1] < (lo + hi) / 2 else "perfect scaling"
        out["reason"] = f"B_crit is pinned at the edge of the fit range ({shape} over the measured batch sizes)"
    grid_b = np.geomspace(b.min() / 2, b.max() * 2, n_curve)
    steps = s_min * (1 + b_crit / grid_b)
    out["curve"] = pd.DataFrame({"batch_size": grid_b, "steps": steps, "examples": steps * grid_b})
    return out


def fit_critical_batches(
    cells: pd.DataFrame, by: str = "algorithm", x: str = "batch_size", y: str = "steps_to_target_mean"
) -> dict:
    """`fit_critical_batch` for each value of `by` in the cells frame: {value: fit dict}."""
    missing = [c for c in (by, x, y) if c not in cells.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; have {list(cells.columns)}")
    return {key: fit_critical_batch(part[x], part[y]) for key, part in cells.groupby(by, sort=True)}
