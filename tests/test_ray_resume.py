"""A study whose driver is killed (SIGKILL) part-way resumes: every trial completes once, no finished evaluation
interval is trained again (counted in the trial records), and the Optuna SQLite study agrees with the results table.

The killed driver runs its own local Ray, as `studies/tune.py` does on a workstation: Ray dies with it, and so do the
Tune records that were not yet synced to storage -- the realistic failure.
"""

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
TRIALS, EPOCHS, EVALUATIONS = 6, 4, 4  # 4 log-spaced evaluations (e.g. after updates 1, 5, 29, 162 at B=32)


def saved_records(study_dir: Path) -> dict[str, dict]:
    """Per trial configuration, its record (history, trainings, Tune trial ids), rewritten atomically every
    evaluation."""
    return {p.stem: json.loads(p.read_text()) for p in (study_dir / "history").glob("*.json")}


def saved_histories(study_dir: Path) -> dict[str, list[dict]]:
    """Per trial configuration, the metrics history saved with its latest checkpoint."""
    return {key: record["history"] for key, record in saved_records(study_dir).items()}


def reported_rows(experiment: Path) -> list[dict]:
    rows = []
    for path in experiment.glob("*/result.json"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_study_resumes_without_running_anything_twice(tmp_path):
    cmd = [
        sys.executable,
        "studies/tune.py",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--name",
        "killed",
        "--out",
        str(tmp_path),
        "--local",
        "--num-cpus",
        "2",
        "--trials",
        str(TRIALS),
        "--epochs",
        str(EPOCHS),
        "--algorithm",
        "gradalign",
        "--clients",
        "4",
        "--batch-sizes",
        "32",
        "64",
        "--lr",
        "0.01",
        "0.5",
        "--sampler-seed",
        "3",
        "--set",
        f"eval_points={EVALUATIONS}",
    ]
    study_dir = tmp_path / "killed"
    experiment = study_dir / "tune"

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        # Kill the driver once a few trials have results and one is part-way through its evaluations.
        while first.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            saved = saved_histories(study_dir)
            if len(saved) >= 2 and any(len(h) < EVALUATIONS for h in saved.values()):
                break
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, "the study finished before it could be killed"
    at_kill = saved_histories(study_dir)

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming study 'killed'" in second.stdout

    # Every trial ran once: as many trials as asked for, each with every evaluation once in the table ...
    table = pd.read_parquet(study_dir / "results.parquet")
    assert table["trial_id"].nunique() == TRIALS
    records = saved_records(study_dir)
    assert len(records) == TRIALS  # ... and no configuration beyond the budget was trained
    assert set(table["trial_id"]) == {r["trial_ids"][0] for r in records.values()}
    for key, record in records.items():  # each epoch was trained (and saved) once
        epochs = [epoch for epoch, _ in record["trained"]]
        assert len(epochs) == len(set(epochs)), (key, record["trained"])
    for trial_id, rows in table.groupby("trial_id"):
        assert list(rows["evaluation"]) == list(range(1, EVALUATIONS + 1)), trial_id
    assert set(table["trial_status"]) == {"completed"}
    # No evaluation saved before the kill was trained again (a retrained one would have another wall_time) ...
    final = saved_histories(study_dir)
    for key, history in at_kill.items():
        assert final[key][: len(history)] == history, key
    # ... and Tune was told each evaluation at most twice (once trained, at most once re-reported on resume).
    assert max(Counter((r["trial_id"], r["evaluation"]) for r in reported_rows(experiment)).values()) <= 2

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    assert len(study.trials) == TRIALS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    last = table.sort_values("evaluation").groupby("trial_id").tail(1).set_index("trial_id")
    mirrored = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert set(mirrored) == set(last.index)
    for trial_id, trial in mirrored.items():
        assert trial.value == pytest.approx(last.loc[trial_id, "val_accuracy"])  # tuned on validation
        assert trial.params["lr"] == pytest.approx(last.loc[trial_id, "lr"])
        assert trial.user_attrs["status"] == "completed"
    assert (study_dir / "figures" / "optimization_history.html").exists()
