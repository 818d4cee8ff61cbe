"""The verdict that opens every report: comparison records first, then the sentences, which claim only what each
record's interval shows; and the Welch statistics of the legacy tables."""

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gradalign import stats as S
from gradalign.comparisons import comparison_records, decide
from gradalign.critical_batch import critical_batch_intervals
from gradalign.sequential import SequentialDesign
from gradalign.stats import welch
from gradalign.verdict import (
    accuracy_standard_error,
    claim,
    evidence,
    federated_facts,
    federated_sentences,
    protocol_sentence,
    scaling_facts,
    scaling_sentences,
)


def test_welch_interval_matches_scipy_and_covers_the_difference():
    a, b = [0.91, 0.93, 0.92, 0.95], [0.88, 0.90, 0.86]
    result = welch(a, b)
    t, p = stats.ttest_ind(a, b, equal_var=False)
    assert result["t"] == pytest.approx(t) and result["p_value"] == pytest.approx(p)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert result["testable"] and result["n_a"] == 4 and result["n_b"] == 3


def test_welch_says_when_it_cannot_test():
    assert welch([0.5], [0.6, 0.7])["reason"].startswith("not testable: n=1 vs 2")
    constant = welch([14, 14, 14], [89, 89, 89])
    assert not constant["testable"] and math.isnan(constant["p_value"]) and "no variance" in constant["reason"]
    assert constant["diff"] == -75
    assert welch([0.5, np.nan, 0.6], [0.4, 0.5])["n_a"] == 2  # NaNs (seeds that never reached a target) dropped


def _check(sentence: str, r: dict) -> None:
    """What a sentence about one record may claim, checked against the record's own interval and tolerance (the
    rules of `gradalign.verdict`), independently of how the verdict phrases it."""
    low, high, tol = r["ci_low"], r["ci_high"], r["tolerance"]
    finite = math.isfinite(low) and math.isfinite(high)
    points = f"{100 * tol:g} point" + ("" if 100 * tol == 1 else "s")
    if f"within {points}" in sentence:
        assert finite and -tol <= low and high <= tol and r["outcome"] == "equivalent", sentence
    if f"more than {points} below" in sentence:
        assert finite and high < -tol, sentence
    if f"more than {points} above" in sentence:
        assert finite and low > tol, sentence
    if re.search(r"\bbelow\b", sentence):
        assert finite and high < 0 and r["outcome"] == "worse", sentence
    if re.search(r"\babove\b", sentence):
        assert finite and low > 0 and r["outcome"] == "better", sentence
    if f"by less than {points}" in sentence:
        assert finite and -tol <= low and high <= tol, sentence
    if r["outcome"] == "undetermined":
        assert "undetermined" in sentence, sentence
        said = [f"about {r['n_needed']} seeds per side", str(r.get("n_needed_reason")), "cap"]
        assert any(s in sentence for s in said if s and s != "None"), sentence
    else:
        assert "undetermined" not in sentence, sentence


def _record(diff, low, high, tol=0.01, n=(3, 3), **extra):
    outcome = decide(low, high, tol)
    record = dict(a="gradalign", b="sgd", x=64, metric="acc_final", diff=diff, ci_low=low, ci_high=high)
    record.update(n_a=n[0], n_b=n[1], paired=True, tolerance=tol, outcome=outcome, level=0.95, seeds=n[0])
    record.update(n_needed=None, n_needed_reason="decided", reason=None, at_cap=False)
    if outcome == "undetermined":
        record.update(n_needed=14, n_needed_reason=None)
    record.update(extra)
    return record


EDGES = [
    _record(-0.012, -0.026, 0.002),  # the issue's case: holds both "within 1 point" and "more than 1 point below"
    _record(-0.030, -0.070, 0.009),
    _record(-0.030, -0.050, -0.010),  # touching -tolerance: below, but not "more than 1 point below"
    _record(-0.030, -0.050, -0.0100001),
    _record(0.000, -0.010, 0.010),  # touching both ends of the tolerance: within
    _record(0.005, 0.001, 0.009),  # above 0 and inside the tolerance: above, by less than 1 point
    _record(-0.005, -0.009, -0.001),
    _record(0.030, 0.011, 0.049),
    _record(
        0.0,
        math.nan,
        math.nan,
        n=(1, 3),
        reason="not testable: n = 1 vs 3 (need at least 2 on each side)",
        n_needed=None,
        n_needed_reason="needs at least 2 values per side to estimate the spread (have 1 vs 3)",
    ),
    _record(
        0.01,
        math.nan,
        math.nan,
        n=(3, 3),
        reason="not testable: no spread on either side (identical values)",
        n_needed=None,
        n_needed_reason="no spread between seeds to extrapolate from",
    ),
    _record(-0.004, -0.02, 0.012, n=(8, 8), at_cap=True, seeds=8, n_needed=40),
    _record(0.0, -0.02, 0.02, tol=0.0, n_needed=None, n_needed_reason="the estimate sits on the decision boundary"),
]


