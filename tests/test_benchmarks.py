"""benchmarks/step_cost.py and mnist1d_paper.py in-process on CPU: their tables at tiny settings, clear argument
errors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch


def _load(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_cost = _load("step_cost")
mnist1d_paper = _load("mnist1d_paper")

TINY = ["--repeats", "1", "--warmup", "0", "--threads", "1", "--device", "cpu"]


def _rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].split()[:3] == ["model", "clients", "x"], lines[0]
    return [line.split() for line in lines[1:]]


def test_table_has_a_row_per_model_and_shape_with_small_rel_err(capsys):
    step_cost.main(["--model", "mlp,cnn", "--shapes", "2x4", *TINY])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [(r[0], r[1], r[3]) for r in rows] == [("mlp", "2", "4"), ("cnn", "2", "4")]
    for r in rows:
        assert int(r[4]) == int(r[1]) * int(r[3])  # batch = clients * b
        assert r[7] == "fast"
        assert len(r) == 16  # ratio, best, paired ratio, its CI ('-': one repeat), floor, vmap and loop ratios
        assert float(r[8].rstrip("x")) > 0 and float(r[9].rstrip("x")) > 0 and float(r[10].rstrip("x")) > 0
        assert r[11] == "-"
        assert float(r[12].rstrip("x")) > 0
        assert 0 <= float(r[-1]) < 1e-4, r
    assert "WARNING" not in out


def test_cifar_shaped_model_several_shapes_skipped_variants(capsys):
    step_cost.main(["--model", "lenet", "--shapes", "2x2,3x1", "--no-loop", "--no-vmap", "--no-floor", *TINY])
    rows = _rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[3]) for r in rows] == [("lenet", "2", "2"), ("lenet", "3", "1")]
    for r in rows:
        assert r[-4:-1] == ["-", "-", "-"]  # floor, vmap and loop ratios skipped; rel err still checked
        assert 0 <= float(r[-1]) < 1e-4, r


def test_a_large_rel_err_prints_a_warning(capsys, monkeypatch):
    monkeypatch.setattr(step_cost, "direction_rel_err", lambda *args, **kwargs: 0.5)
    step_cost.main(["--model", "mlp", "--shapes", "2x2", "--no-loop", "--no-vmap", *TINY])
    out = capsys.readouterr().out
    assert float(_rows(out)[0][-1]) == 0.5
    (warning,) = [line for line in out.splitlines() if "WARNING" in line]
    assert "mlp 2 x 2" in warning and "5.0e-01" in warning


def test_enough_repeats_give_a_confidence_interval_around_the_paired_ratio(capsys):
    step_cost.main(["--model", "mlp", "--shapes", "2x2", "--no-loop", "--no-vmap", *TINY, "--repeats", "6"])
    (row,) = _rows(capsys.readouterr().out)
    paired = float(row[10].rstrip("x"))
    low, high = (float(v) for v in row[11].split("-"))
    assert 0 < low <= paired <= high


def test_the_floor_records_a_large_batch_steps_products_forward_and_backward():
    cpu = torch.device("cpu")
    step = step_cost.make_step("mlp", "large_batch_sgd", 2, 4, True, cpu)
    step()
    calls = step_cost.record_products(step)
    names = [func.overloadpacket.__name__ for func, _, _ in calls]
    assert names == ["addmm"] * 3 + ["mm"] * 5  # three layers forward; backward: 3 weight and 2 input gradients
    assert [tuple(args[1].shape) for _, args, _ in calls[:3]] == [(8, 784), (8, 200), (8, 200)]  # all 2 x 4 rows


def test_a_gradalign_step_records_at_least_twice_the_products_and_replays_them_without_side_effects():
    cpu = torch.device("cpu")
    steps = {name: step_cost.make_step("mlp", name, 2, 4, True, cpu) for name in ("large_batch_sgd", "gradalign")}
    for step in steps.values():
        step()
    calls = {name: step_cost.record_products(step) for name, step in steps.items()}
    assert len(calls["gradalign"]) >= 2 * len(calls["large_batch_sgd"])
    model = steps["gradalign"].algorithm.model
    before = [p.detach().clone() for p in model.parameters()]
    step_cost.replay(calls["gradalign"], cpu)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert step_cost.floor_ratio({"large": steps["large_batch_sgd"], "gradalign": steps["gradalign"]}, 2, cpu) > 0


def test_the_floor_records_convolutions_and_their_backward():
    step = step_cost.make_step("cnn", "large_batch_sgd", 2, 2, True, torch.device("cpu"))
    step()
    names = [func.overloadpacket.__name__ for func, _, _ in step_cost.record_products(step)]
    assert names.count("convolution") == 2 and names.count("convolution_backward") == 2, names


def test_median_ci_takes_the_order_statistics_of_the_binomial():
    assert step_cost.median_ci([float(v) for v in range(10, 0, -1)]) == (5.5, 2.0, 9.0)  # 2nd and 9th of 10: 97.9%
    assert step_cost.median_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (3.5, 1.0, 6.0)  # n = 6: min and max, 96.9%
    assert step_cost.median_ci([float(v) for v in range(1, 41)]) == (20.5, 14.0, 27.0)  # P(B(40, 1/2) <= 13) = 0.019
    median, low, high = step_cost.median_ci([3.0, 1.0, 2.0, 5.0, 4.0])  # n = 5: even min-max covers only 93.8%
    assert median == 3.0 and math.isnan(low) and math.isnan(high)


def test_mnist1d_models_take_the_fast_path_with_a_small_rel_err(capsys):
    step_cost.main(["--model", "mnist1d_mlp,mnist1d_cnn", "--shapes", "2x4", "--no-floor", *TINY])
    rows = _rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[3]) for r in rows] == [("mnist1d_mlp", "2", "4"), ("mnist1d_cnn", "2", "4")]
    for r in rows:
        assert r[7] == "fast"
        assert 0 <= float(r[-1]) < 1e-4, r
    model, x, _ = step_cost.make_problem("mnist1d_cnn", 2, 4, torch.device("cpu"))
    assert x.shape == (2, 1, 4, 1, 40) and sum(p.numel() for p in model.parameters()) == 5_210


def test_mnist1d_paper_table_at_tiny_settings(capsys, tmp_path):
    rows = mnist1d_paper.main(
        [
            "--model",
            "logistic,cnn",
            "--seeds",
            "2",
            "--steps",
            "3",
            "--eval-every",
            "2",
            "--print-every",
            "2",
            "--data-dir",
            str(tmp_path),
            "--num-samples",
            "200",
        ]
    )
    out = capsys.readouterr().out
    assert "160 train / 40 test" in out and "3 steps" in out
    assert out.count("step 2/3") == 4  # progress: a line per run
    lines = [line.split() for line in out.splitlines() if line and not line.startswith("#")]
    assert lines[0][:3] == ["model", "params", "paper"]
    assert [line[:3] for line in lines[1:]] == [["logistic", "410", "32"], ["cnn", "5210", "94"]]
    for row, line in zip(rows, lines[1:]):
        assert row["n"] == 2 and 0 <= row["mean"] <= 100 and row["std"] >= 0
        assert row["gap"] == pytest.approx(row["mean"] - row["paper"])
        assert line[3] == f"{row['mean']:.1f}" and line[6] == "(n=2)" and line[7] == f"{row['gap']:+.1f}"


@pytest.mark.parametrize(
    "argv, bad",
    [
        (["--model", "logistic,gru"], "'gru'"),
        (["--seeds", "0"], "'0'"),
        (["--num-samples", "205"], "num_samples=205"),
    ],
)
def test_mnist1d_paper_bad_arguments_exit_2_naming_the_value(argv, bad, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        mnist1d_paper.main([*argv, "--data-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert bad in capsys.readouterr().err


def test_all_is_mlp_and_cnn():
    assert step_cost.parse_models("all") == ("mlp", "cnn")
    assert step_cost.parse_models("resnet18, mlp,all") == ("resnet18", "mlp", "cnn")
    assert step_cost.parse_shapes("4x128,8X64") == ((4, 128), (8, 64))


@pytest.mark.parametrize(
    "argv, bad",
    [
        (["--shapes", "3y4"], "'3y4'"),
        (["--shapes", "4x128,0x8"], "'0x8'"),
        (["--model", "mlp,vgg"], "'vgg'"),
        (["--warmup", "-1"], "'-1'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(argv, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        step_cost.main(argv)
    assert exc.value.code == 2
    assert bad in capsys.readouterr().err


@pytest.mark.slow
def test_trial_overhead_prints_its_rows(ray_cluster, capsys):
    trial_overhead = _load("trial_overhead")
    trial_overhead.main(["--trials", "2", "--epochs", "0.3", "--skip-train"])
    out = capsys.readouterr().out
    for row in ("optuna loop", "platform, 1 worker"):
        assert row in out
    assert "training share" in out and "bare TorchTrainer" not in out
