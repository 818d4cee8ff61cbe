"""The verdict: a few plain sentences, generated from a study's comparison records, that open its report.

Data first: the records of `gradalign.comparisons.comparison_records` (one per comparison: difference, interval,
n, paired, tolerance, outcome, n_needed) and the intervals of `gradalign.critical_batch`; `scaling_facts` /
`federated_facts` gather them, `scaling_sentences` / `federated_sentences` phrase them. A sentence claims only what
its record's interval shows (`claim`):

- "within T points of" only for `equivalent` (the whole interval inside +-T);
- "above" only for `better`, "below" only for `worse` (accuracy: larger is better); "more than T points above /
  below" only when the whole interval lies beyond +T / -T; "by less than T points" when it also lies inside +-T;
- "undetermined against", with the seeds per side that would likely decide it, or why not, or that the cap of a
  sequential design was reached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .comparisons import decide
from .sequential import SequentialDesign

__all__ = [
    "protocol_sentence",
    "accuracy_standard_error",
    "as_records",
    "claim",
    "evidence",
    "scaling_facts",
    "scaling_sentences",
    "step_size_caveat",
    "federated_facts",
    "federated_sentences",
]

NAMES = {
    "sgd": "small-batch SGD",
    "large_batch_sgd": "large-batch SGD",
    "gradalign": "GradAlign",
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "scaffold": "SCAFFOLD",
    "fedga": "FedGA",
}
POINTS = ("acc", "val")
"""Metrics whose prefix is one of these are accuracies in [0, 1], stated in percentage points."""


def _name(algorithm: str, start: bool = False) -> str:
    name = NAMES.get(algorithm, algorithm)
    return name[0].upper() + name[1:] if start else name


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _is_points(record: Mapping[str, Any]) -> bool:
    return str(record.get("metric", "")).startswith(POINTS)


def _amount(record: Mapping[str, Any], value: float, sign: bool = True) -> str:
    """A difference in the record's unit: accuracy points (+1.2) or counts (+12)."""
    if not _finite(value):
        return "n/a"
    if _is_points(record):
        return f"{100 * value:+.1f}" if sign else f"{100 * value:g}"
    return f"{value:+.3g}" if sign else f"{value:g}"


def _tolerance(record: Mapping[str, Any]) -> str:
    """'1 point', '0.5 points', '10' (counts)."""
    tol = record["tolerance"]
    if _is_points(record):
        return f"{100 * tol:g} point" + ("" if 100 * tol == 1 else "s")
    return f"{tol:g}"


