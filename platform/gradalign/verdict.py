"""The verdict: a few plain sentences, generated from a study's analysis, that open its report.

Data first: `scaling_facts` / `federated_facts` collect the numbers (plain dicts, tested on their own), then
`scaling_sentences` / `federated_sentences` phrase them. Every difference is stated with its 95% confidence
interval and n; nothing is called a difference that the data cannot tell apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

__all__ = [
    "protocol_sentence",
    "accuracy_standard_error",
    "scaling_facts",
    "scaling_sentences",
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


def _name(algorithm: str, start: bool = False) -> str:
    name = NAMES.get(algorithm, algorithm)
    return name[0].upper() + name[1:] if start else name


def _tolerance(points: float) -> str:
    return f"{points:g} point" + ("" if points == 1 else "s")


def _points(value: float) -> str:
    """An accuracy difference in percentage points, signed."""
    return f"{100 * value:+.1f}"


def _ci(row: Mapping[str, Any], counts: bool = False) -> str:
    """'95% CI [lo, hi], n = a vs b, p = ...' of a comparison row (accuracy points, or counts)."""
    n = f"n = {int(row['n_a'])} vs {int(row['n_b'])}"
    if not _finite(row.get("ci_low")):
        return f"{n}; {row.get('verdict', 'not testable')}"
    show = (lambda v: f"{v:+.0f}") if counts else _points
    return f"95% CI [{show(row['ci_low'])}, {show(row['ci_high'])}], {n}, p = {row['p_value']:.2g}"


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


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
) -> str:
    """How the numbers were made, in one or two sentences (and the noise floor one test set implies)."""
    scored = "the mean of its seeds' validation accuracy" if tuning_seeds > 1 else "its validation accuracy"
    text = (
        f"Protocol: every cell was tuned with {trials_per_cell} trials scored by {scored}, then its best "
        f"configuration re-ran with {seeds} new seeds whose test accuracy is reported (mean, 95% CI, n); "
        f"budget: {budget}."
    )
    if test_size and accuracy is not None and _finite(accuracy):
        se = accuracy_standard_error(test_size, accuracy)
        text += (
            f" On the {test_size}-example test set one run's accuracy near {100 * accuracy:.0f}% has a "
            f"standard error of {100 * se:.1f} points, so smaller differences between single runs are noise."
        )
    return text


# -- batch scaling -----------------------------------------------------------------------------------------------
def scaling_facts(
    cells: pd.DataFrame,
    sig: pd.DataFrame,
    fits: Mapping[str, dict],
    noise: Mapping[str, float],
    reference: str = "sgd",
    tolerance: float = 0.01,
    x: str = "batch_size",
) -> dict:
    """The numbers the batch-scaling verdict states.

    For every algorithm but the reference: its difference from the reference at each B (from `sig`, the rows
    comparing it with the reference on acc_final), the largest B up to which the mean difference stays above
    -`tolerance` at every B (`holds_up_to`, None if not even the smallest), and the first B where it does not
    (`first_drop`, with its CI row). Plus the McCandlish fits, B_simple and GradAlign - large-batch SGD rows.
    """
    acc = sig[sig["metric"] == "acc_final"] if len(sig) else sig
    ref_cells = cells[cells["algorithm"] == reference]
    facts: dict[str, Any] = {
        "reference": None,
        "algorithms": {},
        "fits": {},
        "gradalign_vs_large_batch": [],
        "tolerance": tolerance,
    }
    if len(ref_cells):
        r = ref_cells.iloc[0]
        facts["reference"] = {
            "algorithm": reference,
            x: r[x],
            "acc": r["acc_mean"],
            "std": r["acc_std"],
            "n": int(r["n_seeds"]),
        }
    for algorithm in sorted(set(cells["algorithm"]) - {reference}):
        rows = acc[(acc["a"] == algorithm) & (acc["b"] == reference)].sort_values(x) if len(acc) else acc
        holds, drop = None, None
        for row in rows.to_dict("records"):
            if not _finite(row["diff"]):
                continue
            if row["diff"] >= -tolerance and drop is None:
                holds = row[x]
            elif drop is None:
                drop = row
        facts["algorithms"][algorithm] = {
            "holds_up_to": holds,
            "first_drop": drop,
            "largest": rows[x].max() if len(rows) else None,
            "rows": rows.to_dict("records"),
        }
    for algorithm, fit in fits.items():
        facts["fits"][algorithm] = {
            "B_crit": fit.get("B_crit"),
            "reason": fit.get("reason"),
            "n_points": fit.get("n_points"),
            "B_simple": noise.get(algorithm),
        }
    versus = acc[(acc["a"] == "gradalign") & (acc["b"] == "large_batch_sgd")] if len(acc) else acc
    facts["gradalign_vs_large_batch"] = versus.sort_values(x).to_dict("records") if len(versus) else []
    return facts


def scaling_sentences(facts: Mapping[str, Any], target: float | None = None, x: str = "batch_size") -> list[str]:
    """The verdict of a batch-scaling study: where each algorithm leaves the reference, B_crit, GradAlign's effect."""
    out = []
    tol = 100 * facts["tolerance"]
    ref = facts["reference"]
    if ref is not None:
        spread = f" ± {100 * ref['std']:.1f}" if _finite(ref["std"]) else ""
        out.append(
            f"The reference, {_name(ref['algorithm'])} at b = {ref[x]:g}, reaches {100 * ref['acc']:.1f}%"
            f"{spread} test accuracy (n = {ref['n']})."
        )
        for algorithm, f in facts["algorithms"].items():
            name, drop, holds = _name(algorithm, start=True), f["first_drop"], f["holds_up_to"]
            if drop is None and holds is not None:
                out.append(f"{name} stays within {_tolerance(tol)} of it at every B up to {holds:g}.")
            elif drop is not None and holds is not None:
                out.append(
                    f"{name} stays within {_tolerance(tol)} of it up to B = {holds:g}; at B = {drop[x]:g} it "
                    f"is {_points(drop['diff'])} points ({_ci(drop)})."
                )
            elif drop is not None:
                out.append(
                    f"{name} is more than {_tolerance(tol)} below it already at the smallest B = {drop[x]:g}: "
                    f"{_points(drop['diff'])} points ({_ci(drop)})."
                )
    fitted = {a: f for a, f in facts["fits"].items() if _finite(f["B_crit"])}
    if fitted:
        parts = [
            f"{_name(a)} B_crit ≈ {f['B_crit']:.3g}" + (" (a bound only: " + f["reason"] + ")" if f["reason"] else "")
            for a, f in fitted.items()
        ]
        predicted = [f"{_name(a)} {f['B_simple']:.3g}" for a, f in facts["fits"].items() if _finite(f["B_simple"])]
        goal = f"{100 * target:.0f}% validation accuracy" if target is not None else "the target"
        text = f"Critical batch size (McCandlish fit of the steps to {goal}): {'; '.join(parts)}."
        if predicted:
            text += f" The gradient noise scale predicts B_simple ≈ {', '.join(predicted)}."
        out.append(text)
    rows = facts["gradalign_vs_large_batch"]
    if rows:
        lb = facts["algorithms"].get("large_batch_sgd", {})
        start = lb.get("first_drop", {})[x] if lb.get("first_drop") else None
        shown = [r for r in rows if start is None or r[x] >= start] or rows[-1:]
        if start is None:
            shown = rows[-1:]
        phrases = [f"at B = {r[x]:g}: {_points(r['diff'])} points ({_ci(r)}; {r['verdict']})" for r in shown]
        where = "where large-batch SGD falls behind" if start is not None else "at the largest batch size"
        out.append(f"GradAlign − large-batch SGD {where}, " + "; ".join(phrases) + ".")
    return out


