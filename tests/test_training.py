"""The Trainer end to end on the bundled digits data: learning, checkpoints, divergence, the local command."""

import json
import math
import subprocess
import sys

import pytest
import torch

from gradalign import ALGORITHMS, Trainer
from gradalign.training import METRIC_KEYS

from helpers import digits_config


def _fed(algorithm):
    return dict(local_steps=2, participation=0.5) if algorithm in ("fedavg", "fedprox", "scaffold", "fedga") else {}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_learns_digits(algorithm):
    trainer = Trainer(digits_config(algorithm=algorithm, epochs=2, **_fed(algorithm)))
    before = trainer.evaluate()[1]
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(METRIC_KEYS) <= set(history[-1])
    assert history[-1]["status"] == "completed"
    assert history[-1]["test_accuracy"] > max(0.5, before + 0.3)
    assert history[-1]["examples"] == 2 * trainer.updates_per_epoch * trainer.config.examples_per_update
    assert history[0]["grad_variance"] > 0 and -1 <= history[0]["grad_cosine"] <= 1


def test_counters_for_small_batch_sgd_and_federated_rounds():
    sgd = Trainer(digits_config(algorithm="sgd", epochs=1))
    m = sgd.train_epoch()
    assert m["steps"] == 4 * m["rounds"]  # four clients visited one after another per update
    fed = Trainer(digits_config(algorithm="fedavg", epochs=1, local_steps=3))
    m = fed.train_epoch()
    assert m["steps"] == 3 * m["rounds"] and m["examples"] == m["rounds"] * 3 * 64


@pytest.mark.parametrize("algorithm", ["gradalign", "scaffold"])
def test_checkpoint_resumes_bit_for_bit(algorithm):
    cfg = digits_config(algorithm=algorithm, epochs=3, momentum=0.9, **_fed(algorithm))
    straight = Trainer(cfg).fit()
    first = Trainer(cfg)
    first.train_epoch()
    state = first.state_dict()
    resumed = Trainer(cfg)
    resumed.load_state_dict(state)
    rest = resumed.fit()
    assert len(rest) == 3
    for a, b in zip(straight, rest):
        assert {k: a[k] for k in a if k != "wall_time"} == pytest.approx({k: b[k] for k in b if k != "wall_time"}, nan_ok=True)


def test_checkpoint_of_another_config_is_refused():
    state = Trainer(digits_config()).state_dict()
    with pytest.raises(ValueError, match="lr"):
        Trainer(digits_config(lr=0.2)).load_state_dict(state)


def test_divergence_is_a_status_not_a_crash():
    trainer = Trainer(digits_config(lr=1e4, epochs=5))
    history = trainer.fit()
    assert history[-1]["status"] == "diverged"
    assert len(history) < 5 and trainer.done
    assert not math.isfinite(history[-1]["train_loss"]) or not math.isfinite(history[-1]["test_loss"])


def test_synthetic_clients_with_their_natural_split():
    trainer = Trainer(digits_config(dataset="synthetic", partition="natural", clients=10, batch_size=100, epochs=1))
    m = trainer.train_epoch()
    assert math.isfinite(m["train_loss"]) and m["test_accuracy"] > 0


def test_heterogeneous_clients_have_larger_gradient_variance():
    """Clients that each hold one class disagree more than iid clients (the quantity GradAlign penalises)."""
    variance = {}
    for scheme in ("iid", "one_class"):
        trainer = Trainer(digits_config(partition=scheme, clients=10, batch_size=100, epochs=1, algorithm="gradalign"))
        variance[scheme] = trainer.train_epoch()["grad_variance"]
    assert variance["one_class"] > 2 * variance["iid"]


def test_cli_help_run_and_bad_input(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "gradalign.cli", *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    help_text = run("--help").stdout
    for flag in ("--dataset", "--algorithm", "--batch-size", "--clients", "--lr", "--beta", "--epochs", "--seed", "--out"):
        assert flag in help_text
    bad = run("--lr", "-1")
    assert bad.returncode == 2 and "lr=-1.0" in bad.stderr and "Traceback" not in bad.stderr
    out = tmp_path / "run"
    ok = run("--epochs", "2", "--batch-size", "64", "--clients", "4", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert "test_accuracy" in ok.stdout and "status completed" in ok.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["status"] == "completed" and len(summary["history"]) == 2
    assert summary["provenance"]["torch"] == torch.__version__.split("+")[0] or summary["provenance"]["torch"]
    assert (out / "metrics.csv").read_text().count("\n") == 3
    diverged = run("--epochs", "3", "--lr", "10000", "--out", str(tmp_path / "div"))
    assert diverged.returncode == 3 and "status diverged" in diverged.stdout and "Traceback" not in diverged.stderr
