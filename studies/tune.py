"""Tune one algorithm on one setting with Ray Tune + Optuna, locally or on a running Ray cluster.

    python studies/tune.py                                   # GradAlign on MNIST-1D, 16 trials, a few minutes on 2 CPUs
    python studies/tune.py --algorithm fedprox --mu 1e-3 1 --name digits-fedprox
    python studies/tune.py --workers 2 --asha                # each trial = a 2-worker Ray Train run
    python studies/tune.py --name my-study                   # again, after a crash or Ctrl-C: resumes it

What varies: lr (log-uniform), beta (GradAlign/FedGA, log-uniform), the batch size (categorical), and optionally
momentum, weight decay, local steps K and server step size (federated) and mu (FedProx). Everything else is fixed
(--set FIELD=VALUE for any TrainConfig field). The budget is --epochs passes' worth of training examples per trial
(or --budget-steps updates), --trials trials. Trials are scored on the validation split (--metric, default
val_accuracy, at the end of the budget); the test split is only reported.

Writes into OUT/NAME/: results.parquet and results.csv (a row per trial per evaluation: configuration, metrics, status,
provenance), optuna.db (the Optuna study: `optuna-dashboard sqlite:///OUT/NAME/optuna.db`), figures/*.html
(optimization history, parameter importances, lr x beta contour), tune/ (Ray Tune's experiment, for resuming),
train/, state/ and history/ (trial checkpoints and metric histories) and study.json (what a resume must match).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

import optuna

import trainables
from gradalign.config import ALGORITHMS, ALIGNING_ALGORITHMS, DATASETS, MODELS, PARTITIONS, ConfigError
from gradalign.ray_adapter import (
    GROUP_SEEDS,
    Range,
    SearchSpace,
    StudySettings,
    TrialExecution,
    results_table,
    run_study,
    sync_optuna_study,
    write_results_table,
)
from studies.cluster_checks import ClusterNotReady, check_cluster, join_or_start
from studies.common import ProgressPrinter, best_row, format_params, write_figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("study")
    g.add_argument("--name", default=None, help="study name (default DATASET-ALGORITHM); re-running a name resumes it")
    g.add_argument(
        "--out", default="results/tune", help="output folder; the study lives in OUT/NAME (default %(default)s)"
    )
    g.add_argument("--trials", type=int, default=16, help="number of trials (default %(default)s)")
    g.add_argument(
        "--metric",
        default="val_accuracy",
        help="metric to optimise, at a trial's last evaluation; a validation metric (val_accuracy, "
        "val_loss), since the test split is for reporting (default %(default)s)",
    )
    g.add_argument(
        "--mode", choices=("max", "min"), default=None, help="max or min (default: max for accuracy, else min)"
    )
    g.add_argument(
        "--multi-objective",
        action="store_true",
        help="optimise METRIC and wall_time (min) together (Pareto front; ASHA then uses METRIC)",
    )
    g.add_argument("--sampler-seed", type=int, default=0, help="seed of Optuna's TPE sampler (default %(default)s)")
    g.add_argument(
        "--asha", action="store_true", help="stop unpromising trials early (ASHA on epochs of examples seen)"
    )
    g.add_argument(
        "--grace-period",
        type=float,
        default=1.0,
        help="ASHA: epochs' worth of examples before a trial may be stopped (default %(default)s)",
    )
    g.add_argument(
        "--time-budget", type=float, default=None, help="seconds after which no new trial starts (default: none)"
    )

    g = p.add_argument_group("fixed setting")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mnist1d",
        help="dataset (default %(default)s, generated offline; digits is bundled; others need --download)",
    )
    g.add_argument("--model", choices=MODELS, default="cnn", help="model (default %(default)s)")
    g.add_argument(
        "--algorithm", choices=ALGORITHMS, default="gradalign", help="algorithm to tune (default %(default)s)"
    )
    g.add_argument(
        "--clients",
        type=int,
        default=8,
        help="clients m; every batch size must be divisible by it (default %(default)s)",
    )
    g.add_argument(
        "--epochs",
        type=float,
        default=5,
        help="budget per trial in passes over the training split (default %(default)s)",
    )
    g.add_argument("--budget-steps", type=int, default=None, help="budget in updates instead of epochs")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of the training data held out for validation (default %(default)s)",
    )
    g.add_argument(
        "--partition", choices=PARTITIONS, default="iid", help="how data are split over clients (default %(default)s)"
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of every trial's model, partition and batches (default %(default)s)"
    )
    g.add_argument(
        "--tuning-seeds",
        type=int,
        default=1,
        help="seeds each trial trains side by side (SEED, SEED+1, ...), scored by their mean: robust to "
        "configurations at the edge of stability, at that many runs per trial (default %(default)s)",
    )
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="(default %(default)s)")
    g.add_argument("--data-dir", default="data", help="dataset folder (made absolute: trials run in other folders)")
    g.add_argument("--download", action="store_true", help="allow downloading the dataset into --data-dir")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="fix any other TrainConfig field, e.g. --set participation=0.5 (repeatable)",
    )

    g = p.add_argument_group("search space (LO HI ranges; give a range to search a parameter, omit it to fix it)")
    g.add_argument(
        "--lr", type=float, nargs=2, default=(1e-2, 1.0), metavar=("LO", "HI"), help="log-uniform (default %(default)s)"
    )
    g.add_argument(
        "--beta",
        type=float,
        nargs=2,
        default=(1e-4, 0.5),
        metavar=("LO", "HI"),
        help="log-uniform, only for gradalign/fedga (default %(default)s)",
    )
    g.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=(64, 128, 256),
        metavar="B",
        help="categorical global batch sizes (default %(default)s)",
    )
    g.add_argument("--momentum", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="uniform, in [0, 1)")
    g.add_argument(
        "--weight-decay", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="log-uniform, LO > 0"
    )
    g.add_argument(
        "--local-steps", type=int, nargs=2, default=None, metavar=("LO", "HI"), help="integer K, federated algorithms"
    )
    g.add_argument("--mu", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="log-uniform, fedprox only")
    g.add_argument(
        "--server-lr",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="log-uniform server step size, federated algorithms",
    )

    g = p.add_argument_group("execution")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes per trial: 1 trains inside the trial process; N > 1 runs a Ray Train TorchTrainer "
        "(default %(default)s)",
    )
    g.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker (default %(default)s)"
    )
    g.add_argument("--gpu", action="store_true", help="one GPU per worker")
    g.add_argument(
        "--max-concurrent", type=int, default=None, help="cap on concurrent trials (default: as many as the CPUs allow)"
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="retries per trial, each resuming from its checkpoint (default %(default)s)",
    )
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (HOST:PORT); default: RAY_ADDRESS, else the Ray that `ray start` runs "
        "on this machine (on a cluster's head node: the cluster), else a new local Ray",
    )
    where.add_argument(
        "--local",
        action="store_true",
        help="always start a private local Ray, even where a cluster runs on this machine",
    )
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of a Ray started here (default: all)")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[SearchSpace, StudySettings, TrialExecution]:
    """Scientific/nuisance/fixed split of the arguments into a search space, study settings and execution."""
    fixed = dict(
        dataset=args.dataset,
        model=args.model,
        algorithm=args.algorithm,
        clients=args.clients,
        epochs=args.epochs,
        budget_steps=args.budget_steps,
        val_fraction=args.val_fraction,
        partition=args.partition,
        seed=args.seed,
        dtype=args.dtype,
        data_dir=os.path.abspath(args.data_dir),
        download=args.download,
    )
    if args.tuning_seeds < 1:
        raise ConfigError("tuning_seeds", args.tuning_seeds, "must be >= 1")
    if args.tuning_seeds > 1:
        fixed[GROUP_SEEDS] = [args.seed + i for i in range(args.tuning_seeds)]
    if args.metric.startswith("test_"):
        raise ConfigError(
            "metric",
            args.metric,
            "tuning on the test split biases the result it reports: use "
            "val_accuracy or val_loss (the test metrics are in the results table)",
        )
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--set", item, "expected FIELD=VALUE")
        fixed[key.strip().replace("-", "_")] = _literal(value)
    space = SearchSpace(
        fixed=fixed,
        lr=Range(*args.lr, log=True),
        beta=Range(*args.beta, log=True) if args.algorithm in ALIGNING_ALGORITHMS and args.beta else None,
        batch_sizes=tuple(args.batch_sizes or ()),
        momentum=Range(*args.momentum) if args.momentum else None,
        weight_decay=Range(*args.weight_decay, log=True) if args.weight_decay else None,
        local_steps=Range(*args.local_steps) if args.local_steps else None,
        mu=Range(*args.mu, log=True) if args.mu else None,
        server_lr=Range(*args.server_lr, log=True) if args.server_lr else None,
    )
    mode = args.mode or ("max" if "accuracy" in args.metric else "min")
    objectives = ((args.metric, mode),) + ((("wall_time", "min"),) if args.multi_objective else ())
    name = args.name or f"{args.dataset}-{args.algorithm}"
    settings = StudySettings(
        name=name,
        storage_path=os.path.abspath(os.path.join(args.out, name)),
        num_samples=args.trials,
        objectives=objectives,
        seed=args.sampler_seed,
        asha=args.asha,
        grace_period=args.grace_period,
        max_concurrent_trials=args.max_concurrent,
        max_failures=args.max_failures,
        time_budget_s=args.time_budget,
    )
    execution = TrialExecution(
        workers=args.workers, cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpu, storage_path=settings.storage_path
    )
    return space, settings, execution


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.multi_objective and args.asha:
        print(
            "note: trials that ASHA stops report the wall time until they were stopped, so they sit at the fast "
            "end of the Pareto front; read the front with that in mind (or drop --asha)",
            file=sys.stderr,
        )
    try:
        space, settings, execution = build(args)
        space.validate()  # before Ray starts
        connection = join_or_start(args.address, args.local, num_cpus=args.num_cpus)
        check_cluster(
            connection,
            multi_worker=args.workers > 1,
            storage=settings.storage_path,
            storage_fix="pass an --out folder on NFS (or another filesystem) mounted on every node",
        )
        progress = ProgressPrinter(
            settings.num_samples, space.param_names, epochs=None if args.budget_steps else args.epochs
        )
        results = run_study(
            trainables.gradalign_trainable, space, settings, execution, address=args.address, callbacks=[progress]
        )
    except (ConfigError, ConnectionError, ClusterNotReady) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out = Path(settings.storage_path)
    table = results_table(results, execution)
    parquet, csv = write_results_table(table, out)
    sync_optuna_study(table, settings.optuna_storage, settings.name, space, settings.objectives)

    study = optuna.load_study(study_name=settings.name, storage=settings.optuna_storage)
    figures = write_figures(study, out / "figures")

    errors = sorted(set(table.loc[table["trial_status"] == "error", "trial_id"]))
    best = best_row(table, settings.metric, settings.mode)
    print(
        f"\n{table['trial_id'].nunique()} trials, {len(table)} rows -> {parquet} and {csv}"
        + (f"; {len(errors)} errored: {', '.join(errors)}" if errors else "")
    )
    print(
        f"best trial {best['trial_id']} ({best['trial_status']}, after {best['epochs']:.3g} epochs, "
        f"{best['steps']} steps): {settings.metric}={best[settings.metric]:.4g}; reported on the test split: "
        f"test_accuracy={best['test_accuracy']:.4g} test_loss={best['test_loss']:.4g} "
        f"wall_time={best['wall_time']:.1f}s"
    )
    print(f"  configuration: {format_params(best.to_dict(), space.param_names)}")
    if len(settings.objectives) > 1:
        names = [m for m, _ in settings.objectives]
        print(f"Pareto front ({', '.join(names)}):")
        for trial in sorted(study.best_trials, key=lambda t: t.values[0], reverse=settings.mode == "max"):
            values = " ".join(f"{n}={v:.4g}" for n, v in zip(names, trial.values))
            print(
                f"  trial {trial.user_attrs.get('tune_trial_id')}: {values}  "
                f"[{format_params(trial.params, space.param_names)}]"
            )
    print(f"figures: {', '.join(str(f) for f in figures)}")
    print(f"optuna-dashboard {settings.optuna_storage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