# -- federated ---------------------------------------------------------------------------------------------------
def federated_facts(cells: pd.DataFrame, sig: pd.DataFrame, by: str = "setting", focus: str = "fedga") -> list[dict]:
    """Per setting: the best algorithm by mean test accuracy, and `focus`'s differences (rows of `sig`) on final
    accuracy and communications to the target."""
    out = []
    for setting, part in cells.groupby(by, sort=True):
        best = part.sort_values("acc_mean", ascending=False).iloc[0]
        rows = sig[(sig[by] == setting) & (sig["a"] == focus)] if len(sig) and by in sig else sig.iloc[0:0]
        tv = part["label_tv_mean"].mean() if "label_tv_mean" in part else math.nan
        out.append(
            {
                "setting": setting,
                "label_tv": tv,
                "best": best["algorithm"],
                "best_acc": best["acc_mean"],
                "rows": rows.to_dict("records"),
            }
        )
    return out


def federated_sentences(facts: Sequence[Mapping[str, Any]], focus: str = "fedga") -> list[str]:
    out = []
    for f in facts:
        tv = f" (measured label heterogeneity {f['label_tv']:.2f})" if _finite(f["label_tv"]) else ""
        text = f"{f['setting']}{tv}: best {_name(f['best'])} at {100 * f['best_acc']:.1f}% test accuracy"
        acc = [r for r in f["rows"] if r["metric"] == "acc_final"]
        if acc:
            text += "; " + "; ".join(
                f"{_name(focus)} − {_name(r['b'])} {_points(r['diff'])} points ({_ci(r)})" for r in acc
            )
        comm = [r for r in f["rows"] if r["metric"] == "communications_to_target" and _finite(r["diff"])]
        if comm:
            text += "; communications to the target: " + "; ".join(
                f"{_name(focus)} − {_name(r['b'])} {r['diff']:+.0f} ({_ci(r, counts=True)})" for r in comm
            )
        out.append(text + ".")
    return out
