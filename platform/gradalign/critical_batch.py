"""The critical batch size with intervals: a stratified bootstrap over seed runs of the McCandlish fit.

`stats.fit_critical_batch` fits S = S_min (1 + B_crit / B) to the mean steps-to-target of each batch size. Here the
seed runs are resampled and the fit repeated, which gives percentile intervals for B_crit, S_min and E_min = S_min
B_crit, and for the ratio and difference of two algorithms' B_crit:

- stratified: the seeds are resampled within each batch size (each cell keeps its number of seeds);
- paired: two algorithms that ran the same seeds at a batch size (same initialisation and batch order) get the same
  resampled seeds there, so what they share cancels in the ratio;
- refused below `min_batch_sizes` (3) batch sizes with a value: a 2-parameter fit through 2 points is exact, so
  nothing checks the McCandlish form and the bootstrap would only measure noise around a curve it cannot test.

Why not `scipy.stats.bootstrap`: its multi-sample mode resamples every sample independently and its `paired` mode
ties all samples to the same indices (equal sizes, every batch size tied to every other); pairing two algorithms
within each batch size while batch sizes stay independent is neither. One hand-rolled percentile bootstrap (a
dozen lines, `_draws`) serves the single fits and the ratio from the same resamples. Percentile intervals from 5-8
seeds per cell run a little short (the bootstrap's variance is (n - 1) / n of the true one): the coverage test
(`test_bootstrap_interval_covers_the_true_critical_batch`) measures what that costs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .stats import fit_critical_batch

__all__ = ["fit_many", "critical_batch_intervals"]

NAN = float("nan")
EDGE = 1e3
"""The fit searches B_crit in [min B / EDGE, max B x EDGE], as `stats.fit_critical_batch` does."""


def fit_many(batch_sizes: Sequence[float], steps: np.ndarray, grid: int = 100, refine: int = 21) -> tuple:
    """The McCandlish fit of every row of `steps` (R x J, NaN = no value at that batch size) at once.

    Least squares on log S over (log S_min, log B_crit), as `stats.fit_critical_batch`: log S_min is profiled out in
    closed form (the mean residual) and log B_crit is found on a grid over the fit range, then twice on a grid ten
    times finer around the best point (B_crit to about 0.2%). Returns (S_min, B_crit, pinned) arrays of length R;
    rows with fewer than 2 values are NaN; `pinned` marks B_crit at the edge of the fit range (only a bound).
    """
    b = np.asarray(batch_sizes, dtype=float)
    steps = np.atleast_2d(np.asarray(steps, dtype=float))
    w = np.isfinite(steps) & (steps > 0)
    y = np.log(np.where(w, steps, 1.0))
    lo, hi = math.log(b.min() / EDGE), math.log(b.max() * EDGE)

    def profile(log_b_crit):  # (R, G) grid -> residual sum of squares and log S_min, log S_min profiled out
        r = y[:, None, :] - np.log1p(np.exp(log_b_crit)[..., None] / b)
        mean = (w[:, None, :] * r).sum(-1) / np.maximum(w.sum(-1), 1)[:, None]
        return (w[:, None, :] * (r - mean[..., None]) ** 2).sum(-1), mean

    points, step = np.broadcast_to(np.linspace(lo, hi, grid), (len(y), grid)), (hi - lo) / (grid - 1)
    rows = np.arange(len(y))
    for _ in range(3):
        error, mean = profile(points)
        pick = np.argmin(error, axis=1)
        log_b_crit, log_s_min = points[rows, pick], mean[rows, pick]
        points = np.clip(log_b_crit[:, None] + np.linspace(-step, step, refine), lo, hi)
        step = 2 * step / (refine - 1)
    ok = w.sum(-1) >= 2
    pinned = ok & ((log_b_crit < lo + 0.01 * (hi - lo)) | (log_b_crit > hi - 0.01 * (hi - lo)))
    return np.where(ok, np.exp(log_s_min), NAN), np.where(ok, np.exp(log_b_crit), NAN), pinned


def _cells(trials: pd.DataFrame, algorithm: str, x: str, y: str) -> list[tuple[float, tuple, np.ndarray]]:
    """(batch size, seeds, values in seed order) of an algorithm's cells that have at least one value."""
    rows = trials[trials["algorithm"] == algorithm].sort_values([x, "seed"], kind="stable")
    out = []
    for value, cell in rows.groupby(x, sort=True):
        values = pd.to_numeric(cell[y], errors="coerce").to_numpy(float)
        if np.isfinite(values).any():
            out.append((float(value), tuple(cell["seed"]), values))
    return out


