"""Tune one algorithm on one setting with Ray Tune + Optuna, locally or on a running Ray cluster.

    python studies/tune.py                                    # GradAlign on MNIST-1D, 16 trials, a few minutes
    python studies/tune.py --smoke-test                       # the whole pipeline on digits in about a minute
    python studies/tune.py --algorithm fedprox --mu-range 1e-3,1 --name digits-fedprox --dataset digits
    python studies/tune.py --workers 2 --asha                 # each trial = a 2-worker Ray Train run
    python studies/tune.py --report-only --out results/tune   # rebuild the report from the folder

A one-cell study on the same engine as the scaling studies: the nuisance parameters (lr, β for GradAlign/FedGA,
the batch size among --batch-sizes, and optionally momentum, weight decay, local steps K, μ and the server step
size) are tuned with Optuna's TPE on the validation split (--metric, default val_accuracy at the end of the
budget; --multi-objective adds the wall time as a second objective), then the chosen configuration is re-run with
fresh seeds whose test accuracy is the result (mean, 95% CI, n). Everything else is fixed (--set FIELD=VALUE for
any TrainConfig field). The budget is --epochs passes' worth of training examples per run (or --budget-steps).

Writes into --out (default results/<name>): report.html (verdict, tuning figures, cells), summary.json, the tables
(history, cells), optuna.db (`optuna-dashboard sqlite:///OUT/optuna.db`) and study.json (what a resume must match).
Re-running the same command resumes the study; --report-only rebuilds the report.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import time
from pathlib import Path

from gradalign.config import ALGORITHMS, ALIGNING_ALGORITHMS, FEDERATED_ALGORITHMS, PARTITIONS, ConfigError
from gradalign.findings import Evidence, build_report
from gradalign.protocol import Budget, StudyProtocol
from gradalign.ranges import Range
from gradalign.verdict import protocol_sentence
from studies.study_cli import (
    DataLocation,
    StudyCommand,
    range_arg,
    rewrite_deprecated,
    split_sizes,
    study_parser,
    tuning_settings,
)

KIND = "tune"
SMOKE = dict(
    dataset="digits",
    model="mlp",
    epochs=2,
    batch_sizes=[64, 128],
    seeds=2,
    eval_points=6,
    target=0.5,
    trials_per_cell=3,
    confirm_top=2,
    confirm_seeds=1,
    max_extensions=1,
)
DEPRECATED = {
    "--lr": ("--lr-range", 2),
    "--beta": ("--beta-range", 2),
    "--momentum": ("--momentum-range", 2),
    "--weight-decay": ("--weight-decay-range", 2),
    "--local-steps": ("--local-steps-range", 2),
    "--mu": ("--mu-range", 2),
    "--server-lr": ("--server-lr-range", 2),
    "--trials": ("--trials-per-cell", 1),
    "--gpu": ("--gpus-per-worker", 0),
}
"""The spellings of the previous release: OLD VALUES -> NEW (ranges: 'LO HI' -> 'LO,HI'), with a note on stderr."""


def build_parser() -> argparse.ArgumentParser:
    p, groups = study_parser(
        __doc__,
        default_name=KIND,
        smoke=SMOKE,
        dataset="mnist1d",
        model="cnn",
        epochs=5,
        target=0.6,
        lr_range=(0.01, 1.0),
        beta_range=(1e-4, 0.5),
        trials_per_cell=16,
        seeds=3,
    )
    g = groups["fixed"]
    g.add_argument("--algorithm", choices=ALGORITHMS, default="gradalign", help="algorithm to tune (default gradalign)")
    g.add_argument(
        "--clients",
        type=int,
        default=8,
        help="clients m (micro-batches); every batch size must be divisible by it (default 8)",
    )
    g.add_argument(
        "--partition", choices=PARTITIONS, default="iid", help="how data are split over clients (default iid)"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes per trial: 1 trains inside the trial process; N > 1 runs a Ray Train TorchTrainer (default 1)",
    )
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="(default float32)")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="fix any other TrainConfig field, e.g. --set participation=0.5 (repeatable)",
    )
    g = groups["nuisance"]
    g.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[64, 128, 256],
        metavar="B",
        help="global batch sizes to choose from (categorical; one value fixes it; default 64 128 256)",
    )
    g.add_argument(
        "--weight-decay-range",
        type=range_arg,
        default=None,
        metavar="LOW,HIGH",
        help="weight decay, log-uniform, LOW > 0 (default none: 0)",
    )
    g.add_argument(
        "--local-steps-range",
        type=range_arg,
        default=None,
        metavar="LOW,HIGH",
        help="integer K, federated algorithms (default none: fixed)",
    )
    g.add_argument(
        "--mu-range",
        type=range_arg,
        default=None,
        metavar="LOW,HIGH",
        help="μ of FedProx, log-uniform (default none: FedProx's default)",
    )
    g.add_argument(
        "--server-lr-range",
        type=range_arg,
        default=None,
        metavar="LOW,HIGH",
        help="server step size, log-uniform, federated algorithms (default none: 1)",
    )
    g = groups["tuning"]
    g.add_argument(
        "--metric",
        choices=("val_accuracy", "val_loss"),
        default="val_accuracy",
        help="metric to optimise at a trial's last evaluation: the validation split (the test split is for "
        "reporting; default val_accuracy)",
    )
    g.add_argument(
        "--mode", choices=("max", "min"), default=None, help="max or min (default: max for accuracy, min for a loss)"
    )
    g.add_argument(
        "--multi-objective",
        action="store_true",
        help="optimise METRIC and the wall time (min) together (a Pareto front; the chosen configuration "
        "is the best on METRIC; ASHA then uses METRIC)",
    )
    return p


def make_protocol(args: argparse.Namespace, data: DataLocation) -> StudyProtocol:
    """The one cell: what is searched, what is fixed, the budget."""
    sizes = split_sizes(
        args.dataset,
        data,
        args.num_samples,
        args.val_fraction,
        clients=args.clients if args.partition == "natural" else None,
    )
    fixed = {
        "clients": args.clients,
        "partition": args.partition,
        "dtype": args.dtype,
        **({} if args.momentum_range else {"momentum": args.momentum}),
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("set", item, "expected FIELD=VALUE")
        fixed[key.strip().replace("-", "_")] = _literal(value)
    if args.workers < 1:
        raise ConfigError("workers", args.workers, "must be >= 1")
    if not args.batch_sizes or any(b < 1 for b in args.batch_sizes):
        raise ConfigError("batch_sizes", args.batch_sizes, "every batch size must be >= 1")
    if len(args.batch_sizes) == 1:
        fixed["batch_size"] = args.batch_sizes[0]
    algorithm = args.algorithm
    searched = {"lr": Range(*args.lr_range, log=True)}
    optional = {
        "beta": (args.beta_range, True, ALIGNING_ALGORITHMS),
        "momentum": (args.momentum_range, False, None),
        "weight_decay": (args.weight_decay_range, True, None),
        "local_steps": (args.local_steps_range, False, FEDERATED_ALGORITHMS),
        "mu": (args.mu_range, True, ("fedprox",)),
        "server_lr": (args.server_lr_range, True, FEDERATED_ALGORITHMS),
    }
    for name, (given, log, users) in optional.items():
        if given is not None and (users is None or algorithm in users):
            searched[name] = Range(*given, log=log)
        elif given is not None and name != "beta":
            raise ConfigError(f"{name}_range", given, f"only {', '.join(users)} use {name}; --algorithm {algorithm}")
    mode = args.mode or ("max" if "accuracy" in args.metric else "min")
    objectives = ((args.metric, mode),) + ((("wall_time", "min"),) if args.multi_objective else ())
    budget = budget_of(args, sizes["train"])
    return StudyProtocol(
        kind=KIND,
        name=args.name,
        dataset=args.dataset,
        model=args.model,
        num_samples=args.num_samples,
        budget=budget,
        split_sizes=sizes,
        axes={"algorithm": algorithm, "workers": args.workers, "batch_sizes": list(args.batch_sizes)},
        fixed=fixed,
        ranges={algorithm: searched},
        **tuning_settings(args, budget),
        objectives=objectives,
        target=args.target,
        tolerance=args.tolerance,
        val_fraction=args.val_fraction,
        eval_points=args.eval_points,
        notes={"batch size": "searched among " + ", ".join(map(str, args.batch_sizes))}
        if len(args.batch_sizes) > 1
        else {},
    )


def budget_of(args: argparse.Namespace, n_train: int) -> Budget:
    if not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise ConfigError("epochs", args.epochs, "must be a positive finite number")
    if args.budget_steps is not None:
        if args.budget_steps < 1:
            raise ConfigError("budget_steps", args.budget_steps, "must be a positive integer")
        return Budget(
            "steps",
            args.budget_steps,
            args.budget_steps * max(args.batch_sizes) / n_train,
            f"{args.budget_steps} steps per run (training split: {n_train} examples)",
        )
    unit = math.lcm(*args.batch_sizes)
    examples = unit * math.ceil(args.epochs * n_train / unit)
    return Budget(
        "examples",
        examples,
        examples / n_train,
        f"{examples} training examples per run ({examples / n_train:.3g} epochs of the {n_train}-example "
        f"training split; {examples // max(args.batch_sizes)} steps at B={max(args.batch_sizes)}, "
        f"{examples // min(args.batch_sizes)} at B={min(args.batch_sizes)})",
    )


def plan_cells(protocol: StudyProtocol, data: DataLocation) -> list:
    from gradalign.ray_adapter import Cell, SearchSpace

    algorithm, budget = protocol.axes["algorithm"], protocol.budget
    fixed = dict(
        dataset=protocol.dataset,
        model=protocol.model,
        num_samples=protocol.num_samples,
        algorithm=algorithm,
        budget_examples=budget.amount if budget.unit == "examples" else None,
        budget_steps=budget.amount if budget.unit == "steps" else None,
        val_fraction=protocol.val_fraction,
        eval_points=protocol.eval_points,
        data_dir=data.data_dir,
        download=data.download,
        seed=protocol.tuning_seeds[0],
        **protocol.fixed,
    )
    batch_sizes = protocol.axes["batch_sizes"]
    space = SearchSpace(
        fixed=fixed,
        batch_sizes=tuple(batch_sizes) if len(batch_sizes) > 1 else (),
        **{"lr": None, **protocol.ranges[algorithm]},
    )
    workers = protocol.axes["workers"]
    return [Cell(algorithm, {"algorithm": algorithm, "workers": workers}, space, workers)]


def verdict(protocol: StudyProtocol):
    """The chosen configuration and what its seed runs reach, with the protocol that made the numbers."""

    def sentences(evidence: Evidence) -> list[str]:
        cells = evidence.cells
        first = protocol_sentence(
            protocol.trials_per_cell,
            len(protocol.seeds),
            protocol.budget.sentence(),
            protocol.test_size,
            cells["acc_mean"].mean() if len(cells) else None,
            len(protocol.tuning_seeds),
            design=protocol.design,
            tuning=protocol.tuning_sentence(),
        )
        out = [first]
        searched = [p for p in protocol.ranges[protocol.axes["algorithm"]] if p != "local_steps"]
        for row in cells.itertuples():
            params = ", ".join(f"{p}={getattr(row, p):.3g}" for p in searched if _finite(getattr(row, p, None)))
            spread = f" ± {100 * row.acc_std:.1f}" if _finite(row.acc_std) else ""
            out.append(
                f"The chosen configuration ({params}, B = {row.batch_size:g}) reaches {100 * row.acc_mean:.1f}%"
                f"{spread} test accuracy (n = {row.n_seeds} seeds)."
            )
        return out

    return sentences


def write_report(protocol: StudyProtocol, command: StudyCommand) -> Path:
    started = time.perf_counter()
    path = build_report(
        command.out,
        command.history(),
        protocol,
        x="batch_size",
        title=f"Tuning {protocol.axes['algorithm']} on {protocol.dataset}/{protocol.model}",
        command=command.text,
        verdict=verdict(protocol),
        export=command.args.export,
    )
    command.finish_report(path, started)
    print(f"optuna-dashboard sqlite:///{command.out / 'optuna.db'}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = rewrite_deprecated(list(sys.argv[1:] if argv is None else argv), DEPRECATED)
    command = StudyCommand(build_parser(), argv, KIND)
    with command.refusals():
        args = command.args
        protocol = command.recorded() if args.report_only else make_protocol(args, command.data)
        if not args.report_only:
            command.run(protocol, plan_cells(protocol, command.data))
        write_report(protocol, command)
    return command.code


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
