"""What a trial costs beyond its training: the platform against a plain Optuna loop and a bare TorchTrainer.

    python benchmarks/trial_overhead.py                  # 6 trials per row, digits/mlp, 2 epochs
    python benchmarks/trial_overhead.py --trials 10 --epochs 1 --skip-train

Four rows, measured in one run on the same configurations, one trial at a time (so that concurrency does not blur
the per-trial wall time):

1. `optuna loop`: `optuna.create_study(...).optimize` over the same Trainer and search space, in this process: the
   floor of any tuner;
2. `platform, 1 worker`: `run_study` with trials that train in the Tune trial's own process (what the studies use);
3. `bare TorchTrainer`: a `ray.train.torch.TorchTrainer` of 2 workers whose loop builds the same Trainer and fits it,
   reporting once at the end (Ray Train's own fixed cost);
4. `platform, 2 workers`: `run_study` with Ray Train trials of 2 workers (reports, checkpoints and records at every
   evaluation).

Per trial: wall time, the training inside it (the Trainer's own wall time, evaluations included), the overhead
(wall - training) and the share of the wall time spent training; the last column puts each row's overhead beside
its reference (row 1 for row 2, row 3 for row 4). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import optuna
import ray.train
import ray.train.torch
import torch

from gradalign.comm import TorchDistributedComm
from gradalign.config import TrainConfig
from gradalign.ray_adapter import Range, SearchSpace, StudySettings, TrialExecution, connect, results_table, run_study
from gradalign.training import Trainer
from trainables import gradalign_trainable

LR = (0.05, 0.2)


def optuna_loop(fixed: dict, trials: int) -> tuple[float, float]:
    training = []

    def objective(trial: optuna.Trial) -> float:
        config = TrainConfig(**fixed, lr=trial.suggest_float("lr", *LR, log=True))
        history = Trainer(config).fit()
        training.append(history[-1]["wall_time"])
        return history[-1]["val_accuracy"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    start = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return (time.perf_counter() - start) / trials, sum(training) / trials


def platform_trials(fixed: dict, trials: int, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = StudySettings(name=f"overhead-{workers}", storage_path=tmp, num_samples=trials,
                                 max_concurrent_trials=1, seed=0)
        space = SearchSpace(fixed=fixed, lr=Range(*LR, log=True))
        start = time.perf_counter()
        results = run_study(gradalign_trainable, space, settings, TrialExecution(workers=workers),
                            log=lambda s: None)
        wall = (time.perf_counter() - start) / trials
        table = results_table(results)
    return wall, table.groupby("trial_id")["wall_time"].max().mean()


def _bare_loop(loop_config: dict) -> float:
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**loop_config), comm=TorchDistributedComm())
    history = trainer.fit()
    ray.train.report({"wall_time": history[-1]["wall_time"]})
    return history[-1]["wall_time"]


def bare_torch_trainer(fixed: dict, trials: int) -> tuple[float, float]:
    walls, training = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(trials):
            trainer = ray.train.torch.TorchTrainer(
                _bare_loop, train_loop_config={**fixed, "lr": LR[0]},
                scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                run_config=ray.train.RunConfig(name=f"bare-{k}", storage_path=tmp))
            start = time.perf_counter()
            result = trainer.fit()
            walls.append(time.perf_counter() - start)
            training.append(result.return_value)
    return sum(walls) / trials, sum(training) / trials


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=6, help="trials per row (default %(default)s)")
    p.add_argument("--epochs", type=float, default=2, help="budget per trial in epochs (default %(default)s)")
    p.add_argument("--dataset", default="digits", help="(default %(default)s)")
    p.add_argument("--model", default="mlp", help="(default %(default)s)")
    p.add_argument("--skip-train", action="store_true", help="only the two in-process rows (no Ray Train)")
    args = p.parse_args(argv)
    if args.trials < 1 or not args.epochs > 0:
        p.error("--trials must be >= 1 and --epochs > 0")
    fixed = dict(dataset=args.dataset, model=args.model, algorithm="sgd", clients=4, batch_size=64,
                 epochs=args.epochs, seed=0, data_dir=os.path.abspath("data"))

    torch.set_num_threads(1)  # as in a 1-CPU trial (Ray sets OMP_NUM_THREADS from the trial's CPUs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Trainer(TrainConfig(**fixed)).fit()  # warms the data cache for the in-process rows
    start = time.perf_counter()
    cpus = connect(local=True)["CPU"]  # a private Ray: never someone's `ray start` cluster
    init = time.perf_counter() - start

    rows = [("optuna loop", *optuna_loop(fixed, args.trials)),
            ("platform, 1 worker", *platform_trials(fixed, args.trials, 1))]
    if not args.skip_train:
        rows += [("bare TorchTrainer", *bare_torch_trainer(fixed, args.trials)),
                 ("platform, 2 workers", *platform_trials(fixed, args.trials, 2))]

    print(f"\nmachine: {cpus:g} CPUs, load average {os.getloadavg()[0]:.1f}; ray.init {init:.1f} s; {args.trials} "
          f"trials per row, one at a time; sgd on {args.dataset}/{args.model}, {args.epochs:g} epochs, batch 64")
    print(f"{'row':<20} {'wall/trial s':>12} {'training s':>11} {'overhead s':>11} {'training share':>15} "
          f"{'overhead vs ref':>16}")
    for i, (name, wall, training) in enumerate(rows):
        overhead = wall - training
        ref = rows[i - 1] if i % 2 else None
        versus = f"{overhead / (ref[1] - ref[2]):.1f}x" if ref and ref[1] - ref[2] > 0 else "-"
        print(f"{name:<20} {wall:>12.2f} {training:>11.2f} {overhead:>11.2f} {training / wall:>14.0%} {versus:>16}")


if __name__ == "__main__":
    main()
