"""The Trainer end to end on the bundled digits data: learning, exact budgets, the evaluation schedule, the
validation split, checkpoints, divergence, the local command."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import digits_config

from gradalign import ALGORITHMS, Trainer
from gradalign.data import load_dataset
from gradalign.splits import holdout_indices, with_validation
from gradalign.training import METRIC_KEYS, eval_schedule, planned_updates


def _fed(algorithm):
    return dict(local_steps=2, participation=0.5) if algorithm in ("fedavg", "fedprox", "scaffold", "fedga") else {}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_learns_digits(algorithm):
    trainer = Trainer(digits_config(algorithm=algorithm, epochs=2, eval_points=5, **_fed(algorithm)))
    before = trainer.evaluate(trainer.x_test, trainer.y_test)[1]
    history = trainer.fit()
    assert [h["evaluation"] for h in history] == list(range(1, len(trainer.schedule) + 1))
    assert [h["rounds"] for h in history] == trainer.schedule
    assert set(METRIC_KEYS) <= set(history[-1])
    assert history[-1]["status"] == "completed"
    assert history[-1]["test_accuracy"] > max(0.5, before + 0.3)
    assert history[-1]["val_accuracy"] > max(0.5, before + 0.3)
    assert history[-1]["examples"] == trainer.total_updates * trainer.config.examples_per_update
    assert (
        history[-1]["examples"]
        >= 2 * len(trainer.y_train)
        > history[-1]["examples"] - trainer.config.examples_per_update
    )
    assert history[0]["grad_variance"] > 0 and -1 <= history[0]["grad_cosine"] <= 1


def test_counters_for_small_batch_sgd_and_federated_rounds():
    sgd = Trainer(digits_config(algorithm="sgd", epochs=1))
    m = sgd.fit()[-1]
    assert m["steps"] == 4 * m["rounds"]  # four clients visited one after another per update
    fed = Trainer(digits_config(algorithm="fedavg", epochs=1, local_steps=3))
    m = fed.fit()[-1]
    assert m["steps"] == 3 * m["rounds"] and m["examples"] == m["rounds"] * 3 * 64


def test_every_batch_size_sees_the_same_examples_under_an_example_budget():
    """The issue's case: 'epochs' of len(train) // B updates gave B = 512 29% fewer examples than B = 16."""
    seen = {}
    for batch, clients in ((16, 1), (64, 4), (512, 32)):
        cfg = digits_config(
            algorithm="sgd" if clients == 1 else "large_batch_sgd",
            batch_size=batch,
            clients=clients,
            budget_examples=512 * 5,
            eval_points=3,
        )
        seen[batch] = Trainer(cfg).fit()[-1]["examples"]
    assert set(seen.values()) == {512 * 5}


def test_budgets_in_steps_and_epochs_carry_batches_over_epoch_boundaries():
    cfg = digits_config(algorithm="large_batch_sgd", batch_size=512, clients=4, budget_steps=7, eval_points=3)
    trainer = Trainer(cfg)
    last = trainer.fit()[-1]
    assert last["rounds"] == 7 and last["examples"] == 7 * 512  # more than 2 passes: nothing dropped at the ends
    assert planned_updates(digits_config(epochs=1.5, batch_size=64), 1000) == 24  # ceil(1500 / 64)
    with pytest.raises(ValueError, match="budget"):
        digits_config(budget_steps=3, budget_examples=100)


def test_the_evaluation_schedule_is_log_spaced_and_ends_at_the_budget():
    schedule = eval_schedule(10_000, points=40)
    assert schedule[0] == 1 and schedule[-1] == 10_000 and 30 <= len(schedule) <= 40
    ratios = [b / a for a, b in zip(schedule, schedule[1:]) if a >= 10]
    assert max(ratios) < 1.35  # fine where the budget is large, too: steps to a target resolved to about 30%
    assert eval_schedule(12, points=40) == list(range(1, 13))  # short runs: every update
    assert eval_schedule(100, every=30) == [30, 60, 90, 100]


