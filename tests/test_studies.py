"""The study scripts: bad axes are refused before anything starts; a tiny study runs end to end, resumes, and
its report can be rebuilt without training."""

import importlib.util
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
from helpers import study_protocol

from gradalign import findings
from gradalign.analysis import best_trials
from gradalign.ranges import Range
from gradalign.ray_adapter import best_config
from studies import batch_scaling, federated, tune

_spec = importlib.util.spec_from_file_location("_synthetic_study", Path(__file__).with_name("test_analysis.py"))
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch-sizes", "8", "--micro-batch", "16"], "batch_sizes=8"),
        (["--batch-sizes", "40", "--micro-batch", "16"], "not a multiple"),
        (["--target", "0"], "target=0.0"),
        (["--target", "1.5"], "target=1.5"),
        (["--algorithms"], "algorithms"),
        (["--lr-range", "1,0.1"], "empty search range"),
        (["--beta-range=-1,1"], "beta"),
        (["--workers", "0"], "workers"),
        (["--epochs", "0"], "epochs=0.0"),
        (["--tuning-seeds", "0"], "tuning_seeds=0"),
        (["--budget-steps", "0"], "budget_steps=0"),
    ],
)
def test_batch_scaling_refuses_bad_axes_before_starting(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) if argv == ["--algorithms"] else _no_raise():
        assert batch_scaling.main([*argv, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--splits", "dirichlet:0"],
            "--splits dirichlet:0: invalid splits='dirichlet:0': Dirichlet alpha must be > 0",
        ),
        (["--splits", "dirichlet:-1"], "invalid splits='dirichlet:-1'"),
        (["--splits", "sorted"], "splits='sorted'"),
        (["--clients", "2000"], "--clients 2000: invalid clients=2000: more clients than the 1295 training examples"),
        (["--client-batch", "0"], "--client-batch 0: invalid client_batch=0"),
        (["--tolerance", "nan"], "--tolerance nan: invalid tolerance=nan"),
        (["--participation", "1.5"], "participation=1.5"),
        (["--participation", "0"], "participation=0.0"),
        (["--local-steps", "0"], "local_steps=0"),
        (["--communications", "7"], "communications=7"),
        (["--seeds", "0"], "seeds=0"),
        (["--val-fraction", "0"], "val_fraction=0.0"),
    ],
)
def test_federated_refuses_bad_axes_before_starting(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert federated.main([*argv, "--dataset", "digits", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def assert_outcome_agrees_with_interval(r):
    low, high, tol = r["ci_low"], r["ci_high"], r["tolerance"]
    sign = 1 if r.get("larger_is_better", True) else -1
    if r["outcome"] == "better":
        assert (low > 0) if sign > 0 else (high < 0), r
    elif r["outcome"] == "worse":
        assert (high < 0) if sign > 0 else (low > 0), r
    elif r["outcome"] == "equivalent":
        assert -tol <= low and high <= tol, r
    else:
        assert r["outcome"] == "undetermined", r


def _trial_ids(out):
    history = pd.read_parquet(out / "history.parquet")
    return history, set(zip(history["phase"], history["cell"], history["trial_id"]))


@pytest.mark.slow
def test_batch_scaling_end_to_end_resume_and_report_only(tmp_path, ray_cluster):
    out = tmp_path / "study"
    argv = [
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--batch-sizes",
        "64",
        "--micro-batch",
        "16",
        "--algorithms",
        "sgd",
        "large_batch_sgd",
        "gradalign",
        "--epochs",
        "2",
        "--trials-per-cell",
        "2",
        "--seeds",
        "2",
        "--target",
        "0.5",
        "--eval-points",
        "4",
        "--out",
        str(out),
        "--name",
        "e2e",
    ]
    assert batch_scaling.main(argv) == 0
    history, trials = _trial_ids(out)
    assert set(history["cell"]) == {"sgd-B16", "large_batch_sgd-B64", "gradalign-B64"}
    last = history.sort_values("evaluation").groupby(["phase", "cell", "trial_id"]).tail(1)
    counts = last.groupby(["phase", "cell"]).size()
    assert (counts[["tune", "seed"]] == 2).all()  # 2 tuning trials and 2 seeds per cell
    assert (counts["confirm"] == 4).all()  # the 2 configurations of each cell confirmed on 2 more seeds (1, 2)
    assert set(last.loc[last["phase"] == "confirm", "seed"]) == {1, 2}
    seeds = last[last["phase"] == "seed"]
    assert sorted(seeds.loc[seeds["cell"] == "gradalign-B64", "seed"]) == [1000, 1001]  # not a tuning seed (0)
    assert set(last.loc[last["phase"] == "tune", "seed"]) == {0}
    assert last["examples"].nunique() == 1  # the same number of examples in every cell: 64 x ceil(2 x 1295 / 64)
    assert last["examples"].iloc[0] == 64 * -(-2 * 1295 // 64)
    assert seeds["status"].isin(["completed", "diverged"]).all()
    assert history.loc[history["algorithm"] == "gradalign", "clients"].eq(4).all()  # B / b micro-batches
    assert history.loc[history["algorithm"] == "sgd", "beta"].isna().all()
    for column in ("git_commit", "torch", "ray", "optuna", "hardware", "study", "phase"):
        assert column in history
    cells = pd.read_parquet(out / "cells.parquet")
    assert set(cells["algorithm"]) == {"sgd", "large_batch_sgd", "gradalign"} and (cells["n_seeds"] == 2).all()
    assert (cells["seeds"] == "1000, 1001").all()
    summary = json.loads((out / "summary.json").read_text())
    records = summary["comparisons"]
    assert {(r["a"], r["b"], r["x"]) for r in records if r["metric"] == "acc_final"} == {
        ("gradalign", "large_batch_sgd", 64),
        ("gradalign", "sgd", 64),
        ("large_batch_sgd", "sgd", 64),
    }
    for r in records:  # the same seeds on both sides: paired; every outcome agrees with its interval
        assert r["paired"] and r["n_a"] == r["n_b"] == 2
        assert_outcome_agrees_with_interval(r)
    report = (out / "report.html").read_text()
    for section in ("fig-accuracy", "fig-scaling", "fig-pareto-parallelism", "fig-alignment", "provenance"):
        assert section in report

    # re-running the same study resumes it: nothing is trained again
    assert batch_scaling.main(argv) == 0
    assert _trial_ids(out)[1] == trials

    # the report is rebuilt from the folder alone
    (out / "report.html").unlink()
    assert batch_scaling.main(["--report-only", "--out", str(out)]) == 0
    assert "fig-scaling" in (out / "report.html").read_text()


@pytest.mark.slow
def test_federated_end_to_end(tmp_path, ray_cluster):
    out = tmp_path / "fed"
    argv = [
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--splits",
        "one_class",
        "--algorithms",
        "fedavg",
        "fedga",
        "--references",
        "--communications",
        "4",
        "--trials-per-cell",
        "1",
        "--seeds",
        "2",
        "--target",
        "0.3",
        "--out",
        str(out),
    ]
    assert federated.main(argv) == 0
    history = pd.read_parquet(out / "history.parquet")
    assert set(history["algorithm"]) == {"fedavg", "fedga"}
    last = history.sort_values("evaluation").groupby("trial_id").tail(1)
    # the budget is communications: FedGA exchanges twice per round, so it gets half FedAvg's rounds
    assert set(last["communications"]) == {4}
    assert set(last.loc[last["algorithm"] == "fedavg", "rounds"]) == {4}
    assert set(last.loc[last["algorithm"] == "fedga", "rounds"]) == {2}
    assert (history["partition"] == "one_class").all()
    assert history["label_tv"].min() > 0.5  # one class per client: far from iid, measured on every run's split
    summary = json.loads((out / "summary.json").read_text())
    records = [r for r in summary["comparisons"] if r["metric"] == "acc_final"]
    assert [(r["a"], r["b"], r["x"]) for r in records] == [("fedga", "fedavg", "one_class, p=0.5, K=5")]
    for r in summary["comparisons"]:
        assert_outcome_agrees_with_interval(r)
    assert "fig-communications" in (out / "report.html").read_text()


def test_the_report_warns_about_the_configurations_its_seed_runs_used(tmp_path):
    history = _synthetic.synthetic_history(seeds=2, epochs=5)
    chosen = (history["phase"] == "seed") & (history["algorithm"] == "gradalign") & (history["batch_size"] == 256)
    history.loc[chosen, "beta"] = 1e-4  # as when a tie in the tuning score went to another trial than best_trials'
    ranges = {"gradalign": {"lr": (1e-3, 10.0), "beta": (1e-4, 1.0)}, "large_batch_sgd": {"lr": (1e-3, 10.0)}}

    protocol = study_protocol(
        target=_synthetic.TARGET,
        ranges={a: {p: Range(*r, log=True) for p, r in rs.items()} for a, rs in ranges.items()},
    )

    def beta_warnings(frame, out):
        findings.build_report(out, frame, protocol, x="batch_size", title="t", command="c")
        return [w for w in json.loads((out / "summary.json").read_text())["warnings"] if w.startswith("beta")]

    assert beta_warnings(history, tmp_path / "seeded") == [
        "beta=0.0001 is at the lower edge of [0.0001, 1] for gradalign@B=256: widen the range"
    ]
    assert beta_warnings(history[history["phase"] == "tune"], tmp_path / "tuned") == []  # no seeds: the tuned best
    cell = (history["algorithm"] == "gradalign") & (history["batch_size"] == 512)  # a cell whose seeds never ran
    partial = history[~(cell & (history["phase"] == "seed"))].copy()
    partial.loc[cell, "beta"] = 1.2e-4
    assert beta_warnings(partial, tmp_path / "partial") == [
        "beta=0.0001 is at the lower edge of [0.0001, 1] for gradalign@B=256: widen the range",
        "beta=0.00012 is at the lower edge of [0.0001, 1] for gradalign@B=512: widen the range",
    ]


def test_a_tie_in_the_objective_goes_to_the_lower_validation_loss_then_the_smaller_trial_id_whatever_the_row_order():
    trials = (("c3", 0.98, 0.30, 0.1), ("a1", 0.98, 0.31, 0.2), ("d4", 0.98, 0.30, 0.3), ("b2", 0.97, 0.10, 0.4))
    tuned = pd.DataFrame(
        [
            {
                "trial_id": tid,
                "evaluation": e,
                "status": "completed",
                "algorithm": "gradalign",
                "val_accuracy": acc if e == 2 else 0.5,
                "val_loss": loss if e == 2 else 1.0,
                "test_loss": 0.5 - lr,
                "seed": 0,
                "lr": lr,
            }
            for tid, acc, loss, lr in trials
            for e in (1, 2)
        ]
    )
    chosen = {best_config(tuned.sample(frac=1.0, random_state=k), "val_accuracy")["lr"] for k in range(10)}
    assert chosen == {0.1}  # c3, a1, d4 tie at 0.98; c3 and d4 at validation loss 0.30; c3 < d4 (test loss unread)
    assert "seed" not in best_config(tuned, "val_accuracy")  # the seed runs bring their own seeds
    without_loss = tuned.drop(columns="val_loss")
    assert best_config(without_loss, "val_accuracy")["lr"] == 0.2  # a1: the smallest of the three ids


def test_the_report_picks_the_trial_the_study_chose_whatever_the_row_order():
    """analysis.best_trials (a partial study's warnings) follows best_config: healthy trials first, then the final
    objective, the lower final validation loss, the smaller trial id."""
    trials = (
        ("c3", 0.98, 0.30, 0.1, "completed"),
        ("a1", 0.98, 0.31, 0.2, "completed"),
        ("d4", 0.98, 0.30, 0.3, "completed"),
        ("b2", 0.97, 0.10, 0.4, "completed"),
        ("a0", 0.99, 0.05, 0.5, "diverged"),
    )
    tuned = pd.DataFrame(
        [
            {
                "trial_id": tid,
                "evaluation": e,
                "status": status,
                "algorithm": "gradalign",
                "val_accuracy": acc if e == 2 else 0.5,
                "val_loss": loss if e == 2 else 1.0,
                "lr": lr,
            }
            for tid, acc, loss, lr, status in trials
            for e in (1, 2)
        ]
    )
    for k in range(10):
        rows = tuned.sample(frac=1.0, random_state=k)
        picked = best_trials(rows, group=["algorithm"], reduce="last")
        assert picked["lr"].tolist() == [best_config(rows, "val_accuracy")["lr"]] == [0.1], k
    without_loss = tuned.drop(columns="val_loss").sample(frac=1.0, random_state=0)
    assert best_trials(without_loss, group=["algorithm"], reduce="last")["lr"].tolist() == [0.2]  # a1


@pytest.mark.slow
def test_tune_is_a_one_cell_study_with_smoke_test_report_only_and_the_old_spellings(tmp_path, ray_cluster, capsys):
    out = tmp_path / "tune"
    argv = [
        "--smoke-test",
        "--trials",
        "2",
        "--lr",
        "0.05",
        "0.5",
        "--out",
        str(out),
    ]  # two spellings of the last release
    assert tune.main(argv) == 0
    err = capsys.readouterr().err
    assert "--trials 2 is deprecated" in err and "--lr 0.05 0.5 is deprecated" in err
    history = pd.read_parquet(out / "history.parquet")
    last = history.sort_values("evaluation").groupby(["phase", "trial_id"]).tail(1)
    assert (last["phase"] == "tune").sum() == 2 and sorted(last.loc[last["phase"] == "seed", "seed"]) == [1000, 1001]
    assert last.loc[last["phase"] == "tune", "lr"].between(0.05, 0.5).all()
    assert set(last["batch_size"]) <= {64, 128}  # the smoke test's choices
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["kind"] == "tune" and summary["verdict"][1].startswith("The chosen configuration")
    study = optuna.load_study(study_name="gradalign", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 2

    (out / "report.html").unlink()
    assert tune.main(["--report-only", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["verdict"] == summary["verdict"]
    assert batch_scaling.main(["--report-only", "--out", str(out)]) == 2  # another kind of study: refused
    assert "holds a tune study, not a batch-scaling study" in capsys.readouterr().err
