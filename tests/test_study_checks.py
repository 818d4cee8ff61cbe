"""What is checked before a study launches, and the pieces resume relies on, without a Ray cluster:

- presets (--smoke-test, --preset paper) never replace a value the user gave; bad explicit values are refused;
- a missing dataset, an unwritable output folder, or a study folder started with other settings is refused before
  Ray starts, naming what is wrong and the way out; more seeds are accepted with --extend-seeds;
- a damaged result table names the file (report-only) or is set aside and rebuilt (a study run);
- a searcher restored from an older snapshot first re-suggests the configurations its trial records hold but it
  does not know, so that they are answered from their records instead of being forgotten or trained again;
- the Optuna copy is made to agree with the results table.
"""

import optuna
import pandas as pd
import pytest

import gradalign.ray_adapter as adapter
from gradalign.ray_adapter import (
    Range,
    SearchSpace,
    StudyPlan,
    TrialExecution,
    TrialRecords,
    cluster_checks,
    make_searcher,
    sync_optuna_study,
    trial_key,
)
from gradalign.ray_adapter.cell_search import CELL, CellSearch
from gradalign.ray_adapter.engine import Engine
from gradalign.ray_adapter.records import update_record
from gradalign.study_file import write_study_file
from gradalign.tables import save_table
from gradalign.tuning import Recipe, make_sampler
from studies import batch_scaling, federated, study_cli

TINY = [
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--batch-sizes",
    "32",
    "--algorithms",
    "sgd",
    "gradalign",
    "--micro-batch",
    "16",
    "--epochs",
    "2",
    "--trials-per-cell",
    "2",
    "--seeds",
    "2",
    "--target",
    "0.5",
]


