"""benchmarks/tuning_adequacy.py and tuning_strategies.py on a tiny grid: the table per cell, the cache (a rerun
trains nothing), a study's choice beside the grid (tolerant of missing columns), clear errors for bad input."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # tuning_strategies imports tuning_adequacy
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


adequacy = _load("tuning_adequacy")
TINY = ["--dataset", "digits", "--model", "mlp", "--budget-examples", "640", "--lr-values", "0.05", "0.2"]
TINY += ["--beta-values", "0.01", "--seeds", "1", "--top-seeds", "0"]


def _table_rows(out: str) -> dict[str, list[str]]:
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].split()[:3] == ["cell", "points", "runs"], lines[0]
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_the_table_has_a_row_per_cell_with_the_grids_best_and_a_rerun_trains_nothing(tmp_path, capsys):
    args = [*TINY, "--cells", "sgd-32", "gradalign-64", "--cache", str(tmp_path)]
    table = adequacy.main(args)
    out = capsys.readouterr().out
    assert "ETA" in out  # progress lines
    rows = _table_rows(out)
    assert set(rows) == {"sgd-32", "gradalign-64"}
    assert rows["sgd-32"][1:3] == ["2", "2"] and rows["gradalign-64"][1:3] == ["2", "2"]  # points, runs
    best = table.set_index("cell")
    assert set(best["grid_lr"]) <= {0.05, 0.2} and best.loc["gradalign-64", "grid_beta"] == 0.01
    assert math.isnan(best.loc["sgd-32", "grid_beta"])
    assert 0 < best.loc["sgd-32", "grid_test"] <= 1 and best.loc["sgd-32", "grid_n"] == 1
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # a file per cell grid
    again = adequacy.main(args)
    assert "ETA" not in capsys.readouterr().out  # everything came from the cache
    pd.testing.assert_frame_equal(again, table)


def test_a_studys_choice_stands_beside_the_grid_and_missing_columns_are_tolerated(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    pd.DataFrame({"algorithm": ["sgd"], "batch_size": [32], "lr": [0.06], "acc_mean": [0.5]}).to_parquet(
        study / "cells.parquet"
    )
    table = adequacy.main([*TINY, "--cells", "sgd-32", "--cache", str(tmp_path), "--study", str(study)])
    row = table.iloc[0]
    assert row["study_lr"] == 0.06 and math.isnan(row["study_beta"]) and math.isnan(row["study_n"])
    assert row["gap"] == pytest.approx(100 * (row["grid_test"] - 0.5))
    assert 0 < row["grid_at_study"] <= 1  # the grid's mean at lr 0.05, the point nearest 0.06
    if row["grid_lr"] == 0.05:
        assert row["grid_at_study"] == row["grid_test"]
    line = _table_rows(capsys.readouterr().out)["sgd-32"]
    assert line[-1] == f"{row['gap']:+.1f}"


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--cells", "adam-32"], "invalid cell 'adam-32'"),
        (["--cells", "gradalign-48"], "multiple of the micro-batch"),
        (["--lr-grid", "0.1,0.01,3"], "LOW < HIGH"),
        (["--seeds", "0"], "must be an integer >= 1"),
        (["--study", "/nonexistent/study"], "no cells.parquet or cells.csv"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_it(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit):
        adequacy.main([*TINY, "--cache", str(tmp_path), *bad])
    assert message in capsys.readouterr().err


def test_the_strategy_replay_reads_the_cached_grid_and_reports_a_shortfall_per_cell(tmp_path, capsys):
    adequacy.main([*TINY, "--cells", "sgd-32", "gradalign-64", "--cache", str(tmp_path)])
    strategies = _load("tuning_strategies")
    grid = ["--dataset", "digits", "--model", "mlp", "--budget-examples", "640", "--cache", str(tmp_path)]
    cells = ["--cells", "sgd-32", "gradalign-64"]
    frame = strategies.main([*grid, *cells, "--strategies", "today", "studies", "--repeats", "2"])
    assert len(frame) == 8 and set(frame["cell"]) == {"sgd-32", "gradalign-64"} and frame["shortfall"].notna().all()
    cost = frame.groupby("strategy")["cost"]
    assert (cost.min()["today"], cost.max()["today"]) == (16, 16)
    # ASHA: 20 trials, the first runs the whole budget, the others may stop at a quarter or three quarters; then
    # 2 confirmation seeds for each of at most 3 full runs
    assert 1 + 19 * 0.25 + 2 <= cost.min()["studies"] and cost.max()["studies"] <= 20 + 6
    out = capsys.readouterr().out
    assert "today" in out and "studies" in out
    with pytest.raises(SystemExit):
        strategies.main([*grid, "--cells", "large_batch_sgd-128"])
    assert "no cached grid for large_batch_sgd-128" in capsys.readouterr().err


def test_the_recipe_tunes_each_cell_with_real_runs_and_trains_its_choice_on_fresh_seeds(tmp_path, capsys):
    table = adequacy.main([*TINY, "--cells", "sgd-32", "--cache", str(tmp_path), "--recipe-studies", "1"])
    row = table.iloc[0]
    assert row["recipe_studies"] == 1 and 0 < row["recipe_test"] <= 1 and row["recipe_runs"] >= 16
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# sgd-32 #0")]
    assert "(3," in line  # three fresh seeds
    assert len(list(tmp_path.glob("*.recipe.jsonl"))) == 1  # kept apart from the grid
