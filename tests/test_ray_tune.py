"""The study engine on a real local Ray: ASHA over Ray Train trials, divergence, and refusing bad input early."""

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
from helpers import study_protocol

from gradalign import ray_adapter
from gradalign.config import ConfigError
from gradalign.protocol import SEED_BASE
from gradalign.ray_adapter import (
    LOSS_PENALTY,
    Cell,
    Range,
    Resources,
    SearchSpace,
    StudyPlan,
    TrialExecution,
    run_plan,
)
from gradalign.ray_adapter import engine as engine_module
from gradalign.ray_adapter.engine import Engine
from trainables import gradalign_trainable

REPO = Path(__file__).resolve().parents[1]
# 2 epochs of the 1295-example training split at batch 64: 41 updates, evaluated after 21 (1.04 epochs) and 41
FIXED = dict(dataset="digits", model="mlp", algorithm="sgd", clients=4, batch_size=64, epochs=2, eval_every=21, seed=0)


def last_rows(table):
    return table.sort_values("evaluation").groupby("trial_id").tail(1).set_index("trial_id")


def one_cell(tmp_path, space, trials, workers=1, initial_points=(), **protocol) -> StudyPlan:
    """A study of one cell ('c') of `trials` tuning trials and one seed run, in `tmp_path`."""
    algorithm = space.fixed.get("algorithm", "gradalign")
    protocol = study_protocol(
        trials_per_cell=trials, seeds=(SEED_BASE,), ranges={algorithm: {"lr": space.lr}}, **protocol
    )
    cell = Cell("c", {"algorithm": algorithm}, space, workers, tuple(initial_points))
    return StudyPlan(protocol, tmp_path, (cell,), Resources())


def tuned(plan: StudyPlan):
    """The tuning phase of `plan`'s cell through the engine: its table."""
    return Engine(plan, gradalign_trainable, None, log=print).search("tune")["c"]


def live_placement_groups():
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_asha_stops_a_train_trial_and_later_train_trials_still_run(ray_cluster, tmp_path):
    # Trial 1 learns; trial 2 (lr 1e-4) is far worse after one epoch, so ASHA stops it -- killing its 2 Ray Train
    # workers mid-run. Trials 3 and 4 need the CPUs that trial 2's placement group held (ray issue 54305).
    space = SearchSpace(fixed=FIXED, lr=Range(1e-4, 0.5, log=True))
    plan = one_cell(tmp_path, space, 4, workers=2, initial_points=({"lr": 0.3}, {"lr": 1e-4}), asha=True)
    table = tuned(plan)

    last = last_rows(table)
    assert len(last) == 4 and set(last["trial_status"]) != {"error"}
    stopped = last[last["lr"] == 1e-4]
    assert list(stopped["trial_status"]) == ["stopped"] and list(stopped["evaluation"]) == [1]
    assert set(last["trial_status"]) <= {"completed", "stopped"}
    assert (last["trial_status"] == "completed").sum() >= 2  # the first and at least one trial after the stop
    assert set(table["workers"]) == {2}

    deadline = time.monotonic() + 30  # Ray Train's PlacementGroupCleaner polls once a second
    while live_placement_groups() and time.monotonic() < deadline:
        time.sleep(1)
    assert live_placement_groups() == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diverging_trial_ends_early_with_finite_penalty(ray_cluster, tmp_path):
    space = SearchSpace(fixed={**FIXED, "epochs": 3}, lr=Range(1e-2, 1e4, log=True))
    plan = one_cell(tmp_path, space, 3, initial_points=({"lr": 1e4}, {"lr": 0.1}), sampler_seed=1)
    history = run_plan(plan, gradalign_trainable)

    last = last_rows(history[history["phase"] == "tune"])
    diverged = last[last["lr"] == 1e4]
    assert len(diverged) == 1
    row = diverged.iloc[0]
    assert row["status"] == row["trial_status"] == "diverged"
    assert row["evaluation"] < 3  # ended early (3 evaluations: after 21, 42 and 61 updates)
    assert row["test_accuracy"] == row["val_accuracy"] == 0.0 and row["train_loss"] == LOSS_PENALTY
    assert last.loc[last["lr"] == 0.1, "trial_status"].tolist() == ["completed"]
    seeded = last_rows(history[history["phase"] == "seed"])
    assert list(seeded["lr"]) != [1e4] and list(seeded["seed"]) == [SEED_BASE]  # the diverged trial is never chosen

    # The Optuna study (SQLite, for optuna-dashboard) has every trial finished, the diverged one with its penalty.
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert set(trials) == set(last.index)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values())
    bad = trials[diverged.index[0]]
    assert bad.value == 0.0 and bad.user_attrs["status"] == "diverged" and bad.params["lr"] == 1e4

    # Tune's own searcher (the source of truth for sampling) learnt the penalty too: no Optuna trial left RUNNING.
    [state_file] = tmp_path.glob("tune-w1-*/searcher-state-*.pkl")
    with open(state_file, "rb") as f:
        searcher_study = pickle.load(f)["searchers"]["c"]._ot_study
    states = {t.user_attrs.get("tune_trial_id"): (t.state, t.values) for t in searcher_study.trials}
    assert states[diverged.index[0]] == (optuna.trial.TrialState.COMPLETE, [0.0])
    assert all(state == optuna.trial.TrialState.COMPLETE for state, _ in states.values())

    # Resuming the finished study with another search space is refused, naming what changed.
    other = one_cell(tmp_path, SearchSpace(fixed={**FIXED, "epochs": 3}, lr=Range(1e-3, 1e4, log=True)), 3)
    with pytest.raises(ConfigError, match=r"invalid out=.*ranges\.sgd\.lr\.low: 0\.01 -> 0\.001"):
        run_plan(other, gradalign_trainable)