class RayStarted(Exception):
    pass


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to connect to (or start) Ray."""

    def refuse(*args, **kwargs):
        raise RayStarted("Ray was asked to start")

    monkeypatch.setattr(adapter, "connect", refuse)
    monkeypatch.setattr(adapter.engine, "connect", refuse)
    monkeypatch.setattr(cluster_checks, "join_or_start", refuse)


# -- presets and explicit values ----------------------------------------------------------------------------------
def test_smoke_test_keeps_every_value_the_user_gave(capsys):
    args = study_cli.parse(batch_scaling.build_parser(), ["--smoke-test", "--seeds", "5", "--epochs", "1"])
    assert (args.seeds, args.epochs) == (5, 1)  # given
    assert (args.trials_per_cell, args.batch_sizes, args.target) == (3, [32, 128], 0.5)  # from the smoke test
    assert args.name == "batch-scaling-smoke"
    assert "your --epochs, --seeds kept" in capsys.readouterr().out


def test_preset_keeps_an_explicit_value_even_when_it_equals_the_default():
    parser = federated.build_parser()
    assert parser.get_default("seeds") == "auto"
    args = study_cli.parse(parser, ["--preset", "paper", "--seeds", "auto"], presets={"paper": federated.PAPER})
    assert args.seeds == "auto" and args.splits == ["one_class"] and args.name == "federated-paper"
    args = study_cli.parse(parser, ["--preset", "paper"], presets={"paper": federated.PAPER})
    assert args.seeds == federated.PAPER["seeds"]


def test_preset_and_smoke_test_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        federated.main(["--preset", "paper", "--smoke-test"])
    assert "--preset paper and --smoke-test" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--seeds", "0"], "seeds=0"),
        (["--trials-per-cell", "0"], "trials_per_cell=0"),
        (["--epochs", "0"], "epochs=0"),
        (["--target", "nan"], "target=nan"),
    ],
)
def test_smoke_test_refuses_bad_explicit_values(tmp_path, capsys, no_ray, argv, message):
    out = tmp_path / "never"
    assert batch_scaling.main(["--smoke-test", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# -- refused before Ray starts ------------------------------------------------------------------------------------
def test_missing_dataset_is_refused_before_ray_starts(tmp_path, capsys, no_ray):
    out = tmp_path / "study"
    argv = [
        *TINY[4:8],
        "--dataset",
        "cifar10",
        "--model",
        "mlp",
        "--data-dir",
        str(tmp_path / "no-data"),
        "--out",
        str(out),
    ]
    assert batch_scaling.main(argv) == 2
    err = capsys.readouterr().err
    assert "dataset 'cifar10' not found" in err and "--download" in err
    assert not out.exists()


def test_unwritable_output_folder_is_refused_before_ray_starts(tmp_path, capsys, no_ray):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert batch_scaling.main([*TINY, "--out", str(blocker / "study")]) == 2
    err = capsys.readouterr().err
    assert f"invalid out='{blocker / 'study'}'" in err and "cannot write there" in err


def _started_study(tmp_path, argv, script=batch_scaling):
    """A study folder as `script argv` leaves it when it starts (its study.json written)."""
    args = study_cli.parse(script.build_parser(), argv)
    data = study_cli.DataLocation(args.data_dir, False)
    protocol = script.make_protocol(args, data)
    plan = StudyPlan(protocol, tmp_path / "study", tuple(script.plan_cells(protocol, data)))
    write_study_file(plan.out_dir, protocol, plan.cell_settings())
    return plan


@pytest.mark.parametrize(
    "change,said",
    [
        (["--epochs", "3"], "budget.amount: 2592 -> 3904"),
        (["--lr-range", "0.001,1"], "ranges.gradalign.lr.high: 0.5 -> 1"),
        (["--batch-sizes", "32", "64"], "cells added: gradalign-B64"),
        (["--trials-per-cell", "3"], "trials_per_cell: 2 -> 3"),
    ],
)
def test_a_changed_study_is_refused_naming_the_change(tmp_path, capsys, no_ray, change, said):
    out = str(tmp_path / "study")
    _started_study(tmp_path, [*TINY, "--out", out])
    assert batch_scaling.main([*TINY, *change, "--out", out]) == 2
    err = capsys.readouterr().err
    assert said in err and "another --name (or --out)" in err and "--extend-seeds" not in err


def test_more_seeds_are_refused_unless_asked_for_then_accepted(tmp_path, capsys, no_ray):
    out = str(tmp_path / "study")
    _started_study(tmp_path, [*TINY, "--out", out])
    assert batch_scaling.main([*TINY, "--seeds", "3", "--out", out]) == 2
    assert "seeds: [1000, 1001] -> [1000, 1001, 1002]" in capsys.readouterr().err
    with pytest.raises(RayStarted):  # every check passed: the study would start now
        batch_scaling.main([*TINY, "--seeds", "3", "--extend-seeds", "--out", out])
    with pytest.raises(RayStarted):  # the same settings resume
        batch_scaling.main([*TINY, "--out", out])


def test_a_federated_study_with_nan_coordinates_resumes(tmp_path, no_ray):
    out = str(tmp_path / "study")
    argv = [
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--splits",
        "one_class",
        "--algorithms",
        "fedavg",
        "--references",
        "--communications",
        "4",
        "--trials-per-cell",
        "1",
        "--seeds",
        "1",
        "--out",
        out,
    ]
    plan = _started_study(tmp_path, argv, script=federated)
    assert all(c.coords["alpha"] != c.coords["alpha"] for c in plan.cells)  # NaN: one class per client has none
    with pytest.raises(RayStarted):  # the same settings (NaN included) resume
        federated.main(argv)


# -- damaged tables -----------------------------------------------------------------------------------------------
def test_a_damaged_table_is_named_by_report_only_and_set_aside_by_a_run(tmp_path, capsys):
    plan = _started_study(tmp_path, [*TINY, "--out", str(tmp_path / "study")])
    path = plan.out_dir / "cells" / "sgd-B16" / "tune.parquet"
    save_table(pd.DataFrame({"trial_id": ["a"], "evaluation": [1], "seed": [0]}), path.with_suffix(""))
    path.write_bytes(path.read_bytes()[:20])  # truncated
    assert batch_scaling.main(["--report-only", "--out", str(plan.out_dir)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "re-run the study's command without --report-only" in err

    logged = []
    assert Engine(plan, None, None, logged.append)._finished(plan.cells[0], "tune") is None  # to be rebuilt
    assert path.with_suffix(".parquet.damaged").exists() and not path.exists()
    assert "rebuilding it from the trial records" in logged[0]


# -- a restored searcher re-suggests what its records hold --------------------------------------------------------
def test_restored_searcher_re_suggests_the_recorded_configurations_it_forgot(tmp_path):
    space = SearchSpace(
        fixed={"dataset": "digits", "epochs": 2, "algorithm": "gradalign"},
        lr=Range(0.01, 1.0, log=True),
        beta=Range(1e-4, 0.5, log=True),
    )
    records = TrialRecords(TrialExecution(storage_path=str(tmp_path)))

    def sampler():
        return make_sampler(Recipe(trials=6), 7, space.param_names)

    def searcher(cell="c"):
        return CellSearch(
            {cell: make_searcher(space, name="c", sampler=sampler(), records=records, match={CELL: cell})},
            {cell: 6},
            "test_accuracy",
            "max",
        )

    def run(search, trial_id, finish=True):
        config = search.suggest(trial_id)
        record = records.start(config, trial_id)  # as the trainable does
        if finish:
            update_record(records.path(record.key), [{"evaluation": 1, "test_accuracy": 0.5, "status": "completed"}], 1)
            search.on_trial_complete(trial_id, {"test_accuracy": 0.5, "evaluation": 1})
        return config

    first = searcher()
    run(first, "t1")
    first.save(str(tmp_path / "snapshot.pkl"))  # Tune's snapshot: it knows t1 only
    forgotten = [run(first, "t2"), run(first, "t3", finish=False)]  # one finished, one in flight at the kill

    restored = searcher()
    restored.restore(str(tmp_path / "snapshot.pkl"))
    again = [restored.suggest("t4"), restored.suggest("t5")]
    assert again == forgotten  # exactly the same configurations, in order ...
    assert [trial_key(c) for c in again] == [trial_key(c) for c in forgotten]  # ... so they find their records
    assert restored.suggest("t6") not in forgotten  # then the sampler goes on

    assert searcher("d").suggest("t7") not in forgotten  # another cell's searcher replays none of them


def test_records_are_keyed_by_configuration_and_remember_the_first_trial_id(tmp_path):
    records = TrialRecords(TrialExecution(storage_path=str(tmp_path)))
    config = {"lr": 0.1, "seed": 1, "cell": "c", "data_dir": "/somewhere"}
    records.start(config, "first")
    moved = {**config, "data_dir": "/elsewhere"}  # where the data lives does not change the trial
    assert records.start(moved, "second").trial_ids == ["first", "second"]
    assert records.trial_id_of(moved, default="x") == "first"
    assert records.record_of({**config, "seed": 2}) is None


# -- the Optuna copy agrees with the table ------------------------------------------------------------------------
def test_sync_makes_the_optuna_study_hold_exactly_the_table_trials(tmp_path):
    space = SearchSpace(fixed={"algorithm": "sgd"}, lr=Range(0.01, 1.0, log=True))
    storage, objectives = f"sqlite:///{tmp_path / 'optuna.db'}", (("test_accuracy", "max"),)
    table = pd.DataFrame(
        {
            "trial_id": ["a", "a", "b"],
            "evaluation": [1, 2, 1],
            "test_accuracy": [0.5, 0.6, 0.7],
            "lr": [0.1, 0.1, 0.2],
            "algorithm": "sgd",
            "status": ["running", "completed", "completed"],
            "trial_status": "completed",
        }
    )
    mirror = adapter.OptunaMirror(storage, "cell", space, objectives)
    mirror.add("ghost", {"lr": 0.3, "algorithm": "sgd"}, {"test_accuracy": 0.9, "status": "completed"}, error=False)
    mirror.add("a", {"lr": 0.1, "algorithm": "sgd"}, {"test_accuracy": 0.6, "status": "completed"}, error=False)
    mirror.study().ask()  # a RUNNING trial, as a killed OptunaSearch with storage would leave

    sync_optuna_study(table, storage, "cell", space, objectives)
    study = optuna.load_study(study_name="cell", storage=storage)
    got = {t.user_attrs["tune_trial_id"]: (t.state, t.value) for t in study.trials}
    assert got == {"a": (optuna.trial.TrialState.COMPLETE, 0.6), "b": (optuna.trial.TrialState.COMPLETE, 0.7)}
    assert sync_optuna_study(table, storage, "cell", space, objectives) == 0  # already in agreement


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "cifar10", "--data-dir", "{tmp}/no-data"], "dataset 'cifar10' not found"),
        (["--out", "{tmp}/a-file/out"], "cannot write there"),
    ],
)
def test_tune_refuses_a_missing_dataset_or_an_unwritable_folder_before_ray_starts(
    tmp_path, capsys, no_ray, argv, message
):
    from studies import tune as tune_script

    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert tune_script.main(["--out", str(tmp_path / "out"), "--trials", "2", *argv]) == 2
    assert message in capsys.readouterr().err
