"""How far does data-parallel training scale? Accuracy and steps-to-target versus global batch size, tuned per cell.

    python studies/batch_scaling.py                  # MNIST-1D, 1-D CNN, B = 64..1024 (under 10 min on 2 cores)
    python studies/batch_scaling.py --smoke-test     # the whole pipeline on digits in about 2 minutes
    python studies/batch_scaling.py --report-only --out results/batch-scaling --export png,pdf   # rebuild the report
    python studies/batch_scaling.py --dataset cifar10 --model lenet --batch-sizes 128 512 2048 --download \\
        --trials-per-cell 24 --workers 4 --gpus-per-worker 1 --storage s3://bucket/gradalign   # on a cluster's head

The method of Shallue et al. (2018) and Google's tuning playbook:
- scientific: global batch size B (the parallelism) x algorithm. Small-batch SGD at batch b is the reference;
  large-batch SGD and GradAlign at B split B into B/b micro-batches (GradAlign's clients) of that same b, so
  GradAlign emulates the reference's implicit regularisation at any parallelism;
- nuisance, re-tuned in every cell with Ray Tune + Optuna (TPE) on the validation split: step size and β
  (momentum fixed at 0.9 by default, or searched with --momentum-range; a 10% linear warmup and a cosine decay, as
  large-batch training needs); each tuning trial is scored on two seeds, so that a step size at the edge of
  stability, which collapses on other seeds, is less likely to be chosen;
- fixed: dataset, model, the micro-batch b, and the budget: the same number of training examples for every cell
  (--epochs x training-set size, rounded up to a multiple of every batch size), or the same number of steps
  (--budget-steps);
- the best configuration of each cell is re-run with seeds disjoint from the tuning seeds; the test metrics of
  those runs are the result (mean, 95% CI, n); steps to the target are read off the validation accuracy on a
  log-spaced evaluation schedule.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import pandas as pd

from gradalign.analysis import fit_critical_batches
from gradalign.config import ALGORITHMS, DATASETS, MODELS, ConfigError
from gradalign.ray_adapter import Range, SearchSpace
from gradalign.report import noise_by_algorithm
from gradalign.verdict import protocol_sentence, scaling_facts, scaling_sentences
from studies.cells import Cell, save_table
from studies.reporting import build_report, print_outcome
from studies.study_cli import (
    add_common_arguments,
    describe_study,
    parse_study_args,
    range_arg,
    run_study_script,
    split_sizes,
)

SMOKE = dict(
    dataset="digits",
    model="mlp",
    batch_sizes=[32, 128],
    epochs=3,
    trials_per_cell=2,
    tuning_seeds=1,
    seeds=2,
    target=0.5,
    eval_points=10,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("scientific axes")
    g.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[64, 256, 512, 1024],
        help="global batch sizes B to compare (the degree of parallelism)",
    )
    g.add_argument(
        "--algorithms",
        nargs="+",
        default=["sgd", "large_batch_sgd", "gradalign"],
        choices=ALGORITHMS,
        metavar="ALG",
        help="'sgd' is the small-batch reference at batch --micro-batch; the others run at "
        f"every B (choices: {', '.join(ALGORITHMS)})",
    )
    g.add_argument(
        "--micro-batch",
        type=int,
        default=32,
        help="b: the reference's batch size, and each micro-batch (client) of GradAlign / large-batch SGD",
    )
    g.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="training processes per trial (1 = in the trial's process; >1 = Ray Train workers); "
        "several values make the number of workers a scientific axis too",
    )
    g = p.add_argument_group("fixed parameters and budget")
    g.add_argument(
        "--dataset",
        default="mnist1d",
        choices=DATASETS,
        help="default mnist1d: generated offline, small enough for a CPU, hard enough to scale badly",
    )
    g.add_argument("--model", default="cnn", choices=MODELS, help="default cnn (the MNIST-1D paper's 1-D CNN)")
    g.add_argument(
        "--epochs",
        type=float,
        default=20,
        help="budget: every run sees EPOCHS x (training-set size) examples, rounded up to a multiple of "
        "every batch size so that every cell sees exactly the same number",
    )
    g.add_argument(
        "--budget-steps",
        type=int,
        default=None,
        help="budget in steps instead: every run takes this many updates (large batches then see more examples)",
    )
    g.add_argument(
        "--target", type=float, default=0.6, help="target validation accuracy for steps-to-target, in (0, 1]"
    )
    g.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="the verdict says up to which B each algorithm stays within this much test accuracy of the "
        "small-batch reference (default 0.01: one percentage point)",
    )
    g = p.add_argument_group("nuisance parameters, re-tuned in every cell")
    g.add_argument(
        "--lr-range",
        type=range_arg,
        default=(0.001, 0.5),
        metavar="LOW,HIGH",
        help="step-size search range (log-uniform)",
    )
    g.add_argument(
        "--beta-range",
        type=range_arg,
        default=(1e-4, 1.0),
        metavar="LOW,HIGH",
        help="GradAlign's β search range (log-uniform)",
    )
    g.add_argument(
        "--momentum-range",
        type=range_arg,
        default=None,
        metavar="LOW,HIGH",
        help="momentum search range (uniform); default 'none': fixed at --momentum",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="the fixed momentum when it is not searched")
    g.add_argument(
        "--lr-schedule",
        default="cosine",
        choices=("constant", "linear", "cosine"),
        help="step-size decay over the budget (default cosine, to zero at the end)",
    )
    g.add_argument(
        "--warmup",
        type=float,
        default=0.1,
        help="fraction of each run's steps over which the step size rises linearly from 0 (default 0.1)",
    )
    add_common_arguments(p, default_name="batch-scaling", smoke=SMOKE, tuning_seeds=2)
    return p


def validate(args: argparse.Namespace) -> None:
    """Refuse impossible axes before anything starts; the message names the option and the value."""
    if not args.algorithms:
        raise ConfigError("algorithms", args.algorithms, "name at least one algorithm")
    if args.micro_batch < 1:
        raise ConfigError("micro_batch", args.micro_batch, "must be a positive integer")
    for b in args.batch_sizes:
        if b < args.micro_batch:
            raise ConfigError(
                "batch_sizes",
                b,
                f"is smaller than the micro-batch b={args.micro_batch} "
                "(each of the B/b clients needs at least b examples)",
            )
        if b % args.micro_batch:
            raise ConfigError("batch_sizes", b, f"is not a multiple of the micro-batch b={args.micro_batch}")
    if not (0 < args.target <= 1) or math.isnan(args.target):
        raise ConfigError("target", args.target, "target accuracy must lie in (0, 1]")
    if any(w < 1 for w in args.workers):
        raise ConfigError("workers", args.workers, "every value must be >= 1")
    if not args.epochs > 0 or math.isinf(args.epochs):
        raise ConfigError("epochs", args.epochs, "must be a positive number")
    if args.budget_steps is not None and args.budget_steps < 1:
        raise ConfigError("budget_steps", args.budget_steps, "must be a positive integer")
    resolve_budget(args)


def resolve_budget(args: argparse.Namespace) -> None:
    """The budget every cell gets, in examples (default) or steps; sets args.budget_examples / budget_steps /
    budget_epochs and a sentence for the report."""
    batches = [args.micro_batch, *args.batch_sizes] if "sgd" in args.algorithms else list(args.batch_sizes)
    n_train = split_sizes(args)["train"]
    if args.budget_steps is not None:
        args.budget_examples = None
        args.budget_epochs = args.budget_steps * max(batches) / n_train
        args.budget_text = (
            f"{args.budget_steps} steps per run (B x {args.budget_steps} examples at batch size B; "
            f"training split: {n_train} examples)"
        )
        return
    unit = math.lcm(*batches)
    args.budget_examples = unit * math.ceil(args.epochs * n_train / unit)
    args.budget_epochs = args.budget_examples / n_train
    args.budget_text = (
        f"{args.budget_examples} training examples per run in every cell ({args.budget_epochs:.3g} "
        f"epochs of the {n_train}-example training split; {args.budget_examples // max(batches)} "
        f"steps at B={max(batches)}, {args.budget_examples // min(batches)} at b={min(batches)})"
    )


def plan_cells(args: argparse.Namespace) -> tuple[Cell, ...]:
    fixed = dict(
        dataset=args.dataset,
        model=args.model,
        num_samples=args.num_samples,
        budget_examples=args.budget_examples,
        budget_steps=args.budget_steps,
        val_fraction=args.val_fraction,
        eval_points=args.eval_points,
        lr_schedule=args.lr_schedule,
        warmup=args.warmup,
        data_dir=str(Path(args.data_dir).resolve()),
        download=args.download,
        seed=0,
        **({} if args.momentum_range else {"momentum": args.momentum}),
    )
    ranges = dict(
        lr=Range(*args.lr_range, log=True), momentum=Range(*args.momentum_range) if args.momentum_range else None
    )
    cells = []
    for workers in args.workers:
        suffix = f"-w{workers}" if len(args.workers) > 1 else ""
        if "sgd" in args.algorithms:  # the small-batch reference: plain SGD at batch b
            b = args.micro_batch
            space = SearchSpace(fixed={**fixed, "algorithm": "sgd", "batch_size": b, "clients": 1}, **ranges)
            cells.append(
                Cell(f"sgd-B{b}{suffix}", dict(algorithm="sgd", batch_size=b, workers=workers), space, workers)
            )
        for algorithm in [a for a in args.algorithms if a != "sgd"]:
            for batch in args.batch_sizes:
                cfg = {**fixed, "algorithm": algorithm, "batch_size": batch, "clients": batch // args.micro_batch}
                beta = Range(*args.beta_range, log=True) if algorithm in ("gradalign", "fedga") else None
                space = SearchSpace(fixed=cfg, beta=beta, **ranges)
                cells.append(
                    Cell(
                        f"{algorithm}-B{batch}{suffix}",
                        dict(algorithm=algorithm, batch_size=batch, workers=workers),
                        space,
                        workers,
                    )
                )
    return tuple(cells)


def main(argv: list[str] | None = None) -> int:
    args = parse_study_args(build_parser(), argv)
    describe = describe_study("batch-scaling", args, f"{args.dataset}/{args.model}")
    return run_study_script(args, argv, plan_cells, validate, report, describe)


def verdict(args: argparse.Namespace):
    """The report's opening sentences: protocol, where each algorithm leaves the reference, B_crit, GradAlign's
    difference from large-batch SGD where it matters."""

    def sentences(history: pd.DataFrame, cells: pd.DataFrame, sig: pd.DataFrame) -> list[str]:
        scaled = cells[cells["algorithm"] != "sgd"]
        fits = fit_critical_batches(scaled) if len(scaled) else {}
        facts = scaling_facts(cells, sig, fits, noise_by_algorithm(history), reference="sgd", tolerance=args.tolerance)
        ref = facts["reference"]
        test_size = getattr(args, "split_sizes", {}).get("test")
        protocol = protocol_sentence(
            args.trials_per_cell,
            args.seeds,
            getattr(args, "budget_text", "see below"),
            test_size,
            ref["acc"] if ref else None,
            args.tuning_seeds,
        )
        return [protocol, *scaling_sentences(facts, target=args.target)]

    return sentences


def report(out: Path, args: argparse.Namespace, command: str, history: pd.DataFrame) -> int:
    save_table(history, out / "history")
    search_ranges = {}  # per algorithm: only what was searched for it
    for algorithm in set(history["algorithm"]):
        search_ranges[algorithm] = {"lr": tuple(args.lr_range)}
        if algorithm in ("gradalign", "fedga"):
            search_ranges[algorithm]["beta"] = tuple(args.beta_range)
        if args.momentum_range:
            search_ranges[algorithm]["momentum"] = tuple(args.momentum_range)
    budget = {
        "budget": getattr(args, "budget_text", f"{args.epochs} epochs per run"),
        "counted in": "examples seen and steps (parameter updates; small-batch SGD: one per micro-batch)",
        "tuning": f"{args.trials_per_cell} trials per cell, scored by validation accuracy at the end of the "
        f"budget" + (f" (mean of {args.tuning_seeds} seeds)" if args.tuning_seeds > 1 else ""),
        "final runs": f"{args.seeds} seeds per cell's best configuration, disjoint from the tuning seeds; "
        "their test accuracy is reported",
        "validation split": f"{args.val_fraction:g} of the training data (stratified, the same for every seed)",
        "micro-batch b": args.micro_batch,
        "target": f"validation accuracy {args.target} (steps to it interpolated between evaluations)",
    }
    path = build_report(
        out,
        history,
        target=args.target,
        x="batch_size",
        title="GradAlign batch-scaling study",
        command=command,
        budget=budget,
        search_ranges=search_ranges,
        verdict=verdict(args),
        export=args.export,
    )
    print_outcome(out, path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    sys.exit(main())
