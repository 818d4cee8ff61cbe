"""Federated learning under heterogeneous clients: FedAvg, FedProx, SCAFFOLD and FedGA, tuned per cell.

    python studies/federated.py                   # MNIST-1D, three label-skew levels (about 10 min, 2 cores)
    python studies/federated.py --smoke-test      # the whole pipeline on digits in about 2 minutes
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
from pathlib import Path

import pandas as pd

from gradalign import figures as F
from gradalign.algorithms import communications_per_update
from gradalign.config import DATASETS, FEDERATED_ALGORITHMS, MODELS, ConfigError, TrainConfig
from gradalign.ray_adapter import Range, SearchSpace
from gradalign.verdict import federated_facts, federated_sentences, protocol_sentence
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
    splits=["dirichlet:0.1"],
    communications=8,
    eval_points=8,
    trials_per_cell=2,
    seeds=2,
    target=0.5,
    algorithms=["fedavg", "fedga"],
    references=["gradalign"],
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("scientific axes")
    g.add_argument(
        "--splits",
        nargs="+",
        default=["dirichlet:10", "dirichlet:0.3", "one_class"],
        help="client data splits: 'dirichlet:ALPHA' (each client's label mix ~ Dir(ALPHA x global mix), equal "
        "client sizes; smaller alpha = more heterogeneous), 'one_class', 'iid'",
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
    g = p.add_argument_group("fixed parameters and budget")
    g.add_argument("--dataset", default="mnist1d", choices=DATASETS, help="default mnist1d (generated offline)")
    g.add_argument("--model", default="mlp", choices=MODELS, help="default mlp (the MNIST-1D paper's MLP)")
    g.add_argument("--clients", type=int, default=10, help="number of clients")
    g.add_argument("--client-batch", type=int, default=16, help="examples per client per local step")
    g.add_argument(
        "--communications",
        type=int,
        default=80,
        help="budget: all-reduces per run, the same for every algorithm (FedAvg: one per round, FedGA and "
        "GradAlign: two), so a multiple of 2",
    )
    g.add_argument(
        "--target", type=float, default=0.8, help="target validation accuracy for communications-to-target, in (0, 1]"
    )
    g.add_argument(
        "--preset",
        choices=("paper",),
        help="'paper': one class per client, 10 clients, half of them "
        "per round, K=5, FedAvg vs SCAFFOLD vs FedGA with 5 seeds, 200 communications (the paper's "
        "setting, scaled down); options you give explicitly keep your values",
    )
    g = p.add_argument_group("nuisance parameters, re-tuned in every cell")
    g.add_argument("--lr-range", type=range_arg, default=(0.01, 1.0), metavar="LOW,HIGH", help="client step size (log)")
    g.add_argument("--beta-range", type=range_arg, default=(1e-5, 1.0), metavar="LOW,HIGH", help="β of FedGA (log)")
    g.add_argument("--mu-range", type=range_arg, default=(1e-3, 1.0), metavar="LOW,HIGH", help="μ of FedProx (log)")
    g.add_argument(
        "--server-lr-range",
        type=range_arg,
        default=None,
        metavar="LOW,HIGH",
        help="server step size (log); default 'none': fixed at 1",
    )
    add_common_arguments(p, default_name="federated", smoke=SMOKE)
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
            raise ConfigError("alpha", alpha, "Dirichlet alpha must be > 0 and finite")
        return name, alpha
    if name in ("one_class", "iid") and not value:
        return name, math.nan
    raise ConfigError("splits", text, "each split is dirichlet:ALPHA, one_class or iid")


def validate(args: argparse.Namespace) -> None:
    for text in args.splits:
        parse_split(text)
    if not args.algorithms and not args.references:
        raise ConfigError("algorithms", args.algorithms, "name at least one algorithm")
    if args.clients < 1:
        raise ConfigError("clients", args.clients, "must be >= 1")
    for p in args.participation:
        if not 0 < p <= 1:
            raise ConfigError("participation", p, "must lie in (0, 1]")
        if round(p * args.clients) > args.clients:
            raise ConfigError("participation", p, f"asks for more clients per round than the {args.clients} clients")
    for k in args.local_steps:
        if k < 1:
            raise ConfigError("local_steps", k, "K (local steps) must be >= 1")
    if args.communications < 2 or args.communications % 2:
        raise ConfigError(
            "communications",
            args.communications,
            "must be a positive even number (FedGA and GradAlign communicate twice per round)",
        )
    if not 0 < args.target <= 1:
        raise ConfigError("target", args.target, "target accuracy must lie in (0, 1]")
    n_train = split_sizes(args, clients=args.clients)["train"]
    args.budget_epochs = args.communications * args.clients * args.client_batch * max(args.local_steps) / n_train


def plan_cells(args: argparse.Namespace) -> tuple[Cell, ...]:
    base = dict(
        dataset=args.dataset,
        model=args.model,
        num_samples=args.num_samples,
        clients=args.clients,
        seed=0,
        download=args.download,
        batch_size=args.clients * args.client_batch,
        val_fraction=args.val_fraction,
        eval_points=args.eval_points,
        data_dir=str(Path(args.data_dir).resolve()),
    )
    lr = Range(*args.lr_range, log=True)
    cells = []
    for text in args.splits:
        scheme, alpha = parse_split(text)
        split = dict(partition=scheme, **({"alpha": alpha} if scheme == "dirichlet" else {}))
        coords = dict(split=text, alpha=alpha)
        settings = [(a, p, k) for a in args.algorithms for p in args.participation for k in args.local_steps]
        settings += [(a, 1.0, 1) for a in args.references]
        for algorithm, p, k in settings:
            fixed = {**base, **split, "algorithm": algorithm}
            if algorithm in FEDERATED_ALGORITHMS:
                fixed.update(participation=p, local_steps=k)
            per_round = communications_per_update(TrainConfig.from_dict(fixed))
            fixed["budget_steps"] = args.communications // per_round
            space = SearchSpace(
                fixed=fixed,
                lr=lr,
                beta=Range(*args.beta_range, log=True) if algorithm in ("fedga", "gradalign") else None,
                mu=Range(*args.mu_range, log=True) if algorithm == "fedprox" else None,
                **(
                    {"server_lr": Range(*args.server_lr_range, log=True)}
                    if args.server_lr_range and algorithm in FEDERATED_ALGORITHMS
                    else {}
                ),
            )
            key = f"{algorithm}-{text.replace(':', '')}" + (
                f"-p{p:g}-K{k}" if algorithm in FEDERATED_ALGORITHMS else ""
            )
            cells.append(
                Cell(
                    key,
                    {
                        **coords,
                        "algorithm": algorithm,
                        "participation": p,
                        "local_steps": k,
                        "setting": f"{text}, p={p:g}, K={k}"
                        if algorithm in FEDERATED_ALGORITHMS
                        else f"{text}, reference",
                    },
                    space,
                )
            )
    return tuple(cells)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_study_args(build_parser(), argv, presets={"paper": PAPER})
    describe = describe_study(
        "federated",
        args,
        f"{args.communications} communications per run of {args.dataset}/{args.model} over {args.clients} clients",
    )
    return run_study_script(args, argv, plan_cells, validate, report, describe)


def verdict(args: argparse.Namespace):
    """The report's opening sentences: protocol, then per setting the best algorithm and FedGA's differences."""

    def sentences(history: pd.DataFrame, cells: pd.DataFrame, sig: pd.DataFrame) -> list[str]:
        budget = (
            f"{args.communications} communications per run ({args.communications} rounds of FedAvg, FedProx and "
            f"SCAFFOLD, {args.communications // 2} of FedGA)"
        )
        test_size = getattr(args, "split_sizes", {}).get("test")
        protocol = protocol_sentence(
            args.trials_per_cell, args.seeds, budget, test_size, cells["acc_mean"].mean(), args.tuning_seeds
        )
        return [protocol, *federated_sentences(federated_facts(cells, sig))]

    return sentences


def report(out: Path, args: argparse.Namespace, command: str, history: pd.DataFrame) -> int:
    save_table(history, out / "history")
    ranges = {}  # per algorithm: only what was searched for it
    for algorithm in set(history["algorithm"]):
        ranges[algorithm] = {"lr": tuple(args.lr_range)}
        if algorithm in ("fedga", "gradalign"):
            ranges[algorithm]["beta"] = tuple(args.beta_range)
        if algorithm == "fedprox":
            ranges[algorithm]["mu"] = tuple(args.mu_range)
        if args.server_lr_range and algorithm in FEDERATED_ALGORITHMS:
            ranges[algorithm]["server_lr"] = tuple(args.server_lr_range)
    budget = {
        "budget": f"{args.communications} communications (all-reduces) per run: FedAvg, FedProx, SCAFFOLD and "
        f"large-batch SGD {args.communications} rounds, FedGA and GradAlign {args.communications // 2}",
        "counted in": "communications, messages (one per participating client and communication) and values "
        "sent; rounds shown too",
        "clients": args.clients,
        "examples per client per local step": args.client_batch,
        "tuning": f"{args.trials_per_cell} trials per cell, scored by validation accuracy at the end of the "
        f"budget" + (f" (mean of {args.tuning_seeds} seeds)" if args.tuning_seeds > 1 else ""),
        "final runs": f"{args.seeds} seeds per cell's best configuration, disjoint from the tuning seeds; "
        "their test accuracy is reported",
        "validation split": f"{args.val_fraction:g} of the training data (stratified, the same for every seed)",
        "target": f"validation accuracy {args.target} (communications to it interpolated between evaluations)",
    }
    path = build_report(
        out,
        history,
        target=args.target,
        x="split",
        by="setting",
        cost="communications_to_target",
        extra_axes=("setting", "participation", "local_steps"),
        title="GradAlign federated study: heterogeneity and participation",
        command=command,
        budget=budget,
        search_ranges=ranges,
        reference=None,
        comparisons=(("fedga", "fedavg"), ("fedga", "scaffold"), ("fedga", "fedprox")),
        figures=federated_figures,
        export=args.export,
        verdict=verdict(args),
    )
    print_outcome(out, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
