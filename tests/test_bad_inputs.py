"""Every study script refuses bad input before Ray starts, naming the option and the value the user typed (exit code
2, no traceback, no output folder); damaged or missing files in a study folder are named or rebuilt.

The table below runs each entry point's own checks in this process with a tripwire on Ray: a case that reached Ray
would fail with `RayStarted` instead of its message.
"""

import json

import optuna
import pandas as pd
import pytest

import gradalign.ray_adapter as adapter
from gradalign.ray_adapter import StudyPlan, cluster_checks
from gradalign.ray_adapter.engine import Engine, StudyFailed, check_folder
from gradalign.study_file import write_study_file
from gradalign.tables import save_table
from studies import batch_scaling, federated, study_cli, tune

DIGITS = ["--dataset", "digits", "--model", "mlp"]
SMALL = [*DIGITS, "--batch-sizes", "32", "--micro-batch", "16", "--epochs", "1", "--trials-per-cell", "1"]


class RayStarted(Exception):
    pass


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise RayStarted("Ray was asked to start")

    monkeypatch.setattr(adapter, "connect", refuse)
    monkeypatch.setattr(adapter.engine, "connect", refuse)
    monkeypatch.setattr(cluster_checks, "join_or_start", refuse)


CASES = [
    # (script, argv, what the message must say)
    (batch_scaling, [*SMALL, "--tolerance", "nan"], "--tolerance nan: invalid tolerance=nan"),
    (batch_scaling, [*SMALL, "--tolerance", "-1"], "--tolerance -1: invalid tolerance=-1.0"),
    (batch_scaling, [*SMALL, "--tolerance", "2"], "0.01 is one percentage point"),
    (batch_scaling, [*SMALL, "--target", "nan"], "--target nan: invalid target=nan"),
    (batch_scaling, [*SMALL, "--num-cpus", "0"], "--num-cpus 0: invalid num_cpus=0"),
    (batch_scaling, [*SMALL, "--num-cpus", "-1"], "--num-cpus -1: invalid num_cpus=-1"),
    (batch_scaling, [*SMALL, "--cpus-per-worker", "0"], "--cpus-per-worker 0: invalid cpus_per_worker=0.0"),
    (batch_scaling, [*SMALL, "--max-concurrent", "0"], "--max-concurrent 0: invalid max_concurrent=0"),
    (batch_scaling, [*SMALL, "--max-failures", "-1"], "--max-failures -1: invalid max_failures=-1"),
    (batch_scaling, [*SMALL, "--epochs", "1e9"], "pass --yes to start it"),
    (batch_scaling, [*SMALL, "--epochs", "inf"], "--epochs inf: invalid epochs=inf"),
    (batch_scaling, [*SMALL, "--beta-range", "-1,0.5"], "--beta-range -1,0.5: invalid beta=-1.0"),
    (batch_scaling, [*SMALL, "--lr-range", "0.5,0.1"], "--lr-range 0.5,0.1: invalid lr=(0.5, 0.1): empty search"),
    (batch_scaling, [*SMALL, "--seeds", "0"], "--seeds 0: invalid seeds=0"),
    (batch_scaling, [*SMALL, "--max-seeds", "2"], "--max-seeds 2: invalid max_seeds=2"),
    (batch_scaling, [*SMALL, "--micro-batch", "0"], "--micro-batch 0: invalid micro_batch=0"),
    (batch_scaling, [*SMALL, "--val-fraction", "1"], "--val-fraction 1: invalid val_fraction=1.0"),
    (batch_scaling, [*SMALL, "--eval-points", "0"], "--eval-points 0: invalid eval_points=0"),
    (batch_scaling, [*SMALL, "--storage", "relative/path"], "must be an absolute path or a URI"),
    (batch_scaling, [*SMALL, "--dataset", "cifar10", "--data-dir", "/nonexistent"], "dataset 'cifar10' not found"),
    (batch_scaling, [*SMALL, "--seeds", "many"], "expected 'auto' or a whole number of seeds"),
    (federated, [*DIGITS, "--clients", "2000"], "--clients 2000: invalid clients=2000: more clients than"),
    (federated, [*DIGITS, "--clients", "0"], "--clients 0: invalid clients=0"),
    (federated, [*DIGITS, "--client-batch", "0"], "--client-batch 0: invalid client_batch=0"),
    (federated, [*DIGITS, "--splits", "dirichlet:x"], "--splits dirichlet:x: invalid splits='dirichlet:x'"),
    (federated, [*DIGITS, "--participation", "0"], "--participation 0: invalid participation=0.0"),
    (federated, [*DIGITS, "--communications", "7"], "--communications 7: invalid communications=7"),
    (federated, [*DIGITS, "--tolerance", "-0.5"], "--tolerance -0.5: invalid tolerance=-0.5"),
    (tune, [*DIGITS, "--num-cpus", "0"], "--num-cpus 0: invalid num_cpus=0"),
    (tune, [*DIGITS, "--num-cpus", "-1"], "--num-cpus -1: invalid num_cpus=-1"),
    (tune, [*DIGITS, "--workers", "0"], "--workers 0: invalid workers=0"),
    (tune, [*DIGITS, "--batch-sizes", "0"], "--batch-sizes 0: invalid batch_sizes=[0]"),
    (tune, [*DIGITS, "--metric", "test_accuracy"], "invalid choice: 'test_accuracy'"),
    (tune, [*DIGITS, "--mu-range", "0.1,1"], "only fedprox use mu"),
    (tune, [*DIGITS, "--set", "nonsense"], "--set nonsense: invalid set='nonsense': expected FIELD=VALUE"),
    (tune, [*DIGITS, "--set", "nonsense=1"], "invalid nonsense=1: is not a TrainConfig field"),
    (tune, [*DIGITS, "--set", "clients=3"], "must be divisible by clients=3"),
]