def accuracy_standard_error(test_size: int, accuracy: float) -> float:
    """The binomial standard error of one run's test accuracy on `test_size` examples."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / test_size) if test_size else math.nan


def protocol_sentence(
    trials_per_cell: int,
    seeds: int,
    budget: str,
    test_size: int | None = None,
    accuracy: float | None = None,
    tuning_seeds: int = 1,
    design: SequentialDesign | None = None,
    tuning: str | None = None,
) -> str:
    """How the numbers were made, in one or two sentences (and the noise floor one test set implies).

    `seeds`: the seeds per cell of a fixed-n study (`--seeds N`); with a sequential `design` (`--seeds auto`) the
    sentence states its looks and levels instead. `tuning`: how the cells were tuned, in words (e.g.
    `StudyProtocol.tuning_sentence()`), instead of the number of trials."""
    scored = "the mean of its seeds' validation accuracy" if tuning_seeds > 1 else "its validation accuracy"
    if design is not None and len(design.looks) > 1:
        runs = (
            f"re-ran with {design.looks[0]} new seeds, and with more in rounds while one of its comparisons was "
            f"undetermined: {design.describe()}; the test accuracy of these runs is reported (mean, interval, n)"
        )
    else:
        runs = f"re-ran with {seeds} new seeds whose test accuracy is reported (mean, 95% CI, n)"
    how = tuning or f"{trials_per_cell} trials scored by {scored}"
    text = f"Protocol: every cell was tuned with {how}, then its chosen configuration {runs}; budget: {budget}."
    if test_size and accuracy is not None and _finite(accuracy):
        se = accuracy_standard_error(test_size, accuracy)
        text += (
            f" On the {test_size}-example test set one run's accuracy near {100 * accuracy:.0f}% has a "
            f"standard error of {100 * se:.1f} points, so smaller differences between single runs are noise."
        )
    return text


# -- one record ----------------------------------------------------------------------------------------------------
def as_records(comparisons: Sequence[Mapping] | pd.DataFrame, tolerance: float = 0.0, x: str = "x") -> list[dict]:
    """Comparison records as a list of dicts. A legacy Welch table (`report.significance_tables`: one row per
    comparison with a, b, metric, diff, ci_low, ci_high, n_a, n_b and the axis column `x`) is turned into records:
    unpaired, 95%, outcome from its interval (costs: smaller is better, no tolerance), n_needed not estimated."""
    if not isinstance(comparisons, pd.DataFrame):
        return [dict(r) for r in comparisons]
    out = []
    for row in comparisons.to_dict("records"):
        points = str(row["metric"]).startswith(POINTS)
        tol = tolerance if points else 0.0
        low, high = row["ci_low"], row["ci_high"]
        out.append(
            {
                **row,
                "x": row.get(x, row.get("x")),
                "paired": False,
                "tolerance": tol,
                "level": 0.95,
                "larger_is_better": points,
                "outcome": decide(low, high, tol, points),
                "within_tolerance": bool(_finite(low) and low >= -tol and high <= tol),
                "reason": None if _finite(low) else row.get("verdict", "not testable"),
                "n_needed": None,
                "n_needed_reason": "not estimated (a fixed-n Welch table)",
                "at_cap": False,
            }
        )
    return out


def claim(record: Mapping[str, Any], other: str = "it") -> str:
    """What the record's interval shows about a - b, as a phrase about `other` (b): 'within 1 point of it', 'above
    it', 'more than 1 point below it', 'below it by less than 1 point', 'undetermined against it'. See the module
    docstring for the rules."""
    low, high, outcome, tol = record["ci_low"], record["ci_high"], record["outcome"], record["tolerance"]
    if outcome == "equivalent":
        return f"within {_tolerance(record)} of {other}"
    if outcome not in ("better", "worse") or not (_finite(low) and _finite(high)):
        return f"undetermined against {other}"
    word = "above" if low > 0 else "below"
    if tol > 0 and ((word == "above" and low > tol) or (word == "below" and high < -tol)):
        return f"more than {_tolerance(record)} {word} {other}"
    if tol > 0 and low >= -tol and high <= tol:
        return f"{word} {other} by less than {_tolerance(record)}"
    return f"{word} {other}"


def evidence(record: Mapping[str, Any]) -> str:
    """'-1.2 points, 95% CI [-2.6, +0.2], n = 3 vs 3, paired', and for an undetermined record what would decide it."""
    unit = " points" if _is_points(record) else ""
    n = f"n = {record['n_a']} vs {record['n_b']}" + (", paired" if record.get("paired") else "")
    if _finite(record["ci_low"]):
        level = f"{100 * record.get('level', 0.95):.3g}% CI"
        ci = f"{level} [{_amount(record, record['ci_low'])}, {_amount(record, record['ci_high'])}]"
        text = f"{_amount(record, record['diff'])}{unit}, {ci}, {n}"
    else:
        text = f"{_amount(record, record['diff'])}{unit}, {n}: {record.get('reason') or 'not testable'}"
    if record["outcome"] != "undetermined":
        return text
    needed = record.get("n_needed")
    more = f"about {needed} seeds per side would likely decide it" if needed else record.get("n_needed_reason")
    if record.get("at_cap"):
        cap = f"still undetermined at the cap of {record['seeds']} seeds per cell"
        return f"{text}; {cap}" + (f"; {more}" if more else "")
    return f"{text}; {more}" if more else text


def _clauses(records: Sequence[Mapping[str, Any]], other: str, x: str | None) -> str:
    """'within 1 point of <other> at B = 64 (...), below it at B = 256 (...)': one clause per record."""
    label = "B" if x == "batch_size" else x
    parts = []
    for i, r in enumerate(records):
        value = r["x"]
        where = "" if x is None else f" at {label} = {value:g}" if isinstance(value, (int, float)) else f" at {value}"
        parts.append(f"{claim(r, other if i == 0 else 'it')}{where} ({evidence(r)})")
    return ", ".join(parts)


# -- batch scaling -------------------------------------------------------------------------------------------------
def scaling_facts(
    cells: pd.DataFrame,
    comparisons: Sequence[Mapping] | pd.DataFrame,
    fits: Mapping[str, dict],
    noise: Mapping[str, float] | None = None,
    reference: str = "sgd",
    tolerance: float = 0.01,
    x: str = "batch_size",
    ratios: Sequence[Mapping] = (),
    metric: str = "acc_final",
) -> dict:
    """The numbers the batch-scaling verdict states.

    `comparisons`: the records of `comparison_records` (or a legacy Welch table, see `as_records`); only `metric`'s
    are used. `fits`: per algorithm, `critical_batch_intervals(...)["fits"]` (or `stats.fit_critical_batches`,
    without intervals); `ratios`: its "ratios"; `noise`: B_simple per algorithm. Returns reference (the reference
    cell's accuracy and n), versus_reference ({algorithm: records by x}), pairs ({(a, b): records by x} for the
    comparisons that do not involve the reference), fits, ratios, tolerance.
    """
    records = [r for r in as_records(comparisons, tolerance, x) if r["metric"] == metric]
    ref_cells = cells[cells["algorithm"] == reference]
    facts: dict[str, Any] = {"reference": None, "versus_reference": {}, "pairs": {}, "tolerance": tolerance}
    if len(ref_cells):
        r = ref_cells.iloc[0]
        facts["reference"] = {
            "algorithm": reference,
            x: r[x],
            "acc": r["acc_mean"],
            "std": r["acc_std"],
            "n": int(r["n_seeds"]),
        }
    for r in sorted(records, key=lambda r: (r["a"], r["x"])):
        if r["b"] == reference:
            facts["versus_reference"].setdefault(r["a"], []).append(r)
        elif reference not in (r["a"], r["b"]):
            facts["pairs"].setdefault((r["a"], r["b"]), []).append(r)
    noise = noise or {}
    facts["fits"] = {a: {**fit, "B_simple": noise.get(a)} for a, fit in fits.items()}
    facts["ratios"] = [dict(r) for r in ratios]
    return facts


def _critical_batch_sentence(facts: Mapping[str, Any], target: float | None) -> str | None:
    parts = []
    for algorithm, f in facts["fits"].items():
        if not _finite(f.get("B_crit")):
            continue
        interval = f" [{f['B_crit_low']:.3g}, {f['B_crit_high']:.3g}]" if _finite(f.get("B_crit_low")) else ""
        parts.append(f"{_name(algorithm)} {f['B_crit']:.3g}{interval}" + (f" ({f['reason']})" if f["reason"] else ""))
    if not parts:
        return None
    goal = f"{100 * target:.0f}% validation accuracy" if target is not None else "the target"
    with_ci = any(_finite(f.get("B_crit_low")) for f in facts["fits"].values())
    how = "; 95% bootstrap intervals over seeds" if with_ci else ""
    text = f"Critical batch size B_crit (McCandlish fit of the steps to {goal}{how}): {'; '.join(parts)}."
    for r in facts["ratios"]:
        pair = f"{_name(r['a'], start=True)} / {_name(r['b'])}"
        if not _finite(r.get("ratio_low")):
            text += f" {pair}: ratio {r['ratio']:.3g}, no interval ({r['reason']})."
            continue
        read = {
            "larger": f"{_name(r['a'])}'s is larger",
            "smaller": f"{_name(r['a'])}'s is smaller",
            "undetermined": "the data cannot tell the two apart",
        }[r["outcome"]]
        text += f" {pair}: ratio {r['ratio']:.3g} [{r['ratio_low']:.3g}, {r['ratio_high']:.3g}]: {read}."
    predicted = [f"{_name(a)} {f['B_simple']:.3g}" for a, f in facts["fits"].items() if _finite(f.get("B_simple"))]
    if predicted:
        text += f" The gradient noise scale predicts B_simple ≈ {', '.join(predicted)}."
    return text


def scaling_sentences(facts: Mapping[str, Any], target: float | None = None, x: str = "batch_size") -> list[str]:
    """The verdict of a batch-scaling study: each algorithm against the reference at every B, B_crit with its
    interval, and each compared pair (GradAlign against large-batch SGD) at every B."""
    out = []
    ref = facts["reference"]
    if ref is not None:
        spread = f" ± {100 * ref['std']:.1f}" if _finite(ref["std"]) else ""
        out.append(
            f"The reference, {_name(ref['algorithm'])} at b = {ref[x]:g}, reaches {100 * ref['acc']:.1f}%"
            f"{spread} test accuracy (n = {ref['n']})."
        )
    for algorithm, records in facts["versus_reference"].items():
        out.append(f"{_name(algorithm, start=True)} is {_clauses(records, 'the reference', x)}.")
    text = _critical_batch_sentence(facts, target)
    if text:
        out.append(text)
    for (a, b), records in facts["pairs"].items():
        out.append(f"{_name(a, start=True)} is {_clauses(records, _name(b), x)}.")
    return out


def step_size_caveat(
    records: Sequence[Mapping[str, Any]],
    cells: pd.DataFrame,
    study: str,
    x: str = "batch_size",
    metric: str = "acc_final",
    param: str = "lr",
    ratio: float = 1.1,
) -> str | None:
    """A sentence for the decided comparisons between two tuned algorithms (not against the reference) whose cells
    were tuned to step sizes more than `ratio` apart: such a difference may be where each cell's tuning landed, not
    the algorithms'; `benchmarks/same_step_size.py` retrains both at each other's step size. None if there is none.
    `cells`: one row per cell with `algorithm`, `x` and `param`; `study`: the output folder, for the command."""
    if cells.empty or param not in cells.columns:
        return None
    chosen = {(row["algorithm"], row[x]): row[param] for _, row in cells.iterrows()}
    apart = []
    for r in records:
        if r.get("metric") != metric or r.get("outcome") not in ("better", "worse") or r.get("x_a") != r.get("x_b"):
            continue
        a, b = chosen.get((r["a"], r["x"])), chosen.get((r["b"], r["x"]))
        if _finite(a) and _finite(b) and max(a, b) / min(a, b) > ratio:
            apart.append((r, a, b))
    if not apart:
        return None
    r0 = apart[0][0]
    where = "; ".join(f"B = {r['x']:g}: {a:.3g} vs {b:.3g}" for r, a, b in apart)
    return (
        f"The decided {_name(r0['a'])} − {_name(r0['b'])} differences compare cells tuned to different step sizes "
        f"({where}): a difference is the algorithms' only if it survives a common step size (`python "
        f"benchmarks/same_step_size.py --study {study} --cells {r0['a']}-B{r0['x']:g} {r0['b']}-B{r0['x']:g}`)."
    )


# -- federated -----------------------------------------------------------------------------------------------------
def federated_facts(
    cells: pd.DataFrame,
    comparisons: Sequence[Mapping] | pd.DataFrame,
    by: str = "setting",
    focus: str = "fedga",
    tolerance: float = 0.01,
) -> list[dict]:
    """Per setting: the algorithm with the highest mean test accuracy, and the records (of `comparison_records`
    with x = `by`, or a legacy Welch table) about that setting: `focus`'s comparisons first, then the others'
    (e.g. every algorithm against a reference)."""
    records = as_records(comparisons, tolerance, by)
    out = []
    for setting, part in cells.groupby(by, sort=True):
        top = part.sort_values("acc_mean", ascending=False).iloc[0]
        here = [r for r in records if r["x"] == setting]
        tv = part["label_tv_mean"].mean() if "label_tv_mean" in part else math.nan
        out.append(
            {
                "setting": setting,
                "label_tv": tv,
                "best": top["algorithm"],
                "best_acc": top["acc_mean"],
                "rows": sorted(here, key=lambda r: (r["a"] != focus, r["a"], r["b"])),
            }
        )
    return out


def federated_sentences(facts: Sequence[Mapping[str, Any]], focus: str = "fedga") -> list[str]:
    """Per setting: the highest mean, then what each comparison shows on final accuracy and on the cost to the
    target (e.g. 'FedGA against FedAvg: within 1 point (...)')."""
    out = []
    for f in facts:
        tv = f" (measured label heterogeneity {f['label_tv']:.2f})" if _finite(f["label_tv"]) else ""
        text = f"{f['setting']}{tv}: highest mean test accuracy {_name(f['best'])}, {100 * f['best_acc']:.1f}%"
        acc = [r for r in f["rows"] if _is_points(r)]
        if acc:
            text += "; " + "; ".join(
                f"{_name(r['a'], start=True)} is {_clauses([r], _name(r['b']), None)}" for r in acc
            )
        cost = [r for r in f["rows"] if not _is_points(r) and _finite(r["diff"])]
        if cost:
            noun = str(cost[0]["metric"]).replace("_", " ")
            text += f"; {noun}: " + "; ".join(
                f"{_name(r['a'], start=True)} is {_clauses([r], _name(r['b']), None)}" for r in cost
            )
        out.append(text + ".")
    return out