def test_the_validation_split_is_stratified_disjoint_and_the_same_for_every_run_seed():
    data = load_dataset("digits")
    train, val = holdout_indices(data.y_train, 0.1, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(data.y_train)
    per_class = torch.bincount(data.y_train[torch.from_numpy(val)], minlength=10).float()
    overall = torch.bincount(data.y_train, minlength=10).float()
    assert torch.allclose(per_class / per_class.sum(), overall / overall.sum(), atol=0.01)
    a, b = Trainer(digits_config(seed=1)), Trainer(digits_config(seed=2))
    assert torch.equal(a.y_val, b.y_val) and torch.equal(a.x_val, b.x_val)
    split = with_validation(data, 0.1, 0)
    trained_on = torch.cat([s.indices for s in a.samplers.values()])
    assert len(set(trained_on.tolist())) == len(split.y_train)  # the clients hold exactly the reduced training split
    assert not torch.equal(Trainer(digits_config(split_seed=1)).y_val, a.y_val)


@pytest.mark.parametrize("algorithm", ["gradalign", "scaffold"])
def test_checkpoint_resumes_bit_for_bit(algorithm):
    cfg = digits_config(algorithm=algorithm, epochs=3, momentum=0.9, **_fed(algorithm))
    straight = Trainer(cfg).fit()
    first = Trainer(cfg)
    first.train_until_eval()
    state = first.state_dict()
    resumed = Trainer(cfg)
    resumed.load_state_dict(state)
    rest = resumed.fit()
    assert len(rest) == len(straight)
    for a, b in zip(straight, rest):
        assert {k: a[k] for k in a if k != "wall_time"} == pytest.approx(
            {k: b[k] for k in b if k != "wall_time"}, nan_ok=True
        )


def test_checkpoint_of_another_config_is_refused():
    state = Trainer(digits_config()).state_dict()
    with pytest.raises(ValueError, match="lr"):
        Trainer(digits_config(lr=0.2)).load_state_dict(state)


def test_divergence_is_a_status_not_a_crash():
    trainer = Trainer(digits_config(lr=1e4, epochs=5))
    history = trainer.fit()
    assert history[-1]["status"] == "diverged"
    assert len(history) < len(trainer.schedule) and trainer.done
    assert not math.isfinite(history[-1]["train_loss"]) or not math.isfinite(history[-1]["test_loss"])


def test_synthetic_clients_with_their_natural_split():
    trainer = Trainer(digits_config(dataset="synthetic", partition="natural", clients=10, batch_size=100, epochs=1))
    m = trainer.train_until_eval()
    assert math.isfinite(m["train_loss"]) and m["test_accuracy"] > 0 and m["val_accuracy"] > 0


def test_heterogeneous_clients_have_larger_gradient_variance():
    """Clients that each hold one class disagree more than iid clients (the quantity GradAlign penalises)."""
    variance = {}
    for scheme in ("iid", "one_class"):
        trainer = Trainer(
            digits_config(partition=scheme, clients=10, batch_size=100, epochs=1, algorithm="gradalign", eval_points=1)
        )
        variance[scheme] = trainer.train_until_eval()["grad_variance"]
    assert variance["one_class"] > 2 * variance["iid"]


def test_cli_help_run_and_bad_input(tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "gradalign.cli", *a], capture_output=True, text=True, timeout=300)

    help_text = run("--help").stdout
    for flag in (
        "--dataset",
        "--algorithm",
        "--batch-size",
        "--clients",
        "--lr",
        "--beta",
        "--epochs",
        "--seed",
        "--out",
    ):
        assert flag in help_text
    bad = run("--lr", "-1")
    assert bad.returncode == 2 and "--lr -1: " in bad.stderr and "Traceback" not in bad.stderr
    out = tmp_path / "run"
    ok = run(
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--clients",
        "4",
        "--eval-points",
        "4",
        "--budget-steps",
        "9",
        "--out",
        str(out),
    )
    assert ok.returncode == 0, ok.stderr
    assert "val_accuracy" in ok.stdout and "status completed" in ok.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["status"] == "completed" and [h["rounds"] for h in summary["history"]] == [1, 2, 4, 9]
    assert summary["provenance"]["torch"] == torch.__version__.split("+")[0] or summary["provenance"]["torch"]
    assert (out / "metrics.csv").read_text().count("\n") == 5
    diverged = run("--epochs", "3", "--lr", "10000", "--out", str(tmp_path / "div"))
    assert diverged.returncode == 3 and "status diverged" in diverged.stdout and "Traceback" not in diverged.stderr


def test_step_size_schedules_warm_up_and_decay_over_the_budget():
    from gradalign.training import lr_factor

    assert [lr_factor("constant", 0.0, t, 10) for t in range(10)] == [1.0] * 10
    warm = [lr_factor("cosine", 0.2, t, 10) for t in range(10)]
    assert warm[:2] == [0.5, 1.0] and warm[2] == 1.0 and all(a > b for a, b in zip(warm[2:], warm[3:])) and warm[-1] > 0
    linear = [lr_factor("linear", 0.0, t, 4) for t in range(4)]
    assert linear == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="warmup=1.5"):
        digits_config(warmup=1.5)


def test_a_scheduled_run_resumes_bit_for_bit():
    """The schedule's factor comes from the update count: a resumed run continues it exactly."""
    cfg = digits_config(algorithm="fedavg", local_steps=2, epochs=3, lr_schedule="cosine", warmup=0.2, eval_points=4)
    straight = Trainer(cfg).fit()
    first = Trainer(cfg)
    first.train_until_eval()
    first.train_until_eval()
    resumed = Trainer(cfg)
    resumed.load_state_dict(first.state_dict())
    rest = resumed.fit()
    assert rest[-1]["test_accuracy"] == straight[-1]["test_accuracy"]
    assert rest[-1]["train_loss"] == pytest.approx(straight[-1]["train_loss"])
    constant = Trainer(cfg.replace(lr_schedule="constant", warmup=0.0)).fit()
    assert constant[-1]["train_loss"] != pytest.approx(straight[-1]["train_loss"])  # the schedule did act
