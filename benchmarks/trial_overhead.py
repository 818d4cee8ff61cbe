"""What a trial costs beyond its training: the platform against a plain Optuna loop and a bare TorchTrainer.

    python benchmarks/trial_overhead.py                  # 6 trials per row, digits/mlp, 2 epochs
    python benchmarks/trial_overhead.py --trials 10 --epochs 1 --skip-train

Four rows, measured in one run on the same configurations, one trial at a time (so that concurrency does not blur
the per-trial wall time):

1. `optuna loop`: `optuna.create_study(...).optimize` over the same Trainer and search space, in this process: the
   floor of any tuner;
2. `platform, 1 worker`: the study engine's tuning phase (`gradalign.ray_adapter.engine.Engine.search`, what every
   study runs) with trials that train in the Tune trial's own process;
3. `bare TorchTrainer`: a `ray.train.torch.TorchTrainer` of 2 workers whose loop builds the same Trainer and fits it,
   reporting once at the end (Ray Train's own fixed cost);
4. `platform, 2 workers`: the same with Ray Train trials of 2 workers (each saves its state and rank 0 the
   trial's record at every evaluation; reports to Tune every few seconds and at the end).

Each row splits its wall time into a fixed part, paid once per study (Ray Tune's start-up, the first trial process
importing torch and loading the data, shutdown), and the steady per-trial time (between the first and the last
trial's end), which is what hundreds of trials multiply. Per trial: the training inside it (the Trainer's own wall
time, evaluations included), the overhead (per trial - training), the share of the per-trial time spent training,
and the overhead beside its reference row's (row 1 for row 2, row 3 for row 4). Then the number of Ray actors still
alive: none should outlive its study. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import optuna
import ray.train
import ray.train.torch
import torch
from ray import tune

from gradalign.comm import TorchDistributedComm
from gradalign.config import TrainConfig
from gradalign.protocol import Budget, StudyProtocol
from gradalign.ranges import Range
from gradalign.ray_adapter import Cell, Resources, SearchSpace, StudyPlan, connect
from gradalign.ray_adapter.engine import Engine
from gradalign.training import Trainer
from studies.study_cli import DataLocation, split_sizes
from trainables import gradalign_trainable

LR = (0.05, 0.2)


class Timing:
    """Per-row timings: the whole run, and when each trial ended (to split a fixed cost from the per-trial cost)."""

    def __init__(self):
        self.ends: list[float] = []
        self.training: list[float] = []
        self.start = self.stop = 0.0

    def row(self, name: str) -> tuple:
        """(name, trials, wall, fixed, per trial, training per trial). Per trial: the steady state, between the first
        and the last trial's end; fixed: what is left of the wall time (start-up, the first trial's extra, shutdown).
        With one trial, all of it counts as per trial."""
        n, wall = len(self.ends), self.stop - self.start
        per_trial = (self.ends[-1] - self.ends[0]) / (n - 1) if n > 1 else wall
        return name, n, wall, wall - n * per_trial, per_trial, sum(self.training) / n


class EndTimes(tune.Callback):
    def __init__(self, timing: Timing):
        self.timing = timing

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.timing.ends.append(time.perf_counter())


def optuna_loop(fixed: dict, trials: int) -> tuple:
    timing = Timing()

    def objective(trial: optuna.Trial) -> float:
        config = TrainConfig(**fixed, lr=trial.suggest_float("lr", *LR, log=True))
        history = Trainer(config).fit()
        timing.training.append(history[-1]["wall_time"])
        return history[-1]["val_accuracy"]

    timing.start = time.perf_counter()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials, callbacks=[lambda *_: timing.ends.append(time.perf_counter())])
    timing.stop = time.perf_counter()
    return timing.row("optuna loop")


def platform_trials(fixed: dict, trials: int, workers: int) -> tuple:
    """`trials` tuning trials of one cell through the study engine, one at a time."""
    timing = Timing()
    sizes = split_sizes(fixed["dataset"], DataLocation(fixed["data_dir"], False), None, 0.1)
    examples = fixed["batch_size"] * -(-int(fixed["epochs"] * sizes["train"]) // fixed["batch_size"])
    protocol = StudyProtocol(
        kind="tune",
        name=f"overhead-{workers}",
        dataset=fixed["dataset"],
        model=fixed["model"],
        budget=Budget("examples", examples, examples / sizes["train"]),
        split_sizes=sizes,
        trials_per_cell=trials,
        ranges={"sgd": {"lr": Range(*LR, log=True)}},
    )
    config = {k: v for k, v in fixed.items() if k != "epochs"}
    space = SearchSpace(fixed={**config, "budget_examples": examples}, lr=Range(*LR, log=True))
    with tempfile.TemporaryDirectory() as tmp:
        cell = Cell("overhead", {"algorithm": "sgd"}, space, workers)
        plan = StudyPlan(protocol, Path(tmp), (cell,), Resources(max_concurrent=1))
        engine = Engine(plan, gradalign_trainable, None, log=lambda s: None, callbacks=[EndTimes(timing)])
        timing.start = time.perf_counter()
        table = engine.search("tune")["overhead"]
        timing.stop = time.perf_counter()
    timing.training = list(table.groupby("trial_id")["wall_time"].max())
    return timing.row(f"platform, {workers} worker{'s' if workers > 1 else ''}")


def _bare_loop(loop_config: dict) -> float:
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**loop_config), comm=TorchDistributedComm())
    history = trainer.fit()
    ray.train.report({"wall_time": history[-1]["wall_time"]})
    return history[-1]["wall_time"]


def bare_torch_trainer(fixed: dict, trials: int) -> tuple:
    timing = Timing()
    with tempfile.TemporaryDirectory() as tmp:
        timing.start = time.perf_counter()
        for k in range(trials):
            trainer = ray.train.torch.TorchTrainer(
                _bare_loop,
                train_loop_config={**fixed, "lr": LR[0]},
                scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                run_config=ray.train.RunConfig(name=f"bare-{k}", storage_path=tmp),
            )
            timing.training.append(trainer.fit().return_value)
            timing.ends.append(time.perf_counter())
        timing.stop = time.perf_counter()
    return timing.row("bare TorchTrainer")


def alive_actors() -> int:
    """Ray actors alive now (Ray Train's controllers and workers, Tune's trial actors, ...)."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    return len(list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000))


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
    fixed = dict(
        dataset=args.dataset,
        model=args.model,
        algorithm="sgd",
        clients=4,
        batch_size=64,
        epochs=args.epochs,
        seed=0,
        data_dir=os.path.abspath("data"),
    )

    torch.set_num_threads(1)  # as in a 1-CPU trial (Ray sets OMP_NUM_THREADS from the trial's CPUs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Trainer(TrainConfig(**fixed)).fit()  # warms the data cache for the in-process rows
    start = time.perf_counter()
    cpus = connect(local=True)["CPU"]  # a private Ray: never someone's `ray start` cluster
    init = time.perf_counter() - start

    rows = [optuna_loop(fixed, args.trials), platform_trials(fixed, args.trials, 1)]
    if not args.skip_train:
        rows += [bare_torch_trainer(fixed, args.trials), platform_trials(fixed, args.trials, 2)]
    time.sleep(2)  # (Ray ends a finished Train run's actors asynchronously)
    leftover = alive_actors()

    print(
        f"\nmachine: {cpus:g} CPUs, load average {os.getloadavg()[0]:.1f}; ray.init {init:.1f} s; {args.trials} "
        f"trials per row, one at a time; sgd on {args.dataset}/{args.model}, {args.epochs:g} epochs, batch 64"
    )
    print(
        "per trial: the steady state (between the first and the last trial's end); fixed: the rest of the row's wall "
        "time, once per study (start-up, the first trial's imports and data, shutdown)"
    )
    print(
        f"{'row':<20} {'wall s':>7} {'fixed s':>8} {'per trial s':>12} {'training s':>11} {'overhead s':>11} "
        f"{'training share':>15} {'overhead - ref s':>17}"
    )
    for i, (name, _n, wall, fixed_s, per_trial, training) in enumerate(rows):
        overhead = per_trial - training
        ref = rows[i - 1] if i % 2 else None
        versus = f"{overhead - (ref[4] - ref[5]):+.2f}" if ref else "-"
        print(
            f"{name:<20} {wall:>7.1f} {fixed_s:>8.1f} {per_trial:>12.2f} {training:>11.2f} {overhead:>11.2f} "
            f"{training / per_trial:>14.0%} {versus:>17}"
        )
    print(f"Ray actors alive after the last row: {leftover}")


if __name__ == "__main__":
    main()