# -- bad input: refused before Ray is touched, naming the field and the value ------------------------------------
BAD_SPACES = {
    "negative lr": (dict(lr=Range(-1.0, 0.1)), "invalid lr=-1.0"),
    "negative beta": (dict(fixed={**FIXED, "algorithm": "gradalign"}, beta=Range(-0.5, 0.1)), "invalid beta=-0.5"),
    "indivisible batch": (dict(batch_sizes=(64, 30)), "invalid batch_size=30"),
    "unknown dataset": (dict(fixed={**FIXED, "dataset": "imagenet"}), "invalid dataset='imagenet'"),
    "empty range": (dict(lr=Range(0.5, 0.1, log=True)), "invalid lr=(0.5, 0.1): empty search range"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_bad_search_space_is_refused_before_ray_starts(case, tmp_path, monkeypatch):
    changes, message = BAD_SPACES[case]
    changes = dict(changes)
    fixed = changes.pop(
        "fixed", {k: v for k, v in FIXED.items() if not (k == "batch_size" and "batch_sizes" in changes)}
    )
    space = SearchSpace(fixed=fixed, **changes)

    def must_not_connect(*args, **kwargs):
        raise AssertionError("connected to Ray before validating the search space")

    monkeypatch.setattr(engine_module, "connect", must_not_connect)  # a tripwire, not a stand-in for Ray
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_plan(one_cell(tmp_path, space, 2), gradalign_trainable)
    assert not list(tmp_path.glob("tune-*"))


@pytest.mark.timeout(120)
def test_more_workers_than_the_cluster_has_fails_fast(ray_cluster, tmp_path):
    plan = one_cell(tmp_path, SearchSpace(fixed=FIXED, lr=Range(0.01, 1.0, log=True)), 2, workers=8)
    plan = StudyPlan(plan.protocol, tmp_path, plan.cells, Resources(cpus_per_worker=2))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"invalid workers=8: .*16 CPUs per trial, but the cluster has 2 CPUs"):
        run_plan(plan, gradalign_trainable)
    assert time.monotonic() - start < 30
    assert not list(tmp_path.glob("tune-*"))


@pytest.mark.timeout(120)
def test_cli_refuses_bad_input_with_a_clear_message(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "studies/tune.py", "--lr", "-1", "0.1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "--lr-range -1,0.1: invalid lr=-1.0" in run.stderr and "--lr -1 0.1 is deprecated" in run.stderr
    assert not out.exists()


def test_initial_point_outside_the_space_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid lr=5.0: initial point outside the search range"):
        one_cell(tmp_path, SearchSpace(fixed=FIXED, lr=Range(0.01, 1.0, log=True)), 2, initial_points=({"lr": 5.0},))


def test_concurrency_follows_the_resources_the_workers_need():
    cluster = {"CPU": 8.0, "train_driver": 8.0, "memory": 1e10}
    plan = ray_adapter.plan_concurrency
    assert plan(TrialExecution(workers=1, cpus_per_worker=2), cluster) == ({"CPU": 2}, 4)
    assert plan(TrialExecution(workers=2), cluster) == ({"train_driver": 1}, 4)  # the driver holds no CPU
    assert plan(TrialExecution(workers=3), cluster) == ({"train_driver": 1}, 2)
    assert plan(TrialExecution(workers=2), cluster, max_concurrent=1) == ({"train_driver": 1}, 1)
    assert plan(TrialExecution(workers=2), {"CPU": 8.0, "train_driver": 1.0}) == ({"train_driver": 1}, 1)
    assert plan(TrialExecution(workers=2), {"CPU": 8.0}) == ({"memory": 1}, 4)  # a cluster without the resource
    with pytest.raises(ConfigError, match="invalid use_gpu=True: 2 worker"):
        plan(TrialExecution(workers=2, use_gpu=True), {**cluster, "GPU": 1.0})
    with pytest.raises(ConfigError, match="invalid workers=3: .* 6 CPUs per trial, but the cluster has 4 CPUs"):
        plan(TrialExecution(workers=3, cpus_per_worker=2), {"CPU": 4.0})
