"""How far does data-parallel training scale? Accuracy and steps-to-target versus global batch size, tuned per cell.

    python studies/batch_scaling.py                  # MNIST-1D, 1-D CNN, B = 128..512 (about 9 min on 2 cores)
    python studies/batch_scaling.py --smoke-test     # the whole pipeline on digits in about a minute
    python studies/batch_scaling.py --report-only --out results/batch-scaling --export png,pdf   # rebuild the report
    python studies/batch_scaling.py --dataset cifar10 --model lenet --batch-sizes 128 512 2048 --download \\
        --trials-per-cell 24 --workers 4 --gpus-per-worker 1 --storage s3://bucket/gradalign   # on a cluster's head

The method of Shallue et al. (2018) and Google's tuning playbook:
- scientific: global batch size B (the parallelism) x algorithm. Small-batch SGD at batch b is the reference;
  large-batch SGD and GradAlign at B split B into B/b micro-batches (GradAlign's clients) of that same b, so
  GradAlign emulates the reference's implicit regularisation at any parallelism;
- nuisance, re-tuned in every cell with Ray Tune + Optuna on the validation split: step size and β (momentum
  fixed at 0.9 by default, or searched with --momentum-range; a 10% linear warmup and a cosine decay, as
  large-batch training needs): a Sobol design searched by successive halving (ASHA), ranges extended when the best
  value sits at a bound, and the best few configurations re-run on more seeds, so that a step size at the edge of
  stability, which collapses on other seeds, does not win (gradalign.tuning; docs/tuning.md measures it against a
  dense grid);
- fixed: dataset, model, the micro-batch b, and the budget: the same number of training examples for every cell
  (--epochs x training-set size, rounded up to a multiple of every batch size), or the same number of steps
  (--budget-steps);
- the chosen configuration of each cell is re-run with seeds disjoint from the tuning seeds; the test metrics of
  those runs are the result (mean, CI, n), seeds added in rounds while a comparison is undetermined (--seeds auto);
  steps to the target are read off the validation accuracy on a log-spaced evaluation schedule.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from gradalign.config import ALGORITHMS, ALIGNING_ALGORITHMS, ConfigError
from gradalign.findings import Evidence, build_report
from gradalign.protocol import Budget, Comparisons, StudyProtocol
from gradalign.ranges import Range
from gradalign.report import noise_by_algorithm
from gradalign.verdict import protocol_sentence, scaling_facts, scaling_sentences, step_size_caveat
from studies.study_cli import DataLocation, StudyCommand, split_sizes, study_parser, tuning_settings

KIND = "batch-scaling"
SMOKE = dict(
    dataset="digits",
    model="mlp",
    batch_sizes=[32, 128],
    epochs=3,
    tuning_seeds=1,
    seeds=2,
    target=0.5,
    eval_points=10,
    trials_per_cell=3,
    confirm_top=2,
    confirm_seeds=1,
    max_extensions=1,
)


def build_parser() -> argparse.ArgumentParser:
    p, groups = study_parser(
        __doc__,
        default_name=KIND,
        smoke=SMOKE,
        dataset="mnist1d",
        model="cnn",
        epochs=20,
        target=0.6,
        lr_range=(0.001, 0.5),
        beta_range=(1e-4, 1.0),
    )
    g = groups["axes"]
    g.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[128, 256, 512],
        help="global batch sizes B to compare (the degree of parallelism; default 128 256 512: from where the "
        "reference is matched to where every algorithm falls far behind, within 10 minutes on 2 cores)",
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
        help="training processes per trial (1 = in the trial's process; >1 = Ray Train workers); several "
        "values make the number of workers a scientific axis too",
    )
    g = groups["fixed"]
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
    return p


def make_protocol(args: argparse.Namespace, data: DataLocation) -> StudyProtocol:
    """The study, from the options: scientific axes, nuisance ranges, fixed parameters and the budget."""
    if not args.algorithms:
        raise ConfigError("algorithms", args.algorithms, "name at least one algorithm")
    if args.micro_batch < 1:
        raise ConfigError("micro_batch", args.micro_batch, "must be a positive integer")
    for b in args.batch_sizes:
        if b < args.micro_batch:
            raise ConfigError(
                "batch_sizes",
                b,
                f"is smaller than the micro-batch b={args.micro_batch} (each of the "
                "B/b clients needs at least b examples)",
            )
        if b % args.micro_batch:
            raise ConfigError("batch_sizes", b, f"is not a multiple of the micro-batch b={args.micro_batch}")
    if any(w < 1 for w in args.workers):
        raise ConfigError("workers", args.workers, "every value must be >= 1")
    sizes = split_sizes(args.dataset, data, args.num_samples, args.val_fraction)
    ranges = {}
    for algorithm in args.algorithms:
        ranges[algorithm] = {"lr": Range(*args.lr_range, log=True)}
        if algorithm in ALIGNING_ALGORITHMS:
            ranges[algorithm]["beta"] = Range(*args.beta_range, log=True)
        if args.momentum_range:
            ranges[algorithm]["momentum"] = Range(*args.momentum_range)
    fixed = {
        "lr_schedule": args.lr_schedule,
        "warmup": args.warmup,
        **({} if args.momentum_range else {"momentum": args.momentum}),
    }
    budget = budget_of(args, sizes["train"])
    return StudyProtocol(
        kind=KIND,
        name=args.name,
        dataset=args.dataset,
        model=args.model,
        num_samples=args.num_samples,
        budget=budget,
        split_sizes=sizes,
        axes={
            "batch_sizes": list(args.batch_sizes),
            "algorithms": list(args.algorithms),
            "micro_batch": args.micro_batch,
            "workers": list(args.workers),
        },
        fixed=fixed,
        ranges=ranges,
        compare=Comparisons(
            x="batch_size",
            pairs=tuple(p for p in (("gradalign", "large_batch_sgd"),) if set(p) <= set(args.algorithms)),
            reference="sgd" if "sgd" in args.algorithms and len(args.algorithms) > 1 else None,
            within="workers" if len(args.workers) > 1 else None,
        ),
        **tuning_settings(args, budget),
        target=args.target,
        tolerance=args.tolerance,
        val_fraction=args.val_fraction,
        eval_points=args.eval_points,
        notes={
            "micro-batch b": str(args.micro_batch),
            "counted in": "examples seen and steps (parameter updates; small-batch SGD: one per micro-batch)",
        },
    )


def budget_of(args: argparse.Namespace, n_train: int) -> Budget:
    """The budget every cell gets: the same number of examples (default), or of steps (--budget-steps)."""
    if not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise ConfigError("epochs", args.epochs, "must be a positive finite number")
    batches = [args.micro_batch, *args.batch_sizes] if "sgd" in args.algorithms else list(args.batch_sizes)
    if args.budget_steps is not None:
        if args.budget_steps < 1:
            raise ConfigError("budget_steps", args.budget_steps, "must be a positive integer")
        return Budget(
            "steps",
            args.budget_steps,
            args.budget_steps * max(batches) / n_train,
            f"{args.budget_steps} steps per run (B x {args.budget_steps} examples at batch size B; "
            f"training split: {n_train} examples)",
        )
    unit = math.lcm(*batches)
    examples = unit * math.ceil(args.epochs * n_train / unit)
    return Budget(
        "examples",
        examples,
        examples / n_train,
        f"{examples} training examples per run in every cell ({examples / n_train:.3g} epochs of the "
        f"{n_train}-example training split; {examples // max(batches)} steps at B={max(batches)}, "
        f"{examples // min(batches)} at b={min(batches)})",
    )


def plan_cells(protocol: StudyProtocol, data: DataLocation) -> list:
    """Small-batch SGD at b (the reference), then every other algorithm at every B, per number of workers."""
    from gradalign.ray_adapter import Cell, SearchSpace

    axes, budget = protocol.axes, protocol.budget
    fixed = dict(
        dataset=protocol.dataset,
        model=protocol.model,
        num_samples=protocol.num_samples,
        budget_examples=budget.amount if budget.unit == "examples" else None,
        budget_steps=budget.amount if budget.unit == "steps" else None,
        val_fraction=protocol.val_fraction,
        eval_points=protocol.eval_points,
        data_dir=data.data_dir,
        download=data.download,
        seed=protocol.tuning_seeds[0],
        **protocol.fixed,
    )
    b = axes["micro_batch"]
    settings = [("sgd", b, 1)] if "sgd" in axes["algorithms"] else []  # the reference: plain SGD at batch b
    settings += [(a, batch, batch // b) for a in axes["algorithms"] if a != "sgd" for batch in axes["batch_sizes"]]
    cells = []
    for workers in axes["workers"]:
        suffix = f"-w{workers}" if len(axes["workers"]) > 1 else ""
        for algorithm, batch, clients in settings:
            space = SearchSpace(
                fixed={**fixed, "algorithm": algorithm, "batch_size": batch, "clients": clients},
                **_searched(protocol.ranges[algorithm]),
            )
            coords = dict(algorithm=algorithm, batch_size=batch, workers=workers)
            cells.append(Cell(f"{algorithm}-B{batch}{suffix}", coords, space, workers))
    return cells


def _searched(ranges) -> dict:
    """SearchSpace keyword arguments: every searchable parameter unset (lr too), then the protocol's ranges."""
    return {"lr": None, **ranges}


