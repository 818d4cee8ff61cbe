"""The verdict that opens every report: facts from the analysis first, then the sentences; and the statistics under
them (Welch's difference with its 95% CI)."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gradalign import analysis as A
from gradalign.stats import welch
from gradalign.verdict import (
    accuracy_standard_error,
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


def _cells_and_sig():
    """sgd at b=16: 0.80; large-batch SGD within 1 point up to B=128, then falls; GradAlign holds to B=512."""
    rng = np.random.default_rng(0)
    rows = []
    for algorithm, batch, acc in [
        ("sgd", 16, 0.80),
        ("large_batch_sgd", 32, 0.80),
        ("large_batch_sgd", 128, 0.795),
        ("large_batch_sgd", 512, 0.75),
        ("large_batch_sgd", 2048, 0.65),
        ("gradalign", 32, 0.80),
        ("gradalign", 128, 0.80),
        ("gradalign", 512, 0.795),
        ("gradalign", 2048, 0.70),
    ]:
        for seed in range(3):
            rows.append(
                {
                    "trial_id": f"{algorithm}{batch}-{seed}",
                    "phase": "seed",
                    "algorithm": algorithm,
                    "batch_size": batch,
                    "seed": 1000 + seed,
                    "evaluation": 1,
                    "steps": 100,
                    "val_accuracy": acc,
                    "test_accuracy": acc + rng.normal(0, 0.003),
                    "status": "completed",
                    "cell": f"{algorithm}-B{batch}",
                }
            )
    history = pd.DataFrame(rows)
    cells = A.summarize_cells(history, 0.5)
    sig = pd.concat(
        [A.significance(history, "gradalign", "large_batch_sgd")]
        + [
            A.significance(
                pd.concat(
                    [
                        history[history["algorithm"] == a],
                        *[
                            history[history["algorithm"] == "sgd"].assign(
                                batch_size=b, trial_id=lambda f, b=b: f["trial_id"] + f"@{b}"
                            )
                            for b in (32, 128, 512, 2048)
                        ],
                    ]
                ),
                a,
                "sgd",
            )
            for a in ("large_batch_sgd", "gradalign")
        ],
        ignore_index=True,
    )
    return cells, sig


def test_scaling_facts_find_where_each_algorithm_leaves_the_reference():
    cells, sig = _cells_and_sig()
    fits = {"large_batch_sgd": {"B_crit": 180.0, "reason": None, "n_points": 4}}
    facts = scaling_facts(cells, sig, fits, {"large_batch_sgd": 210.0}, tolerance=0.01)
    assert facts["reference"]["acc"] == pytest.approx(0.80, abs=0.005) and facts["reference"]["n"] == 3
    lb, ga = facts["algorithms"]["large_batch_sgd"], facts["algorithms"]["gradalign"]
    assert lb["holds_up_to"] == 128 and lb["first_drop"]["batch_size"] == 512
    assert ga["holds_up_to"] == 512 and ga["first_drop"]["batch_size"] == 2048
    text = scaling_sentences(facts, target=0.5)
    assert text[0].startswith("The reference, small-batch SGD at b = 16, reaches 80.")
    assert any(
        s.startswith("Large-batch SGD stays within 1 point of it up to B = 128; at B = 512 it is -5.")
        and "95% CI" in s
        and "n = 3 vs 3" in s
        for s in text
    )
    assert any(s.startswith("GradAlign stays within 1 point of it up to B = 512") for s in text)
    assert any("B_crit ≈ 180" in s and "B_simple ≈ large-batch SGD 210" in s for s in text)
    last = text[-1]  # GradAlign's difference where large-batch SGD falls behind: B = 512 and 2048
    assert last.startswith("GradAlign − large-batch SGD where large-batch SGD falls behind")
    assert "at B = 512: +4." in last and "at B = 2048: +5." in last and "significant" in last


def test_protocol_sentence_states_the_noise_floor_of_the_test_set():
    assert accuracy_standard_error(1000, 0.7) == pytest.approx(math.sqrt(0.21 / 1000))
    text = protocol_sentence(8, 3, "96000 training examples per run", test_size=1000, accuracy=0.7)
    assert "8 trials" in text and "3 new seeds" in text and "96000 training examples" in text
    assert "1000-example test set" in text and "1.4 points" in text


def test_federated_sentences_name_the_best_algorithm_and_fedgas_differences():
    cells = pd.DataFrame(
        {
            "setting": ["one_class, p=0.5, K=5"] * 2,
            "algorithm": ["fedavg", "fedga"],
            "acc_mean": [0.81, 0.84],
            "label_tv_mean": [0.9, 0.9],
        }
    )
    sig = pd.DataFrame(
        [
            {
                "setting": "one_class, p=0.5, K=5",
                "a": "fedga",
                "b": "fedavg",
                "metric": "acc_final",
                "diff": 0.03,
                "ci_low": 0.01,
                "ci_high": 0.05,
                "n_a": 5,
                "n_b": 5,
                "p_value": 0.01,
                "verdict": "significant at 0.05 (fedga higher)",
            }
        ]
    )
    [text] = federated_sentences(federated_facts(cells, sig))
    assert text.startswith("one_class, p=0.5, K=5 (measured label heterogeneity 0.90): best FedGA at 84.0%")
    assert "FedGA − FedAvg +3.0 points (95% CI [+1.0, +5.0], n = 5 vs 5, p = 0.01)" in text