def _draws(cells, rng, n_resamples: int, cache: dict) -> np.ndarray:
    """Resampled cell means (R x J): seeds drawn with replacement within each cell; cells at the same batch size
    with the same seeds share their draw (paired). A resampled mean's spread around the cell's mean is widened by
    sqrt(n / (n - 1)) (n: the cell's values), which undoes the plain bootstrap's variance bias at small n
    (Hesterberg 2015, "What teachers should know about the bootstrap", the expanded percentile interval)."""
    means = []
    for value, seeds, values in cells:
        key = (value, seeds) if len(set(seeds)) == len(seeds) else object()  # repeated seeds: nothing to pair
        if key not in cache:
            cache[key] = rng.integers(0, len(values), size=(n_resamples, len(values)))
        n, center = np.isfinite(values).sum(), _nanmean(values)
        widen = math.sqrt(n / (n - 1)) if n > 1 else 1.0
        means.append(center + widen * (_nanmean(values[cache[key]]) - center))
    return np.stack(means, axis=1)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """The mean over the last axis of the finite values; NaN (silently) where there are none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=-1)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if not finite.size:
        return NAN, NAN
    low, high = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _summary(cells, s_min, b_crit, pinned, level, min_batch_sizes) -> dict:
    """The point fit (`fit_critical_batch` on the cell means) with the bootstrap's intervals and flags."""
    batch = [value for value, _, _ in cells]
    point = fit_critical_batch(batch, [_nanmean(values) for _, _, values in cells])
    out = {k: point[k] for k in ("S_min", "E_min", "B_crit", "n_points", "rms_log_residual", "reason", "curve")}
    out.update(level=level, seeds={v: int(np.isfinite(values).sum()) for v, _, values in cells})
    for name, samples in (("B_crit", b_crit), ("S_min", s_min), ("E_min", s_min * b_crit)):
        out[f"{name}_low"], out[f"{name}_high"] = _interval(samples, level)
    out["failed_resamples"] = int((~np.isfinite(b_crit)).sum())
    out["pinned_share"] = float(pinned.mean()) if pinned.size else NAN
    if len(batch) < min_batch_sizes:
        for name in ("B_crit", "S_min", "E_min"):
            out[f"{name}_low"] = out[f"{name}_high"] = NAN
        out["reason"] = (
            f"no interval: a 2-parameter fit needs at least {min_batch_sizes} batch sizes that reached the target "
            f"for any check of fit, have {len(batch)}" + (f"; {point['reason']}" if point["reason"] else "")
        )
    elif out["pinned_share"] > (1 - level) / 2 and out["reason"] is None:
        out["reason"] = (
            f"the interval reaches the edge of the fit range ({100 * out['pinned_share']:.0f}% of the resamples "
            "pin B_crit there): B_crit is only bounded"
        )
    return out


def critical_batch_intervals(
    trials: pd.DataFrame,
    algorithms: Sequence[str],
    *,
    x: str = "batch_size",
    y: str = "steps_to_target",
    pairs: Sequence[tuple[str, str]] = (),
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    min_batch_sizes: int = 3,
) -> dict:
    """B_crit, S_min, E_min with `level` bootstrap intervals per algorithm, and B_crit_a / B_crit_b per pair.

    `trials`: one row per seed run with `algorithm`, `x`, `seed` and `y` (NaN: the run never reached the target;
    a cell's value is the mean over the runs that did, as in the cells table). Returns {"fits": {algorithm: dict
    with S_min, E_min, B_crit (point fits), <name>_low/_high, n_points, seeds (per batch size), reason (None, or why
    refused / flagged), failed_resamples, pinned_share, curve}, "ratios": [dict with a, b, ratio, ratio_low,
    ratio_high, diff, diff_low, diff_high (B_crit_a - B_crit_b), paired, outcome ('larger' | 'smaller' |
    'undetermined': whether the ratio's interval excludes 1), reason]}.
    """
    missing = [c for c in ("algorithm", x, "seed", y) if c not in trials.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; have {list(trials.columns)}")
    rng, cache, fits, draws, seeds = np.random.default_rng(seed), {}, {}, {}, {}
    for algorithm in algorithms:
        cells = _cells(trials, algorithm, x, y)
        if cells:
            s_min, b_crit, pinned = fit_many([v for v, _, _ in cells], _draws(cells, rng, n_resamples, cache))
        else:
            s_min = b_crit = np.full(n_resamples, NAN)
            pinned = np.zeros(n_resamples, dtype=bool)
        fits[algorithm] = _summary(cells, s_min, b_crit, pinned, level, min_batch_sizes)
        draws[algorithm], seeds[algorithm] = b_crit, {v: s for v, s, _ in cells}
    ratios = [_ratio(a, b, fits, draws, seeds, level) for a, b in pairs if a in fits and b in fits]
    return {"fits": fits, "ratios": ratios}


def _ratio(a: str, b: str, fits: dict, draws: dict, seeds: dict, level: float) -> dict:
    """B_crit_a / B_crit_b and B_crit_a - B_crit_b with intervals from the same resamples; paired when the two
    ran the same seeds at every batch size they share."""
    fa, fb = fits[a], fits[b]
    shared = set(seeds[a]) & set(seeds[b])
    paired = bool(shared) and all(seeds[a][v] == seeds[b][v] for v in shared)
    out = {"a": a, "b": b, "ratio": fa["B_crit"] / fb["B_crit"], "diff": fa["B_crit"] - fb["B_crit"]}
    out.update(paired=paired, level=level, reason=None)
    refused = [name for name, fit in ((a, fa), (b, fb)) if not math.isfinite(fit["B_crit_low"])]
    if refused:
        out.update(ratio_low=NAN, ratio_high=NAN, diff_low=NAN, diff_high=NAN, outcome="undetermined")
        out["reason"] = f"no interval for {', '.join(refused)}'s B_crit"
        return out
    out["ratio_low"], out["ratio_high"] = (math.exp(v) for v in _interval(np.log(draws[a] / draws[b]), level))
    out["diff_low"], out["diff_high"] = _interval(draws[a] - draws[b], level)
    out["outcome"] = "larger" if out["ratio_low"] > 1 else "smaller" if out["ratio_high"] < 1 else "undetermined"
    return out