@pytest.mark.parametrize("record", EDGES, ids=[f"{r['ci_low']:+.4f},{r['ci_high']:+.4f}" for r in EDGES])
def test_every_sentence_claims_only_what_its_interval_shows(record):
    _check(f"GradAlign is {claim(record, 'the reference')} at B = 64 ({evidence(record)})", record)


def test_the_issues_sentence_would_fail_the_check():
    old = "GradAlign is more than 1 point below it already at the smallest B = 64: −1.2 points (95% CI [−2.6, +0.2])"
    with pytest.raises(AssertionError):
        _check(old, EDGES[0])
    assert claim(EDGES[0]) == "undetermined against it"
    assert "about 14 seeds per side would likely decide it" in evidence(EDGES[0])


def test_sentences_of_many_generated_records_are_consistent():
    rng, checked = np.random.default_rng(5), 0
    design = SequentialDesign()
    for trial in range(60):
        n_a, n_b = rng.integers(1, 9, size=2)
        rows = [
            {"algorithm": alg, "batch_size": 64, "seed": 1000 + s, "acc_final": mean + rng.normal(0, sd)}
            for alg, n, mean, sd in (("ga", n_a, 0.8 + rng.normal(0, 0.01), 0.01), ("lb", n_b, 0.8, 0.005))
            for s in range(n)
        ]
        for r in comparison_records(
            pd.DataFrame(rows),
            x="batch_size",
            pairs=[("ga", "lb")],
            tolerance=0.01,
            design=design if trial % 2 else None,
        ):
            _check(f"GradAlign is {claim(r, 'large-batch SGD')} ({evidence(r)})", r)
            checked += 1
    assert checked == 60


def _seed_runs():
    """sgd at b = 32: 0.80; large-batch SGD within 1 point at B = 64, far below at 1024; GradAlign close to it at 64
    and well above large-batch SGD at 1024. Steps to the target on a McCandlish curve (B_crit 150 and 400)."""
    rng, rows = np.random.default_rng(0), []
    effect = rng.normal(0, 0.01, 8)  # shared by all cells' run of a seed
    for algorithm, batch, acc, b_crit in [
        ("sgd", 32, 0.80, None),
        *[("large_batch_sgd", b, a, 150.0) for b, a in ((64, 0.80), (128, 0.79), (256, 0.77), (1024, 0.60))],
        *[("gradalign", b, a, 400.0) for b, a in ((64, 0.80), (128, 0.80), (256, 0.79), (1024, 0.70))],
    ]:
        for s in range(8):
            steps = 100 * (1 + b_crit / batch) * np.exp(rng.normal(0, 0.1)) if b_crit else np.nan
            rows.append(
                {
                    "algorithm": algorithm,
                    "batch_size": batch,
                    "seed": 1000 + s,
                    "acc_final": acc + effect[s] + rng.normal(0, 0.002),
                    "steps_to_target": steps,
                }
            )
    trials = pd.DataFrame(rows)
    cells = trials.groupby(["algorithm", "batch_size"], as_index=False).agg(
        acc_mean=("acc_final", "mean"), acc_std=("acc_final", "std"), n_seeds=("seed", "size")
    )
    return trials, cells


def test_scaling_sentences_are_generated_from_the_records():
    trials, cells = _seed_runs()
    design = SequentialDesign()
    records = comparison_records(
        trials, x="batch_size", pairs=[("gradalign", "large_batch_sgd")], reference="sgd", tolerance=0.01, design=design
    )
    critical = critical_batch_intervals(
        trials, ["large_batch_sgd", "gradalign"], pairs=[("gradalign", "large_batch_sgd")], n_resamples=200
    )
    facts = scaling_facts(
        cells, records, critical["fits"], {"large_batch_sgd": 210.0}, tolerance=0.01, ratios=critical["ratios"]
    )
    text = scaling_sentences(facts, target=0.5)
    assert text[0].startswith("The reference, small-batch SGD at b = 32, reaches 80.")
    lb = next(s for s in text if s.startswith("Large-batch SGD is "))
    for r in facts["versus_reference"]["large_batch_sgd"]:
        assert claim(r, "the reference" if r["x"] == 64 else "it") in lb and evidence(r) in lb
    assert "more than 1 point below it at B = 1024" in lb and "paired" in lb
    fit = next(s for s in text if s.startswith("Critical batch size"))
    assert "95% bootstrap intervals" in fit and "GradAlign / large-batch SGD: ratio" in fit and "larger" in fit
    assert "B_simple ≈ large-batch SGD 210" in fit
    pair = text[-1]  # GradAlign against large-batch SGD, same seeds: paired
    assert pair.startswith("GradAlign is ") and "large-batch SGD at B = 64" in pair
    assert "more than 1 point above it at B = 1024" in pair and "paired" in pair


