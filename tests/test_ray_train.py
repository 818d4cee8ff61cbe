"""Ray Train execution of a trial: 2 TorchTrainer workers reproduce one process, and trials resume from checkpoints."""

import json
import time

import pytest

from gradalign.config import TrainConfig
from gradalign.ray_adapter import LOSS_PENALTY, TrialExecution, penalise
from gradalign.training import Trainer
from trainables import fit_torch_trainer, train_in_process
from trainables.worker import WorkerStates

TINY = dict(
    dataset="digits",
    model="mlp",
    algorithm="gradalign",
    batch_size=64,
    clients=4,
    lr=0.1,
    beta=0.05,
    epochs=2,
    eval_every=21,
    seed=3,
    dtype="float64",
)  # 41 updates, evaluated after 21 and 41
TRAJECTORY = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "grad_variance")


TRAIN_ACTORS = ("TrainController", "RayTrainWorker", "DatasetManager")
"""Per-run actors of Ray Train (Ray Data's detached, cluster-wide `AutoscalingCoordinator` is not one)."""


def alive_train_actors() -> set[str]:
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # (other Ray instances may run on this machine)
    return {
        a.actor_id
        for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name in TRAIN_ACTORS
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_train_workers_reproduce_single_process_float64(ray_cluster, tmp_path):
    config = TrainConfig(**TINY)
    expected = Trainer(config).fit()

    execution = TrialExecution(workers=2, storage_path=str(tmp_path), report_interval_s=0.0)
    record = tmp_path / "record.json"
    before = alive_train_actors()
    history = fit_torch_trainer(config, execution, "equivalence", history_path=str(record))
    # No Ray Train actor of the run outlives it (fit() in the main thread used to keep its TrainController alive).
    deadline = time.monotonic() + 30
    while alive_train_actors() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive_train_actors() - before

    assert [m["evaluation"] for m in history] == [1, 2]
    for got, want in zip(history, expected):
        for key in TRAJECTORY:
            assert got[key] == pytest.approx(want[key], rel=1e-6), key
        assert got["steps"] == want["steps"] and got["examples"] == want["examples"]
        assert got["communications"] == want["communications"] and got["values_sent"] == want["values_sent"]
    assert history[-1]["status"] == "completed"

    # Fitting the same run name again resumes from the workers' saved states: nothing is retrained.
    again = fit_torch_trainer(config, execution, "equivalence", history_path=str(record))
    assert again == history
    # Killed while the workers saved evaluation 2 (worker 1 never wrote its file): both go back to evaluation 1,
    # the latest both hold, and only evaluation 2 is trained again, to the same numbers.
    WorkerStates(execution.worker_state_dir("equivalence"), rank=1, world=2).delete(2)
    resumed = fit_torch_trainer(config, execution, "equivalence", history_path=str(record))
    strip = lambda h: [{k: v for k, v in m.items() if k != "wall_time"} for m in h]  # noqa: E731
    assert strip(resumed) == strip(history)
    assert [e for e, _ in json.loads(record.read_text())["trained"]] == [1, 2, 2]


def test_in_process_trial_resumes_without_repeating_evaluations(tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 3, "algorithm": "sgd", "beta": None})  # evaluations at 21, 42, 61
    state, record = str(tmp_path / "state" / "trial.pt"), tmp_path / "history" / "trial.json"
    unbroken = train_in_process(config, str(tmp_path / "other.pt"), lambda m: None)

    class Crash(Exception):
        pass

    reports = []

    def crash_at_evaluation_2(metrics):
        reports.append(metrics["evaluation"])
        if metrics["evaluation"] == 2:
            raise Crash  # the process dies (or Tune stops the trial) while evaluation 2 is being reported

    with pytest.raises(Crash):
        train_in_process(config, state, crash_at_evaluation_2, history_path=str(record))
    resumed = []
    history = train_in_process(config, state, lambda m: resumed.append(m["evaluation"]), history_path=str(record))

    assert reports == [1, 2]
    assert resumed == [2, 3]  # 2 was saved before it was reported: re-reported (restored), not retrained
    assert [e for e, _ in json.loads(record.read_text())["trained"]] == [1, 2, 3]  # each trained once
    strip = lambda h: [{k: v for k, v in m.items() if k != "wall_time"} for m in h]  # noqa: E731
    assert strip(history) == strip(unbroken)  # bit-for-bit the uninterrupted run


def test_penalise_makes_diverged_metrics_finite():
    metrics = {
        "evaluation": 1,
        "train_loss": float("nan"),
        "test_loss": float("inf"),
        "test_accuracy": float("nan"),
        "grad_cosine": float("nan"),
        "status": "diverged",
    }
    out = penalise(metrics)
    assert out["train_loss"] == out["test_loss"] == LOSS_PENALTY
    assert out["test_accuracy"] == 0.0 and out["status"] == "diverged"
    assert out["grad_cosine"] != out["grad_cosine"]  # diagnostics stay NaN
    # A diverged run whose NaN model still scores chance-level accuracy gets the penalty too.
    chance = penalise({"train_loss": float("nan"), "test_loss": 2.3, "test_accuracy": 0.1, "status": "diverged"})
    assert chance["test_accuracy"] == 0.0 and chance["test_loss"] == LOSS_PENALTY
    healthy = {"train_loss": 0.5, "test_loss": 0.4, "test_accuracy": 0.9, "status": "running"}
    assert penalise(healthy) == healthy


def test_a_tuning_trial_can_score_its_configuration_on_several_seeds(tmp_path):
    """--tuning-seeds: the trial trains its configuration with each seed side by side and reports their mean."""
    from gradalign.ray_adapter import GROUP_SEEDS

    config = TrainConfig.from_dict({**TINY, "dtype": "float32", GROUP_SEEDS: [0, 1]})
    history = train_in_process(config, str(tmp_path / "group.pt"), lambda m: None)
    alone = [Trainer(TrainConfig(**{**TINY, "dtype": "float32", "seed": s})).fit()[-1] for s in (0, 1)]
    assert history[-1]["val_accuracy"] == pytest.approx((alone[0]["val_accuracy"] + alone[1]["val_accuracy"]) / 2)
    assert history[-1]["steps"] == alone[0]["steps"] and history[-1]["status"] == "completed"