def verdict(protocol: StudyProtocol, out: Path | str = "OUT"):
    """The report's opening sentences: the protocol, each algorithm against the small-batch reference at every B,
    B_crit with its interval, GradAlign against large-batch SGD at every B, and, when those differences compare
    cells tuned to different step sizes, how to check them at a common one."""

    def sentences(evidence: Evidence) -> list[str]:
        critical = evidence.critical or {}
        facts = scaling_facts(
            evidence.cells,
            evidence.records,
            critical.get("fits", {}),
            noise_by_algorithm(evidence.history),
            reference=protocol.compare.reference or "sgd",
            tolerance=protocol.tolerance,
            ratios=critical.get("ratios", ()),
        )
        ref = facts["reference"]
        first = protocol_sentence(
            protocol.trials_per_cell,
            len(protocol.seeds),
            protocol.budget.sentence(),
            protocol.test_size,
            ref["acc"] if ref else None,
            len(protocol.tuning_seeds),
            design=protocol.design,
            tuning=protocol.tuning_sentence(),
        )
        caveat = step_size_caveat(evidence.records, evidence.cells, str(out))
        return [first, *scaling_sentences(facts, target=protocol.target), *([caveat] if caveat else [])]

    return sentences


def write_report(protocol: StudyProtocol, command: StudyCommand) -> Path:
    started = time.perf_counter()
    path = build_report(
        command.out,
        command.history(),
        protocol,
        x="batch_size",
        title="GradAlign batch-scaling study",
        command=command.text,
        verdict=verdict(protocol, command.args.out),
        export=command.args.export,
    )
    command.finish_report(path, started)
    return path


def main(argv: list[str] | None = None) -> int:
    command = StudyCommand(build_parser(), argv, KIND)
    with command.refusals():
        args = command.args
        protocol = command.recorded() if args.report_only else make_protocol(args, command.data)
        if not args.report_only:
            command.run(protocol, plan_cells(protocol, command.data))
        write_report(protocol, command)
    return command.code


if __name__ == "__main__":
    sys.exit(main())
