"""Which evaluations a trial reports (`ReportSchedule`), and the per-worker state files of Ray Train trials."""

import json

import pytest

from gradalign.config import TrainConfig
from gradalign.ray_adapter import TrialExecution, asha_rungs, make_scheduler
from trainables import train_in_process
from trainables.report_schedule import ReportSchedule
from trainables.worker import WorkerStates


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def reported(schedule: ReportSchedule, clock: Clock, evaluations: list[tuple[float, float]]) -> list[float]:
    """Feed (seconds, epochs) evaluations, the last one ending the trial; returns the epochs reported."""
    out = []
    for i, (seconds, epochs) in enumerate(evaluations):
        clock.now = seconds
        if schedule.due({"epochs": epochs}, last=i == len(evaluations) - 1):
            out.append(epochs)
    return out


def test_schedule_reports_every_interval_each_rung_and_the_last():
    clock = Clock()
    schedule = ReportSchedule(5.0, rungs=(1.0, 4.0), clock=clock)
    evaluations = [(1, 0.5), (2, 1.2), (3, 1.5), (6, 2.0), (8, 3.0), (9, 4.5), (10, 5.0), (11, 6.0)]
    # 1.2 (at 2 s): first past rung 1; 3.0 (at 8 s): first 5 s after that; 4.5: first past rung 4; 6.0: the last.
    assert reported(schedule, clock, evaluations) == [1.2, 3.0, 4.5, 6.0]


def test_schedule_with_interval_zero_reports_every_evaluation():
    clock = Clock()
    evaluations = [(0, 0.1), (0, 0.2), (0, 0.3)]
    assert reported(ReportSchedule(0.0, clock=clock), clock, evaluations) == [0.1, 0.2, 0.3]


def test_a_restored_schedule_does_not_report_rungs_already_passed():
    clock = Clock()
    schedule = ReportSchedule(100.0, rungs=(1.0, 3.0), clock=clock)
    schedule.restored({"epochs": 1.5})  # rung 1 was decided before the restart
    assert reported(schedule, clock, [(1, 2.0), (2, 3.1), (3, 3.5)]) == [3.1, 3.5]


def test_schedule_refuses_a_negative_interval():
    with pytest.raises(ValueError, match="interval"):
        ReportSchedule(-1.0)


def test_execution_refuses_a_bad_report_interval():
    from gradalign.config import ConfigError

    with pytest.raises(ConfigError, match="report_interval_s"):
        TrialExecution(report_interval_s=float("nan"))


def test_asha_rungs_are_the_schedulers_own_milestones():
    rungs = asha_rungs(max_epochs=10, grace_period=1.0)
    bracket = make_scheduler("val_accuracy", "max", max_epochs=10, grace_period=1.0)._brackets[0]
    assert sorted(rungs) == sorted(milestone for milestone, _ in bracket._rungs) == [1, 3, 9]
    assert asha_rungs(max_epochs=10, grace_period=3.0) == (3.0, 9.0)


def test_in_process_trial_reports_on_schedule_but_records_every_evaluation(tmp_path):
    config = TrainConfig(
        dataset="digits",
        model="mlp",
        algorithm="sgd",
        batch_size=64,
        clients=4,
        lr=0.1,
        epochs=3,
        eval_every=10,
        seed=0,
    )
    record = tmp_path / "record.json"
    reports = []
    history = train_in_process(
        config,
        str(tmp_path / "state.pt"),
        reports.append,
        history_path=str(record),
        schedule=ReportSchedule(1e9, rungs=(1.0,)),
    )
    assert len(history) >= 5
    first_past_rung = next(m for m in history if m["epochs"] >= 1.0)
    assert [m["evaluation"] for m in reports] == [first_past_rung["evaluation"], history[-1]["evaluation"]]
    assert reports[-1] == history[-1]
    saved = json.loads(record.read_text())
    assert [m["evaluation"] for m in saved["history"]] == [m["evaluation"] for m in history]  # every evaluation


def test_worker_states_keep_the_latest_two_per_worker(tmp_path):
    states = WorkerStates(str(tmp_path / "run"), rank=1, world=2)
    assert states.evaluations() == []
    for evaluation in (1, 2, 3):
        states.save(evaluation, f"state {evaluation}".encode())
    assert states.evaluations() == [2, 3]
    assert states.load(2) == b"state 2"
    assert WorkerStates(str(tmp_path / "run"), rank=0, world=2).evaluations() == []  # another worker's files
    assert WorkerStates(str(tmp_path / "run"), rank=1, world=4).evaluations() == []  # another world size
    with pytest.raises(RuntimeError, match="worker 1 of 2 has no saved state for evaluation 1"):
        states.load(1)
