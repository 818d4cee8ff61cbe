"""benchmarks/same_step_size.py: two cells of a study retrained on the same seeds at each other's step size, through
the library, on a tiny study table written the way the engine writes it (real torch training, digits)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

from gradalign import TrainConfig, Trainer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("same_step_size", BENCHMARKS / "same_step_size.py")
same_step_size = importlib.util.module_from_spec(spec)
sys.modules["same_step_size"] = same_step_size
spec.loader.exec_module(same_step_size)

BASE = dict(dataset="digits", model="mlp", batch_size=64, momentum=0.9, budget_examples=640, eval_points=2)
CELLS = {
    "gradalign-B64": dict(BASE, algorithm="gradalign", clients=4, lr=0.05, beta=0.01),
    "large_batch_sgd-B64": dict(BASE, algorithm="large_batch_sgd", clients=4, lr=0.3),
}
SEEDS = (1000, 1001)


def _final(config: dict, seed: int) -> float:
    return float(Trainer(TrainConfig(**config, seed=seed)).fit()[-1]["test_accuracy"])


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    rows = []
    for cell, config in CELLS.items():
        for seed in SEEDS:
            trainer = Trainer(TrainConfig(**config, seed=seed))
            fields = {k: v for k, v in dataclasses.asdict(trainer.config).items() if not isinstance(v, dict)}
            for evaluation, metrics in enumerate(trainer.fit()):
                rows.append({**fields, **metrics, "phase": "seed", "cell": cell, "evaluation": evaluation})
    out = tmp_path_factory.mktemp("study")
    pd.DataFrame(rows).to_parquet(out / "history.parquet")
    return out


def test_each_cell_is_retrained_at_the_other_cells_step_size_and_compared_by_seed(study, capsys):
    lines = same_step_size.main(["--study", str(study), "--cells", *CELLS])
    rows = {line[:44].strip(): line[44:].split() for line in lines[2:]}
    assert list(rows) == [
        "as the study chose",
        "both at lr 0.3 (large_batch_sgd-B64's)",
        "both at lr 0.05 (gradalign-B64's)",
    ]
    ga, lb = CELLS["gradalign-B64"], CELLS["large_batch_sgd-B64"]
    ga_at_03 = sum(_final({**ga, "lr": 0.3}, s) for s in SEEDS) / 2
    lb_at_005 = sum(_final({**lb, "lr": 0.05}, s) for s in SEEDS) / 2
    assert float(rows["both at lr 0.3 (large_batch_sgd-B64's)"][0]) == pytest.approx(100 * ga_at_03, abs=0.05)
    assert float(rows["both at lr 0.05 (gradalign-B64's)"][1]) == pytest.approx(100 * lb_at_005, abs=0.05)
    study_ga = sum(_final(ga, s) for s in SEEDS) / 2
    assert float(rows["as the study chose"][0]) == pytest.approx(100 * study_ga, abs=0.05)
    assert all(row[-1] == "2" for row in rows.values())  # n: the seeds in common


def test_a_cell_the_study_does_not_have_is_named_with_the_ones_it_has(study, capsys):
    with pytest.raises(SystemExit, match="--cells sgd-B32: no seed runs of that cell in the study"):
        same_step_size.main(["--study", str(study), "--cells", "sgd-B32", "gradalign-B64"])
    with pytest.raises(SystemExit):
        same_step_size.main(["--study", str(study / "missing"), "--cells", *CELLS])
    assert "no history.parquet there" in capsys.readouterr().err
