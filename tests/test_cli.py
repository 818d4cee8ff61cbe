"""`python -m gradalign.cli`: every bad input refused before training, naming the option and the value typed.

The cases call `main(argv)` in this process (no subprocess, no training: each is refused before the first update)
and read what it printed; tests/test_training.py runs the command itself once, end to end.
"""

from __future__ import annotations

import os

import pytest

from gradalign.cli import build_parser, main
from gradalign.cli_checks import MAX_STEPS, prepare_run

# (argv, what stderr starts with after "error: "); {tmp} is the test's folder, which holds a file named "file".
BAD_INPUTS = [
    # --out: an existing file (was a FileExistsError traceback), a path below a file, one that cannot be made, empty
    (["--epochs", "1", "--out", "{tmp}/file"], "--out {tmp}/file: is a file, not a folder"),
    (["--out", "{tmp}/file/run"], "--out {tmp}/file/run: {tmp}/file is a file, not a folder"),
    (["--out", "/proc/gradalign-cli-test"], "--out /proc/gradalign-cli-test: cannot write there"),
    (["--out", ""], "--out '': an empty path"),
    # the budget: far beyond a local run (was 10^10 updates without a word), in every unit
    (["--epochs", "1e9"], "--epochs 1e9: a run of 10,117,187,500 updates (1,295,000,000,000 examples), beyond the"),
    (["--budget-steps", "20000000"], "--budget-steps 20000000: a run of 20,000,000 updates"),
    (["--budget-examples", "1e10", "--batch-size", "64"], "--budget-examples 1e10: a run of 156,250,000 updates"),
    (["--algorithm", "sgd", "--clients", "64", "--epochs", "1e5"], "--epochs 1e5: a run of 1,011,719 updates = 64,7"),
    (["--eval-every", "1", "--budget-steps", "200000"], "--eval-every 1: 200,000 evaluations"),
    (["--eval-points", "1e9"], "--eval-points 1e9: at most 100,000 evaluations per run"),
    (["--epochs", "0"], "--epochs 0: must be a positive finite number"),
    (["--epochs", "nan"], "--epochs nan: must be a positive finite number"),
    (["--epochs", "inf"], "--epochs inf: must be a positive finite number"),
    (["--epochs", "ten"], "--epochs ten: not a number"),
    (["--budget-steps", "0"], "--budget-steps 0: must be a positive integer or None"),
    (["--budget-steps", "1.5"], "--budget-steps 1.5: not a whole number"),
    (["--budget-examples", "-5"], "--budget-examples -5: must be a positive integer or None"),
    (["--budget-examples", "100", "--budget-steps", "5"], "--budget-steps 5: a run's budget is in examples or in"),
    (["--eval-points", "0"], "--eval-points 0: must be a positive integer"),
    (["--eval-every", "0"], "--eval-every 0: must be a positive integer or None"),
    # the data
    (["--dataset", "imagenet"], "--dataset imagenet: must be one of digits, synthetic"),
    (["--dataset", "mnist", "--data-dir", "{tmp}/data"], "--dataset mnist: dataset 'mnist' not found"),
    (["--dataset", "mnist1d", "--data-dir", "{tmp}/file"], "--data-dir {tmp}/file: is a file, not a folder"),
    (["--dataset", "mnist1d", "--data-dir", "/proc/gradalign-cli-test"], "--data-dir /proc/gradalign-cli-test: can"),
    (["--data-dir", ""], "--data-dir '': an empty path"),
    (["--dataset", "mnist1d", "--num-samples", "1e7"], "--num-samples 1e7: generates 10,000,000 examples of mnist1d"),
    (["--dataset", "mnist1d", "--num-samples", "15"], "--num-samples 15: mnist1d generates as many examples of each"),
    (["--num-samples", "100"], "--num-samples 100: only generated datasets (mnist1d) take it"),
    (["--dataset", "synthetic", "--clients", "1000", "--batch-size", "1000"], "--clients 1000: generates up to 2,0"),
    (["--val-fraction", "1"], "--val-fraction 1: must lie in [0, 1)"),
    (["--split-seed", "-1"], "--split-seed -1: must be an integer >= 0"),
    (["--partition", "natural"], "--partition natural: 'natural' exists only for dataset='synthetic'"),
    (["--partition", "zigzag"], "--partition zigzag: must be one of iid, dirichlet"),
    (["--partition", "dirichlet_by_class", "--alpha", "1e-3", "--clients", "64", "--batch-size", "64"], "--partition"),
    (["--alpha", "0"], "--alpha 0: Dirichlet alpha must be > 0"),
    (["--iid-fraction", "2"], "--iid-fraction 2: must lie in [0, 1]"),
    (["--heterogeneity", "-1"], "--heterogeneity -1: must be a finite number >= 0"),
    # the model, the clients and the batch
    (["--model", "vgg"], "--model vgg: must be one of mlp, cnn"),
    (["--model", "lenet", "--dataset", "synthetic"], "--model lenet: does not fit synthetic's examples of shape (60,)"),
    (["--clients", "0"], "--clients 0: must be a positive integer"),
    (["--clients", "2000", "--batch-size", "2000"], "--clients 2000: more clients than 1,295 training examples"),
    (["--batch-size", "4096"], "--batch-size 4096: more examples in one update than the 1,295 training examples"),
    (["--batch-size", "100", "--clients", "3"], "--batch-size 100: must be divisible by clients=3"),
    (["--clients", "3"], "--batch-size 128 (the default): must be divisible by clients=3"),
    (["--batch-size", "-8"], "--batch-size -8: must be a positive integer"),
    # the algorithm and its hyperparameters
    (["--algorithm", "adam"], "--algorithm adam: must be one of sgd, large_batch_sgd"),
    (["--lr", "-1"], "--lr -1: must be a positive finite number"),
    (["--lr", "abc"], "--lr abc: not a number"),
    (["--lr"], "--lr expected one argument"),
    (["--beta", "-0.1"], "--beta -0.1: must be a finite number >= 0"),
    (["--momentum", "1"], "--momentum 1: must lie in [0, 1)"),
    (["--lr-schedule", "step"], "--lr-schedule step: must be one of constant, linear, cosine"),
    (["--warmup", "1"], "--warmup 1: must lie in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay -1: must be a finite number >= 0"),
    (["--local-steps", "0"], "--local-steps 0: K (local steps) must be >= 1"),
    (["--local-steps", "4"], "--local-steps 4: only federated algorithms take K > 1"),
    (["--mu", "-1"], "--mu -1: must be a finite number >= 0"),
    (["--participation", "0"], "--participation 0: must lie in (0, 1]"),
    (["--algorithm", "fedavg", "--participation", "1.5"], "--participation 1.5: must lie in (0, 1]"),
    (["--server-lr", "0"], "--server-lr 0: must be a positive finite number"),
    (["--diag-every", "0"], "--diag-every 0: must be a positive integer"),
    (["--seed", "-3"], "--seed -3: must be an integer >= 0"),
    (["--dtype", "float16"], "--dtype float16: must be one of float32, float64"),
    (["--device", "tpu"], "--device tpu: must be one of auto, cpu, cuda"),
    (["--vmap", "yes"], "unrecognized arguments: yes"),
    (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate 0.1"),
]


@pytest.mark.timeout(60)  # (a case that is not refused would train)
@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) or "empty" for a, _ in BAD_INPUTS])
def test_bad_input_is_refused_before_training(tmp_path, capsys, argv, message):
    if "/proc/" in " ".join(argv) and not os.path.isdir("/proc"):
        pytest.skip("needs Linux's /proc (a folder nothing can be made in)")
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "run"
    has_out = "--out" in argv
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ([] if has_out else ["--out", str(out)])
    code = main(argv)
    printed = capsys.readouterr()
    assert code == 2, printed
    assert printed.err.startswith("error: " + message.replace("{tmp}", str(tmp_path))), printed.err
    assert printed.out == "" and "Traceback" not in printed.err
    assert not out.exists()  # refused before anything was written


def test_device_cuda_without_one_names_the_option(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    assert main(["--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: no CUDA device is available here")


def test_yes_lets_a_run_beyond_the_bound_through(tmp_path):
    typed: dict[str, str] = {}
    args = build_parser(typed).parse_args(["--epochs", "1e9", "--yes", "--out", str(tmp_path / "run")])
    config, trainer = prepare_run(args, typed)  # (builds the Trainer; trains nothing)
    assert trainer.total_updates * 1 > MAX_STEPS and config.epochs == 1e9
    assert (tmp_path / "run").is_dir()


def test_the_first_line_states_the_budget(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--algorithm", "sgd", "--clients", "4", "--batch-size", "64", "--budget-steps", "2", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        "training sgd on digits (mlp) on cpu; budget: 128 examples (0.0988 epochs of 1,295) = 2 updates of 64 "
        "(4 clients x 16) = 8 steps; 2 evaluations"
    )
    assert (out / "metrics.json").exists()
