"""Federated learning under heterogeneous clients: FedAvg, FedProx, SCAFFOLD and FedGA, tuned per cell.

    python studies/federated.py                   # MNIST-1D, three label-skew levels (about 10 min, 2 cores)
    python studies/federated.py --smoke-test      # the whole pipeline on digits in about a minute
    python studies/federated.py --preset paper    # the paper's setting, scaled down: one class per client
    python studies/federated.py --report-only --out results/federated

- scientific: data heterogeneity (Hsu et al.'s Dirichlet label mix at equal client sizes, or one class per
  client), the fraction of clients
  per round (participation) and the local steps K; algorithms FedAvg, FedProx, SCAFFOLD, FedGA, with GradAlign
  (K = 1, all clients) and large-batch SGD as references;
- nuisance, re-tuned in every cell with Ray Tune + Optuna on the validation split: client step size, β (FedGA,
  GradAlign), μ (FedProx), optionally the server step size;
- budget: communications (all-reduces), the same for every algorithm: --communications C gives FedAvg, FedProx and
  SCAFFOLD C rounds and FedGA and GradAlign, which communicate twice per round, C/2 rounds. The report shows rounds,
  communications and the numbers sent (SCAFFOLD sends 2P per client and round);
- the best configuration of each cell is re-run with seeds disjoint from the tuning seeds; their test accuracy is
  the result (mean, 95% CI, n);
- clients are data, not processes: each trial (or Ray Train worker) simulates its share of the clients.
The heterogeneity axis of the figures is measured on every run's own client split, not nominal: the mean
total-variation distance between each client's label distribution and the global one (0 = iid, near 1 = disjoint
labels), mean over the seeds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pandas as pd

from gradalign import figures as F
from gradalign.algorithms import communications_per_update
from gradalign.config import ALIGNING_ALGORITHMS, FEDERATED_ALGORITHMS, ConfigError, TrainConfig
from gradalign.findings import Evidence, build_report
from gradalign.protocol import Budget, Comparisons, StudyProtocol
from gradalign.ranges import Range
from gradalign.verdict import federated_facts, federated_sentences, protocol_sentence
from studies.study_cli import DataLocation, StudyCommand, range_arg, split_sizes, study_parser, tuning_settings

KIND = "federated"
SMOKE = dict(
    dataset="digits",
    splits=["dirichlet:0.1"],
    communications=8,
    eval_points=8,
    seeds=2,
    target=0.5,
    algorithms=["fedavg", "fedga"],
    references=["gradalign"],
    trials_per_cell=3,
    confirm_top=2,
    confirm_seeds=1,
    max_extensions=1,
)
PAPER = dict(
    splits=["one_class"],
    clients=10,
    participation=[0.5],
    local_steps=[5],
    communications=200,
    algorithms=["fedavg", "scaffold", "fedga"],
    references=[],
    seeds=5,
    trials_per_cell=8,
)
REFERENCES = ("gradalign", "large_batch_sgd")


def build_parser() -> argparse.ArgumentParser:
    p, groups = study_parser(
        __doc__,
        default_name=KIND,
        smoke=SMOKE,
        dataset="mnist1d",
        model="mlp",
        epochs=None,
        target=0.8,
        lr_range=(0.01, 1.0),
        beta_range=(1e-5, 1.0),
    )
    g = groups["axes"]
    g.add_argument(
        "--splits",
        nargs="+",
        default=["dirichlet:10", "dirichlet:0.3", "one_class"],
        help="client data splits: 'dirichlet:ALPHA' (each client's label mix ~ Dir(ALPHA x global mix), "
        "equal client sizes; smaller alpha = more heterogeneous), 'one_class', 'iid'",
    )
    g.add_argument("--participation", type=float, nargs="+", default=[0.5], help="fractions of clients per round")
    g.add_argument("--local-steps", type=int, nargs="+", default=[5], help="K: local steps per round")
    g.add_argument(
        "--algorithms",
        nargs="+",
        default=list(FEDERATED_ALGORITHMS),
        choices=FEDERATED_ALGORITHMS,
        metavar="ALG",
        help=f"federated algorithms ({', '.join(FEDERATED_ALGORITHMS)})",
    )
    g.add_argument(
        "--references",
        nargs="*",
        default=list(REFERENCES),
        choices=REFERENCES,
        metavar="ALG",
        help="data-parallel references over all clients, one step per round (gradalign, large_batch_sgd)",
    )
    g = groups["fixed"]
    g.add_argument("--clients", type=int, default=10, help="number of clients (default 10)")
    g.add_argument("--client-batch", type=int, default=16, help="examples per client per local step (default 16)")
    g.add_argument(
        "--communications",
        type=int,
        default=80,
        help="budget: all-reduces per run, the same for every algorithm (FedAvg: one per round, FedGA and "
        "GradAlign: two), so a multiple of 2 (default 80)",
    )
    g.add_argument(
        "--preset",
        choices=("paper",),
        help="'paper': one class per client, 10 clients, half of them "
        "per round, K=5, FedAvg vs SCAFFOLD vs FedGA with 5 seeds, 200 communications (the paper's "
        "setting, scaled down); options you give explicitly keep your values",
    )
    g = groups["nuisance"]
    g.add_argument(
        "--mu-range",
        type=range_arg,
        default=(1e-3, 1.0),
        metavar="LOW,HIGH",
        help="μ of FedProx, log-uniform (default 0.001,1)",
    )
    g.add_argument(
        "--server-lr-range",
        type=range_arg,
        default=None,
        metavar="LOW,HIGH",
        help="server step size, log-uniform (default none: fixed at 1)",
    )
    return p


def parse_split(text: str) -> tuple[str, float]:
    """'dirichlet:0.1' -> ('dirichlet', 0.1); 'one_class' / 'iid' -> (name, nan)."""
    name, _, value = text.partition(":")
    if name == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            raise ConfigError(
                "splits", text, "write a Dirichlet split as dirichlet:ALPHA, e.g. dirichlet:0.1"
            ) from None
        if not alpha > 0 or math.isinf(alpha):
            raise ConfigError("splits", text, "Dirichlet alpha must be > 0 and finite")
        return name, alpha
    if name in ("one_class", "iid") and not value:
        return name, math.nan
    raise ConfigError("splits", text, "each split is dirichlet:ALPHA, one_class or iid")


def make_protocol(args: argparse.Namespace, data: DataLocation) -> StudyProtocol:
    """The study, from the options: scientific axes, nuisance ranges, fixed parameters and the budget."""
    splits = [parse_split(text) for text in args.splits]
    if not args.algorithms and not args.references:
        raise ConfigError("algorithms", args.algorithms, "name at least one algorithm")
    for name in ("clients", "client_batch"):
        if getattr(args, name) < 1:
            raise ConfigError(name, getattr(args, name), "must be >= 1")
    for p in args.participation:
        if not 0 < p <= 1:
            raise ConfigError("participation", p, "must lie in (0, 1]")
    for k in args.local_steps:
        if k < 1:
            raise ConfigError("local_steps", k, "K (local steps) must be >= 1")
    if args.communications < 2 or args.communications % 2:
        raise ConfigError(
            "communications",
            args.communications,
            "must be a positive even number (FedGA and GradAlign communicate twice per round)",
        )
    sizes = split_sizes(args.dataset, data, args.num_samples, args.val_fraction, clients=args.clients)
    check_client_splits(args, data, splits)
    algorithms = [*args.algorithms, *args.references]
    ranges = {}
    for algorithm in algorithms:
        ranges[algorithm] = {"lr": Range(*args.lr_range, log=True)}
        if algorithm in ALIGNING_ALGORITHMS:
            ranges[algorithm]["beta"] = Range(*args.beta_range, log=True)
        if algorithm == "fedprox":
            ranges[algorithm]["mu"] = Range(*args.mu_range, log=True)
        if args.server_lr_range and algorithm in FEDERATED_ALGORITHMS:
            ranges[algorithm]["server_lr"] = Range(*args.server_lr_range, log=True)
        if args.momentum_range:
            ranges[algorithm]["momentum"] = Range(*args.momentum_range)
    c = args.communications
    epochs = c * args.clients * args.client_batch * max(args.local_steps) / sizes["train"]
    budget = Budget(
        "communications",
        c,
        epochs,
        f"{c} communications (all-reduces) per run: FedAvg, FedProx, SCAFFOLD and large-batch SGD {c} "
        f"rounds, FedGA and GradAlign {c // 2}",
    )
    return StudyProtocol(
        kind=KIND,
        name=args.name,
        dataset=args.dataset,
        model=args.model,
        num_samples=args.num_samples,
        budget=budget,
        split_sizes=sizes,
        axes={
            "splits": list(args.splits),
            "participation": list(args.participation),
            "local_steps": list(args.local_steps),
            "algorithms": list(args.algorithms),
            "references": list(args.references),
        },
        compare=Comparisons(
            x="setting",
            pairs=tuple(("fedga", b) for b in ("fedavg", "scaffold", "fedprox") if {"fedga", b} <= set(algorithms)),
            within="split",
            cost="communications_to_target",
        ),
        fixed={
            "clients": args.clients,
            "batch_size": args.clients * args.client_batch,
            **({} if args.momentum_range else {"momentum": args.momentum}),
        },
        ranges=ranges,
        **tuning_settings(args, budget),
        target=args.target,
        tolerance=args.tolerance,
        val_fraction=args.val_fraction,
        eval_points=args.eval_points,
        notes={
            "clients": str(args.clients),
            "examples per client per local step": str(args.client_batch),
            "counted in": "communications, messages (one per participating client and communication) and values "
            "sent; rounds shown too",
        },
    )


def check_client_splits(args: argparse.Namespace, data: DataLocation, splits) -> None:
    """Split the training set over the clients as every run will (seed 0): an impossible split (more clients than
    examples, an empty client) is refused now, not in every trial after Ray started."""
    from gradalign.data import clear_cache, load_dataset
    from gradalign.partition import partition
    from gradalign.splits import with_validation

    loaded = load_dataset(
        args.dataset,
        data_dir=data.data_dir,
        download=data.download,
        num_clients=args.clients,
        num_samples=args.num_samples,
    )
    labels = with_validation(loaded, args.val_fraction, 0).y_train
    clear_cache()
    if args.clients > len(labels):
        raise ConfigError("clients", args.clients, f"more clients than the {len(labels)} training examples")
    for (scheme, alpha), text in zip(splits, args.splits):
        try:
            parts = partition(labels, args.clients, scheme, alpha=alpha if scheme == "dirichlet" else 0.5, seed=0)
        except ValueError as err:
            raise ConfigError(
                "clients",
                args.clients,
                f"the split {text!r} of the {len(labels)} training examples "
                f"over {args.clients} clients is impossible: {err}",
            ) from None
        smallest = min(len(part) for part in parts)
        if smallest < 1:
            raise ConfigError("clients", args.clients, f"the split {text!r} leaves a client without examples")


def plan_cells(protocol: StudyProtocol, data: DataLocation) -> list:
    """Every split x (federated algorithm x participation x K, then the references at full participation, K = 1)."""
    from gradalign.ray_adapter import Cell, SearchSpace

    axes = protocol.axes
    base = dict(
        dataset=protocol.dataset,
        model=protocol.model,
        num_samples=protocol.num_samples,
        seed=protocol.tuning_seeds[0],
        download=data.download,
        val_fraction=protocol.val_fraction,
        eval_points=protocol.eval_points,
        data_dir=data.data_dir,
        **protocol.fixed,
    )
    cells = []
    for text in axes["splits"]:
        scheme, alpha = parse_split(text)
        split = dict(partition=scheme, **({"alpha": alpha} if scheme == "dirichlet" else {}))
        settings = [(a, p, k) for a in axes["algorithms"] for p in axes["participation"] for k in axes["local_steps"]]
        settings += [(a, 1.0, 1) for a in axes["references"]]
        for algorithm, p, k in settings:
            fixed = {**base, **split, "algorithm": algorithm}
            if algorithm in FEDERATED_ALGORITHMS:
                fixed.update(participation=p, local_steps=k)
            fixed["budget_steps"] = protocol.budget.amount // communications_per_update(TrainConfig.from_dict(fixed))
            space = SearchSpace(fixed=fixed, **{"lr": None, **protocol.ranges[algorithm]})
            federated = algorithm in FEDERATED_ALGORITHMS
            key = f"{algorithm}-{text.replace(':', '')}" + (f"-p{p:g}-K{k}" if federated else "")
            setting = f"{text}, p={p:g}, K={k}" if federated else f"{text}, reference"
            coords = dict(split=text, alpha=alpha, algorithm=algorithm, participation=p, local_steps=k, setting=setting)
            cells.append(Cell(key, coords, space))
    return cells


def federated_figures(history: pd.DataFrame, cells: pd.DataFrame) -> list:
    return [
        (
            "fig-accuracy",
            "Final test accuracy vs the label heterogeneity measured on the seeds' own client splits "
            "(mean ± std over seeds).",
            F.accuracy_vs_x(cells, x="label_tv_mean", log_x=False),
        ),
        (
            "fig-communications",
            "Validation accuracy over communications (mean over seeds), per client split.",
            F.alignment_over_training(
                history,
                x="communications",
                metrics=("val_accuracy",),
                color="split",
                title="Validation accuracy vs communications",
            ),
        ),
        (
            "fig-alignment",
            "Client drift: V = mean_i ||g_i - g||^2 and the mean pairwise cosine of client gradients.",
            F.alignment_over_training(
                history, x="communications", color="split", title="Alignment of client gradients over communications"
            ),
        ),
        (
            "fig-pareto-communication",
            "Cells not dominated in (communications to the validation target, test accuracy).",
            F.pareto_figure(
                cells,
                x="communications_to_target_mean",
                y="acc_mean",
                maximize_x=False,
                title="Pareto frontier: accuracy vs communications to target",
            ),
        ),
        (
            "fig-hyperparameters",
            "The client lr, β and μ chosen in each cell.",
            F.hyperparameters_vs_x(cells, x="label_tv_mean", params=("lr", "beta", "mu", "server_lr")),
        ),
    ]


def verdict(protocol: StudyProtocol):
    """The report's opening sentences: the protocol, then per setting the highest mean and FedGA's comparisons."""

    def sentences(evidence: Evidence) -> list[str]:
        first = protocol_sentence(
            protocol.trials_per_cell,
            len(protocol.seeds),
            protocol.budget.sentence(),
            protocol.test_size,
            evidence.cells["acc_mean"].mean(),
            len(protocol.tuning_seeds),
            design=protocol.design,
            tuning=protocol.tuning_sentence(),
        )
        facts = federated_facts(evidence.cells, evidence.records, tolerance=protocol.tolerance)
        return [first, *federated_sentences(facts)]

    return sentences


def write_report(protocol: StudyProtocol, command: StudyCommand) -> Path:
    started = time.perf_counter()
    path = build_report(
        command.out,
        command.history(),
        protocol,
        x="split",
        extra_axes=("setting", "participation", "local_steps"),
        title="GradAlign federated study: heterogeneity and participation",
        command=command.text,
        figures=federated_figures,
        export=command.args.export,
        verdict=verdict(protocol),
    )
    command.finish_report(path, started)
    return path


def main(argv: list[str] | None = None) -> int:
    command = StudyCommand(build_parser(), argv, KIND, presets={"paper": PAPER})
    with command.refusals():
        args = command.args
        protocol = command.recorded() if args.report_only else make_protocol(args, command.data)
        if not args.report_only:
            command.run(protocol, plan_cells(protocol, command.data))
        write_report(protocol, command)
    return command.code


if __name__ == "__main__":
    sys.exit(main())