@pytest.mark.parametrize(
    "script,argv,message", CASES, ids=[f"{s.__name__.split('.')[-1]}:{' '.join(a[4:])}" for s, a, _ in CASES]
)
def test_bad_input_is_refused_before_ray_starts(tmp_path, capsys, no_ray, script, argv, message):
    out = tmp_path / "never"
    try:
        code = script.main([*argv, "--out", str(out)])
    except SystemExit as exit:  # argparse's own refusals (a value of the wrong type, an unknown choice)
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


# -- --report-only reads the study's own record ------------------------------------------------------------------
def _study_folder(tmp_path, script=batch_scaling, argv=SMALL) -> StudyPlan:
    args = study_cli.parse(script.build_parser(), [*argv, "--out", str(tmp_path / "study")])
    data = study_cli.DataLocation(args.data_dir, False)
    protocol = script.make_protocol(args, data)
    plan = StudyPlan(protocol, tmp_path / "study", tuple(script.plan_cells(protocol, data)))
    write_study_file(plan.out_dir, protocol, plan.cell_settings())
    return plan


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--target", "0.5"], "--target 0.5 cannot change what the study measured"),
        (["--seeds", "4", "--epochs", "3"], "--epochs 3, --seeds 4 cannot change what the study measured"),
    ],
)
def test_report_only_refuses_options_that_would_change_the_science(tmp_path, capsys, argv, message):
    plan = _study_folder(tmp_path)
    assert batch_scaling.main(["--report-only", "--out", str(plan.out_dir), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (plan.out_dir / "report.html").exists()


def test_report_only_refuses_another_kind_of_study_before_writing_anything(tmp_path, capsys):
    plan = _study_folder(tmp_path)
    before = sorted(p.name for p in plan.out_dir.iterdir())
    assert federated.main(["--report-only", "--out", str(plan.out_dir)]) == 2
    assert "holds a batch-scaling study, not a federated study" in capsys.readouterr().err
    assert tune.main(["--report-only", "--out", str(plan.out_dir)]) == 2
    assert sorted(p.name for p in plan.out_dir.iterdir()) == before
    assert batch_scaling.main(["--report-only", "--out", str(tmp_path / "empty")]) == 2
    assert "nothing to rebuild (no study here)" in capsys.readouterr().err


def test_a_run_on_a_folder_of_another_kind_is_refused(tmp_path, capsys, no_ray):
    plan = _study_folder(tmp_path, federated, [*DIGITS, "--communications", "4"])
    assert batch_scaling.main([*SMALL, "--out", str(plan.out_dir)]) == 2
    assert "holds a federated study, not a batch-scaling study" in capsys.readouterr().err


# -- damaged or missing files -------------------------------------------------------------------------------------
def test_a_damaged_trial_record_is_named_with_what_to_do_before_anything_runs(tmp_path):
    plan = _study_folder(tmp_path)
    record = plan.out_dir / "trials" / "tune" / "history" / "0123456789abcdef.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"key": "0123456789abcdef", "history": [{"evalu')  # cut off mid-write by hand
    with pytest.raises(
        StudyFailed,
        match=r"1 trial record\(s\) cannot be read: .*0123456789abcdef.json "
        r"\(JSONDecodeError.*move each aside",
    ):
        check_folder(plan)


def test_a_damaged_trial_record_ends_the_script_with_its_name(tmp_path, capsys, no_ray):
    plan = _study_folder(tmp_path)
    record = plan.out_dir / "trials" / "seed" / "history" / "garbage.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(b"\x00\x01 not json")
    assert batch_scaling.main([*SMALL, "--out", str(plan.out_dir)]) == 1
    err = capsys.readouterr().err
    assert "garbage.json" in err and "Traceback" not in err


def test_a_missing_or_damaged_optuna_db_is_rebuilt_from_the_tuning_tables(tmp_path):
    plan = _study_folder(tmp_path)
    for cell in plan.cells:  # finished tuning tables, as the engine saves them
        rows = pd.DataFrame(
            {
                "trial_id": ["t1", "t1", "t2"],
                "evaluation": [1, 2, 1],
                "val_accuracy": [0.5, 0.8, 0.7],
                "lr": [0.1, 0.1, 0.2],
                "beta": [0.01, 0.01, 0.02],
                "algorithm": cell.coords["algorithm"],
                "status": ["running", "completed", "completed"],
                "trial_status": "completed",
            }
        )
        save_table(rows, plan.out_dir / "cells" / cell.key / "tune")
    said = []

    def tuning_trials():
        engine = Engine(plan, None, None, said.append)
        tuned = engine.search("tune")  # every cell finished: no Ray, no training
        engine.sync_optuna(tuned, {c.key: c.space for c in plan.cells})
        return {c.key: len(optuna.load_study(study_name=c.key, storage=f"sqlite:///{db}").trials) for c in plan.cells}

    db = plan.out_dir / "optuna.db"
    assert tuning_trials() == {c.key: 2 for c in plan.cells} and f"{db} was missing" in said[-1]
    db.write_bytes(b"this is not a database")
    assert tuning_trials() == {c.key: 2 for c in plan.cells} and "was damaged" in said[-1]
    assert (plan.out_dir / "optuna.db.damaged").exists()
    said.clear()
    assert tuning_trials() == {c.key: 2 for c in plan.cells}
    assert not [s for s in said if "optuna.db" in s]  # (in agreement: nothing to say)


def test_the_study_json_written_is_the_protocol_the_report_states(tmp_path):
    plan = _study_folder(tmp_path)
    saved = json.loads((plan.out_dir / "study.json").read_text())
    assert saved["kind"] == "batch-scaling" and saved["protocol"]["budget"]["unit"] == "examples"
    assert saved["protocol"]["ranges"]["gradalign"]["beta"] == {"low": 1e-4, "high": 1.0, "log": True}
    assert saved["protocol"]["seed_looks"] == [3, 5, 8] and len(saved["protocol"]["seeds"]) == 8