def test_a_legacy_welch_table_still_gives_sentences_that_match_their_intervals():
    trials, cells = _seed_runs()
    small = trials[(trials["seed"] < 1003) & trials["batch_size"].isin([32, 64])]
    sig = S.compare_groups(small.replace({"batch_size": {32: 64}}), "large_batch_sgd", "sgd", "batch_size", "acc_final")
    facts = scaling_facts(cells, sig, {}, tolerance=0.01)
    [record] = facts["versus_reference"]["large_batch_sgd"]
    assert not record["paired"] and record["n_needed"] is None
    [sentence] = [s for s in scaling_sentences(facts) if s.startswith("Large-batch SGD")]
    _check(sentence, record)


def test_protocol_sentence_states_the_noise_floor_of_the_test_set():
    assert accuracy_standard_error(1000, 0.7) == pytest.approx(math.sqrt(0.21 / 1000))
    text = protocol_sentence(8, 3, "96000 training examples per run", test_size=1000, accuracy=0.7)
    assert "8 trials" in text and "3 new seeds" in text and "96000 training examples" in text
    assert "1000-example test set" in text and "1.4 points" in text
    rolling = protocol_sentence(8, 3, "20 epochs", design=SequentialDesign())
    assert "re-ran with 3 new seeds, and with more in rounds" in rolling and "looks at 3, 5, 8 seeds" in rolling
    assert "96.3%" in rolling and "5% error rate overall" in rolling


def test_federated_sentences_come_from_the_records_of_each_setting():
    cells = pd.DataFrame(
        {
            "setting": ["one_class, p=0.5, K=5"] * 2,
            "algorithm": ["fedavg", "fedga"],
            "acc_mean": [0.81, 0.84],
            "label_tv_mean": [0.9, 0.9],
        }
    )
    base = dict(x="one_class, p=0.5, K=5", n_a=5, n_b=5, paired=True, level=0.95, p_value=0.01, reason=None)
    base.update(n_needed=None, n_needed_reason="decided", at_cap=False, seeds=5)
    records = [
        {
            **base,
            "a": "fedga",
            "b": "fedavg",
            "metric": "acc_final",
            "diff": 0.03,
            "ci_low": 0.011,
            "ci_high": 0.05,
            "tolerance": 0.01,
            "outcome": "better",
        },
        {
            **base,
            "a": "fedga",
            "b": "fedavg",
            "metric": "communications_to_target",
            "diff": -12.0,
            "ci_low": -20.0,
            "ci_high": -4.0,
            "tolerance": 0.0,
            "outcome": "better",
            "larger_is_better": False,
        },
        {
            **base,
            "a": "fedavg",
            "b": "gradalign",
            "metric": "acc_final",
            "diff": -0.004,
            "ci_low": -0.02,
            "ci_high": 0.012,
            "tolerance": 0.01,
            "outcome": "undetermined",
            "n_needed": 11,
            "n_needed_reason": None,
        },
    ]
    [text] = federated_sentences(federated_facts(cells, records))
    assert text.startswith(
        "one_class, p=0.5, K=5 (measured label heterogeneity 0.90): highest mean test accuracy FedGA"
    )
    assert "FedGA is more than 1 point above FedAvg (+3.0 points, 95% CI [+1.1, +5.0], n = 5 vs 5, paired)" in text
    assert "communications to target: FedGA is below FedAvg (-12, 95% CI [-20, -4]" in text
    assert "FedAvg is undetermined against GradAlign" in text and "about 11 seeds per side" in text
    assert text.index("FedGA is") < text.index("FedAvg is")  # the focus first


def test_decided_differences_between_cells_tuned_to_different_step_sizes_name_the_check_that_separates_them():
    from gradalign.verdict import step_size_caveat

    cells = pd.DataFrame(
        [
            {"algorithm": "gradalign", "batch_size": 128, "lr": 0.26},
            {"algorithm": "large_batch_sgd", "batch_size": 128, "lr": 0.19},
            {"algorithm": "gradalign", "batch_size": 256, "lr": 0.25},
            {"algorithm": "large_batch_sgd", "batch_size": 256, "lr": 0.26},
            {"algorithm": "sgd", "batch_size": 32, "lr": 0.1},
        ]
    )

    def record(a, b, x, x_b, outcome, metric="acc_final"):
        return {"a": a, "b": b, "x": x, "x_a": x, "x_b": x_b, "outcome": outcome, "metric": metric}

    records = [
        record("gradalign", "large_batch_sgd", 128, 128, "better"),
        record("gradalign", "large_batch_sgd", 256, 256, "worse"),  # step sizes 4% apart: no caveat
        record("gradalign", "sgd", 128, 32, "worse"),  # against the reference: not a pair of tuned algorithms
    ]
    text = step_size_caveat(records, cells, "results/x")
    assert "B = 128: 0.26 vs 0.19" in text and "B = 256" not in text
    assert "same_step_size.py --study results/x --cells gradalign-B128 large_batch_sgd-B128" in text
    undecided = [record("gradalign", "large_batch_sgd", 128, 128, "undetermined")]
    assert step_size_caveat(undecided, cells, "results/x") is None
    assert (
        step_size_caveat([record("gradalign", "large_batch_sgd", 128, 128, "better", "steps_to_target")], cells, "o")
        is None
    )
