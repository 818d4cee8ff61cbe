"""Per-trial overhead of a Tune trial that trains in its own process (1 worker) vs. a Ray Train TorchTrainer (2 workers).

    python benchmarks/trial_overhead.py                  # 3 trials each, digits/mlp/sgd, 1 epoch
    python benchmarks/trial_overhead.py --trials 5 --epochs 2

Runs, in one process and one Ray instance, the same tiny configuration (a) directly with `Trainer.fit` (no Ray),
(b) as a Tune study whose trials train in-process, and (c) as a Tune study whose trials each run a 2-worker
TorchTrainer -- one trial at a time, so the per-trial wall time is not blurred by concurrency. Overhead per trial =
wall time per trial - the training time the trial itself reported. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from gradalign.config import TrainConfig
from gradalign.ray_adapter import Range, SearchSpace, StudySettings, TrialExecution, connect, results_table, run_study
from gradalign.training import Trainer
from trainables import gradalign_trainable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3, help="trials per setting (default %(default)s)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per trial (default %(default)s)")
    p.add_argument("--algorithm", default="sgd", help="(default %(default)s)")
    args = p.parse_args()
    fixed = dict(dataset="digits", model="mlp", algorithm=args.algorithm, clients=4, batch_size=64,
                 epochs=args.epochs, seed=0)

    torch.set_num_threads(1)  # as in a 1-CPU trial (Ray sets OMP_NUM_THREADS from the trial's CPUs)
    Trainer(TrainConfig(**fixed)).fit()  # also warms the data cache
    start = time.perf_counter()
    Trainer(TrainConfig(**fixed)).fit()
    direct = time.perf_counter() - start

    start = time.perf_counter()
    cpus = connect(local=True)["CPU"]  # a private Ray: never someone's `ray start` cluster
    init = time.perf_counter() - start

    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            settings = StudySettings(name=f"overhead-{workers}", storage_path=tmp, num_samples=args.trials,
                                     max_concurrent_trials=1, seed=0)
            space = SearchSpace(fixed=fixed, lr=Range(0.05, 0.1, log=True))
            start = time.perf_counter()
            results = run_study(gradalign_trainable, space, settings, TrialExecution(workers=workers),
                                log=lambda s: None)
            wall = (time.perf_counter() - start) / args.trials
            table = results_table(results)
        training = table.groupby("trial_id")["wall_time"].max().mean()
        rows.append((workers, wall, training, wall - training))

    load = os.getloadavg()[0]
    print(f"\nmachine: {cpus:g} CPUs, load average {load:.1f}; ray.init {init:.1f} s; {args.trials} trials per row, "
          f"one at a time; {fixed['algorithm']}, digits/mlp, {args.epochs} epoch(s), batch 64, 4 clients")
    print(f"direct Trainer.fit (no Ray, 1 thread): {direct:.2f} s")
    print(f"{'workers':>7} {'wall/trial s':>13} {'training s':>11} {'overhead s':>11} {'vs 1 worker':>12}")
    for workers, wall, training, overhead in rows:
        print(f"{workers:>7} {wall:>13.1f} {training:>11.2f} {overhead:>11.1f} {wall / rows[0][1]:>11.1f}x")


if __name__ == "__main__":
    main()
