"""The command line every study script shares: one option dialect, presets, the checks before launch, and the run.

A study script builds its parser with `study_parser` (the shared options, in the same groups with the same names,
forms and help text everywhere: a range is `--NAME-range LOW,HIGH`, a value `--NAME VALUE`), adds its scientific
axes, and then reads top to bottom::

    command = StudyCommand(build_parser(), argv, kind="batch-scaling")
    with command.refusals():                      # bad input: 'error: --option value: why', exit code 2
        protocol = command.recorded() if command.args.report_only else make_protocol(command.args)
        if not command.args.report_only:
            command.run(protocol, plan_cells(protocol, command.data))
        write_report(protocol, command)
    return command.code

Everything that can be checked is checked before Ray starts: the options (named as the user typed them), the
dataset, the output and storage folders, a study already in the folder (same kind, same protocol), and the amount
of work (far beyond the default study asks for `--yes`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gradalign.config import DATASETS, MODELS, ConfigError
from gradalign.data import DatasetCorruptError, DatasetNotFoundError
from gradalign.export import FORMATS, ExportUnavailable, find_browser, parse_formats
from gradalign.protocol import SEED_BASE, StudyProtocol
from gradalign.study_file import read_study_file
from gradalign.tables import DamagedTable, NothingToReport, load_history

DEFAULT_STUDY_EXAMPLES = 1.7e7
"""Training examples of the default batch-scaling study at most (7 cells x (20 + 3 x 2 tuning + 8 seed runs) x 20
epochs of 3,601 examples; ASHA stops most tuning trials at a quarter of that)."""
WORK_LIMIT_EXAMPLES = 3e8
"""Training examples a study may process in all before it asks for --yes (about 18 default studies)."""

RUN_ONLY = {
    "address",
    "local",
    "num_cpus",
    "cpus_per_worker",
    "gpus_per_worker",
    "max_concurrent",
    "max_failures",
    "storage",
    "data_dir",
    "download",
    "yes",
    "extend_seeds",
}
"""Options about where and how a study runs, not what it measures (they do nothing with --report-only)."""
REPORT_ONLY_OK = {"report_only", "out", "name", "export", "smoke_test", "preset"} | RUN_ONLY
"""Options --report-only accepts: where the study is and what to write; the science comes from its record."""


class Refused(ValueError):
    """Bad input that is not one option's value (e.g. options that --report-only cannot honour)."""


# -- option types -------------------------------------------------------------------------------------------------
def range_arg(text: str) -> tuple[float, float] | None:
    """'LOW,HIGH' -> (low, high); 'none' -> None. Emptiness (low >= high) is refused by the protocol."""
    if text.strip().lower() == "none":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0.01,1.0) or 'none', got {text!r}") from None
    return low, high


def export_arg(text: str) -> tuple[str, ...]:
    """'png,svg,pdf' (any subset) -> ('png', 'svg', 'pdf'); an unknown format is refused, naming the valid ones."""
    try:
        return parse_formats(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def rewrite_deprecated(argv: list[str], table: Mapping[str, tuple[str, int]]) -> list[str]:
    """The previous release's spellings in the current dialect, each with a note on stderr: `table` maps OLD to (NEW,
    number of values): 2 values 'LO HI' become 'LO,HI' (only when both are numbers: '--momentum 0.9' is today's
    form), 1 value is kept, 0 (a flag) becomes 'NEW 1'."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        new, count = table.get(token, (None, 0))
        values = argv[i + 1 : i + 1 + count]
        if new is None or len(values) < count or (count == 2 and not all(map(_is_number, values))):
            out.append(token)
            i += 1
            continue
        replaced = [new, ",".join(values)] if count == 2 else [new, *values] if count else [new, "1"]
        print(
            f"note: {token} {' '.join(values)} is deprecated and will be removed in the next release; write "
            f"{' '.join(replaced)}",
            file=sys.stderr,
        )
        out += [f"{replaced[0]}={replaced[1]}"] if count == 2 else replaced
        i += 1 + count
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- the shared options -------------------------------------------------------------------------------------------
def study_parser(
    doc: str,
    *,
    default_name: str,
    smoke: Mapping[str, Any],
    dataset: str = "mnist1d",
    model: str = "cnn",
    epochs: float | None = 20,
    target: float = 0.6,
    lr_range: tuple[float, float] = (0.001, 0.5),
    beta_range: tuple[float, float] | None = (1e-4, 1.0),
    trials_per_cell: int = 20,
    tuning_seeds: int = 1,
    seeds: int | str = "auto",
) -> tuple[argparse.ArgumentParser, dict[str, argparse._ArgumentGroup]]:
    """A study's parser with every shared option; returns it and its groups (the script adds its own options to
    'axes', 'fixed' and 'nuisance'). `epochs=None`: the script states its own budget option."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    groups = {
        "axes": p.add_argument_group("scientific axes"),
        "fixed": p.add_argument_group("fixed parameters and budget"),
        "nuisance": p.add_argument_group("nuisance parameters, re-tuned in every cell (ranges: LOW,HIGH or none)"),
        "tuning": p.add_argument_group(
            "tuning and seeds (tuning reads the validation split; seed runs the test split)"
        ),
        "where": p.add_argument_group("where it runs"),
        "files": p.add_argument_group("files"),
        "modes": p.add_argument_group("modes"),
    }
    g = groups["fixed"]
    g.add_argument("--dataset", default=dataset, choices=DATASETS, help=f"dataset (default {dataset})")
    g.add_argument("--model", default=model, choices=MODELS, help=f"model (default {model})")
    if epochs is not None:
        g.add_argument(
            "--epochs",
            type=float,
            default=epochs,
            help="budget: every run sees EPOCHS x (training-set size) examples, rounded up to a multiple of "
            f"every batch size so that every cell sees exactly the same number (default {epochs:g})",
        )
        g.add_argument(
            "--budget-steps",
            type=int,
            default=None,
            help="budget in steps instead: every run takes this many updates (large batches then see more examples)",
        )
    g.add_argument(
        "--target",
        type=float,
        default=target,
        help=f"target validation accuracy for the cost to the target, in (0, 1] (default {target:g})",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="what 'within' means in the verdict: a test-accuracy difference, finite and >= 0 (default "
        "0.01: one percentage point)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of the training data held out for validation (stratified; the same split for "
        "every seed; default 0.1)",
    )
    g.add_argument(
        "--eval-points",
        type=int,
        default=40,
        help="evaluations per run, log-spaced in steps (resolves the cost to the target early and late)",
    )
    g.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="mnist1d only: examples to generate (default: the canonical 5000 = 4000 train / 1000 test; a "
        "multiple of 10); a larger test set narrows the confidence intervals",
    )
    g = groups["nuisance"]
    g.add_argument(
        "--lr-range",
        type=range_arg,
        default=lr_range,
        metavar="LOW,HIGH",
        help=f"step-size search range, log-uniform (default {lr_range[0]:g},{lr_range[1]:g})",
    )
    if beta_range is not None:
        g.add_argument(
            "--beta-range",
            type=range_arg,
            default=beta_range,
            metavar="LOW,HIGH",
            help=f"GradAlign's / FedGA's β search range, log-uniform (default {beta_range[0]:g},{beta_range[1]:g})",
        )
    g.add_argument(
        "--momentum-range",
        type=range_arg,
        default=None,
        metavar="LOW,HIGH",
        help="momentum search range, uniform in [0, 1) (default none: fixed at --momentum)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="the momentum when it is not searched (default 0.9)")
    g = groups["tuning"]
    g.add_argument(
        "--trials-per-cell",
        type=int,
        default=trials_per_cell,
        help=f"Optuna (TPE) trials per cell (default {trials_per_cell})",
    )
    g.add_argument(
        "--tuning-seeds",
        type=int,
        default=tuning_seeds,
        help="seeds each tuning trial trains side by side, scored by their mean (robust to a configuration "
        f"at the edge of stability; costs that many runs per trial). Tuning seeds are 0, 1, ... (default "
        f"{tuning_seeds})",
    )
    g.add_argument(
        "--seeds",
        type=seeds_arg,
        default=seeds,
        metavar="auto|N",
        help=f"final runs of each cell's chosen configuration (seeds {SEED_BASE}, {SEED_BASE + 1}, ...: disjoint "
        "from the tuning seeds). 'auto': 3 seeds, then more in rounds (5, 8, ... up to --max-seeds) for the cells "
        "whose comparisons are still undetermined, with a sequential design that keeps the 5%% error rate; N: "
        f"exactly N seeds per cell (default {seeds})",
    )
    g.add_argument(
        "--max-seeds",
        type=int,
        default=8,
        help="with --seeds auto: the most seeds a cell gets (default 8); the looks are 3, 5, 8, then the cap",
    )
    g.add_argument(
        "--confirm-top",
        type=int,
        default=3,
        help="the best configurations of each cell re-run on --confirm-seeds more seeds before the choice (0: none; "
        "default 3)",
    )
    g.add_argument(
        "--confirm-seeds",
        type=int,
        default=2,
        help="seeds of each confirmation run, after the tuning seeds (default 2); a candidate whose seeds collapse "
        "does not win",
    )
    g.add_argument(
        "--max-extensions",
        type=int,
        default=2,
        help="times each bound of a search range may move out when the best value sits at it (0: fixed ranges; "
        "default 2)",
    )
    g.add_argument(
        "--asha",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="successive halving (ASHA): each cell's trials come from a Sobol design and all but the best third "
        "stop at each rung (a quarter and three quarters of the budget by default), so a cell tries many "
        "configurations for the price of fewer full runs; --no-asha: every trial runs its whole budget and a "
        "Gaussian process proposes after a short Sobol start (default: on)",
    )
    g.add_argument(
        "--grace-period",
        type=float,
        default=None,
        help="ASHA: epochs' worth of examples before a trial may be stopped (default: a quarter of the budget)",
    )
    g.add_argument("--sampler-seed", type=int, default=0, help="seed of the sampler (cell i uses seed + i)")
    g = groups["where"]
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
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per training process")
    g.add_argument("--gpus-per-worker", type=int, default=0, choices=(0, 1), help="1: one GPU per training process")
    g.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="cap on trials running at once (default: as many as the CPUs allow)",
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="retries per trial, each resuming from its last saved evaluation (default 1)",
    )
    g = groups["files"]
    g.add_argument(
        "--name", default=default_name, help=f"study name; re-running a name resumes it (default {default_name})"
    )
    g.add_argument("--out", default=None, help="output folder (default: results/<name>)")
    g.add_argument(
        "--storage",
        default=os.environ.get("GRADALIGN_STORAGE"),
        help="Ray storage for trial state: an absolute path or URI shared by all nodes (s3://..., NFS); "
        "default: $GRADALIGN_STORAGE, else the output folder",
    )
    g.add_argument("--data-dir", default="data", help="where downloadable datasets live (default data)")
    g.add_argument("--download", action="store_true", help="allow downloading datasets into --data-dir")
    g.add_argument(
        "--export",
        type=export_arg,
        default=(),
        metavar="FORMATS",
        help=f"also write every report figure as <out>/figures/<figure>.<format>, for papers; FORMATS: "
        f"comma-separated, any of {','.join(FORMATS)}. Needs Chrome or Chromium (checked before training; "
        "`make browser`, or set BROWSER_PATH); works with --report-only",
    )
    g = groups["modes"]
    g.add_argument(
        "--smoke-test",
        action="store_true",
        help="the whole pipeline on a tiny budget ("
        + ", ".join(f"{k}={v}" for k, v in smoke.items())
        + "); options you give explicitly keep your values",
    )
    g.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report from the output folder (finished or partial study) without training; the "
        "protocol comes from the folder's study.json, so options that would change it are refused",
    )
    g.add_argument(
        "--extend-seeds",
        action="store_true",
        help="accept a larger --seeds for a study folder started with fewer seeds: only the runs of the "
        "new seeds are trained (any other change of settings is refused)",
    )
    g.add_argument(
        "--yes",
        action="store_true",
        help=f"start a study whose work is far beyond the default's (more than {WORK_LIMIT_EXAMPLES:.0e} "
        "training examples in all) without asking",
    )
    p.set_defaults(_smoke=dict(smoke), _default_name=default_name)
    return p, groups


# -- parsing ------------------------------------------------------------------------------------------------------
_UNSET = object()


class _Unset(list):
    """The marker of an 'append' option (argparse appends to whatever the namespace holds): empty until given."""


_NEGATIVE = re.compile(r"^-[\d.]")


def parse(
    parser: argparse.ArgumentParser, argv: Sequence[str], presets: Mapping[str, Mapping[str, Any]] | None = None
) -> argparse.Namespace:
    """Parse `argv`, then apply `--smoke-test` (or `--preset NAME`, one of `presets`) to every option the user did not
    give explicitly: explicit values always win, and are then checked like any other (`--smoke-test --seeds 0` is
    refused, not replaced). Both at once are refused. Prints which values the preset set. `args._explicit` holds the
    destinations the user gave."""
    argv = _join_negative_ranges(parser, argv)
    args = parser.parse_args(argv)
    # An option given on the command line overwrites a marker put in its place beforehand; defaults do not.
    appended = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    markers = {k: (_Unset() if k in appended else _UNSET) for k in vars(args)}
    marked = parser.parse_args(argv, namespace=argparse.Namespace(**markers))
    explicit = {k for k, v in vars(marked).items() if v is not _UNSET and not (isinstance(v, _Unset) and not v)}
    chosen = []
    if getattr(args, "preset", None):
        chosen.append((f"--preset {args.preset}", (presets or {})[args.preset], f"{args._default_name}-{args.preset}"))
    if args.smoke_test:
        chosen.append(("--smoke-test", args._smoke, f"{args._default_name}-smoke"))
    if len(chosen) > 1:
        parser.error(
            f"{chosen[0][0]} and {chosen[1][0]} set the same options differently; use one of them (and give "
            "any value you want to change explicitly)"
        )
    for label, values, name in chosen:
        applied = {k: v for k, v in values.items() if k not in explicit}
        for key, value in applied.items():
            setattr(args, key, value)
        if "name" not in explicit:
            args.name = name
        kept = [f"--{k.replace('_', '-')}" for k in values if k in explicit]
        if not args.report_only:
            print(
                f"{label}: {', '.join(f'{k}={v}' for k, v in applied.items())}"
                + (f" (your {', '.join(kept)} kept)" if kept else ""),
                flush=True,
            )
    if args.out is None:
        args.out = str(Path("results") / args.name)
    args._explicit = explicit
    return args


def _join_negative_ranges(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`--beta-range -1,0.5` as `--beta-range=-1,0.5`: argparse would take '-1,0.5' for an option."""
    ranges = {s for a in parser._actions if a.dest.endswith("_range") for s in a.option_strings}
    out, argv = [], list(argv)
    for i, token in enumerate(argv):
        if i and argv[i - 1] in ranges and _NEGATIVE.match(token) and out and out[-1] == argv[i - 1]:
            out[-1] = f"{argv[i - 1]}={token}"
        else:
            out.append(token)
    return out


@dataclass(frozen=True)
class DataLocation:
    """Where the datasets live (not part of the protocol: a study may move)."""

    data_dir: str
    download: bool


def split_sizes(
    dataset: str, data: DataLocation, num_samples: int | None, val_fraction: float, clients: int | None = None
) -> dict[str, int]:
    """Examples in the train / val / test splits of `dataset` (the training split is what one epoch is). Loads the
    dataset here, in the driver: a missing one is refused before Ray starts (and downloaded once, with
    --download, not by every trial at the same time)."""
    from gradalign.data import clear_cache, load_dataset
    from gradalign.splits import with_validation

    if not 0 < val_fraction < 1:
        raise ConfigError("val_fraction", val_fraction, "must lie in (0, 1): tuning needs a validation split")
    loaded = load_dataset(
        dataset, data_dir=data.data_dir, download=data.download, num_clients=clients, num_samples=num_samples
    )
    split = with_validation(loaded, val_fraction, 0)
    sizes = {"train": len(split.y_train), "val": len(split.y_val), "test": len(split.y_test)}
    clear_cache()  # the trials load their own copies: do not keep one in the driver
    return sizes


def seeds_arg(text: str) -> str | int:
    """'auto' or a whole number of seeds."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of seeds, got {text!r}") from None


def tuning_settings(args: argparse.Namespace, budget) -> dict[str, Any]:
    """The protocol's tuning and seed fields from the shared options: trials per cell, tuning seeds (0, 1, ...),
    the recipe's confirmation and extension settings, ASHA and its grace period (default a quarter of `budget`),
    the sampler seed, the final seeds (SEED_BASE, ...) and the sequential looks."""
    for name in ("tuning_seeds", "trials_per_cell", "eval_points"):
        if getattr(args, name) < 1:
            raise ConfigError(name, getattr(args, name), "must be >= 1")
    tuning = tuple(range(args.tuning_seeds))
    for name in ("confirm_top", "confirm_seeds", "max_extensions"):
        if getattr(args, name) < 0:
            raise ConfigError(name, getattr(args, name), "must be >= 0")
    if args.grace_period is not None and not (math.isfinite(args.grace_period) and args.grace_period > 0):
        raise ConfigError("grace_period", args.grace_period, "must be a positive number of epochs")
    recipe = {
        "confirm_top": args.confirm_top,
        "confirm_seeds": args.confirm_seeds,
        "max_extensions": args.max_extensions,
    }
    return {
        "trials_per_cell": args.trials_per_cell,
        "tuning": recipe,
        "asha": args.asha,
        "grace_period": args.grace_period if args.grace_period is not None else budget.epochs / 4,
        "sampler_seed": args.sampler_seed,
        **_seeds(args, tuning),
    }


def _seeds(args: argparse.Namespace, tuning: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    if args.seeds == "auto":
        cap = args.max_seeds
        if cap < 3:
            raise ConfigError("max_seeds", cap, "a sequential study needs at least 3 seeds per cell (default 8)")
        looks = tuple(n for n in (3, 5, 8) if n < cap) + (cap,)
        return {"tuning_seeds": tuning, "seeds": tuple(SEED_BASE + i for i in range(cap)), "seed_looks": looks}
    if args.seeds < 1:
        raise ConfigError("seeds", args.seeds, "the chosen configuration of each cell needs at least one seed run")
    return {"tuning_seeds": tuning, "seeds": tuple(SEED_BASE + i for i in range(args.seeds)), "seed_looks": ()}


# -- the command --------------------------------------------------------------------------------------------------
class StudyCommand:
    """One invocation of a study script: its options, its refusals, the run and the report's inputs."""

    def __init__(
        self,
        parser: argparse.ArgumentParser,
        argv: Sequence[str] | None,
        kind: str,
        presets: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.parser = parser
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.kind = kind
        self.args = parse(parser, self.argv, presets)
        self.out = Path(self.args.out).resolve()
        self.text = " ".join([f"studies/{kind.replace('-', '_')}.py", *self.argv])
        self.data = DataLocation(str(Path(self.args.data_dir).resolve()), bool(self.args.download))
        self.code = 0

    @contextmanager
    def refusals(self) -> Iterator[None]:
        """Bad input, a missing dataset, a damaged file or an unreachable cluster end the command with 'error: ...'
        (exit code 2); a study whose every trial of a cell failed, with exit code 1. Never a traceback."""
        from gradalign.ray_adapter import ClusterUnreachable, StudyFailed
        from gradalign.ray_adapter.cluster_checks import ClusterNotReady

        try:
            yield
        except ConfigError as err:
            self.code = fail(self.explain(err))
        except Refused as err:
            self.code = fail(err)
        except ExportUnavailable as err:
            written = (self.out / "report.html").exists() and self.args.export
            hint = (
                (
                    f"\n(the HTML report and tables are written; retry the figures with --report-only --export "
                    f"{','.join(self.args.export)})"
                )
                if written
                else ""
            )
            self.code = fail(f"{err}{hint}")
        except (
            DatasetNotFoundError,
            DatasetCorruptError,
            ClusterUnreachable,
            ClusterNotReady,
            ConnectionError,
            DamagedTable,
            NothingToReport,
        ) as err:
            self.code = fail(err)
        except StudyFailed as err:
            self.code = fail(err, code=1)

    def explain(self, err: ConfigError) -> str:
        """'--option typed: invalid field=value: why' when the field is an option of this script."""
        option = _option_of(self.parser, err.field)
        if option is None:
            return str(err)
        typed = _typed(self.argv, option)
        said = f"{option} {typed}" if typed is not None else f"{option} (not given: a default or a preset's value)"
        return f"{said}: {err}"

    # -- --report-only ---------------------------------------------------------------------------------------------
    def recorded(self) -> StudyProtocol:
        """The protocol of the study in the output folder, for --report-only. Options that would change the science
        are refused (the report states the recorded protocol); so is a folder of another kind of study."""
        changed = sorted(self.args._explicit - REPORT_ONLY_OK)
        if changed:
            typed = []
            for dest in changed:
                option = _option_of(self.parser, dest) or f"--{dest.replace('_', '-')}"
                value = _typed(self.argv, option)
                typed.append(f"{option} {value}".strip() if value is not None else option)
            raise Refused(
                f"--report-only rebuilds the report from the study's own record ({self.out / 'study.json'}): "
                f"{', '.join(typed)} cannot change what the study measured; drop "
                f"{'it' if len(changed) == 1 else 'them'} (the report states the recorded protocol)"
            )
        if self.args.export:  # no browser: say so before anything is written
            find_browser()
        saved = read_study_file(self.out)
        if saved is None:
            what = "no study here" if not self.out.exists() else "no study.json in it: not a study folder"
            raise ConfigError("out", str(self.out), f"nothing to rebuild ({what})")
        if saved.kind != self.kind:
            raise ConfigError(
                "out",
                str(self.out),
                f"this folder holds a {saved.kind} study, not a {self.kind} "
                f"study: rebuild it with studies/{saved.kind.replace('-', '_')}.py --report-only",
            )
        return saved.protocol

    def history(self) -> pd.DataFrame:
        return load_history(self.out)

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self, protocol: StudyProtocol, cells) -> pd.DataFrame:
        """Check everything that can be checked, join (or start) Ray, run the engine; returns the history."""
        import ray

        from gradalign.ray_adapter import StudyPlan, run_plan
        from gradalign.ray_adapter.cluster_checks import check_cluster, join_or_start
        from gradalign.ray_adapter.engine import check_folder
        from gradalign.ray_adapter.progress import TALLY
        from trainables import gradalign_trainable

        args = self.args
        if args.export:  # no browser: say so now, not after the study has trained
            find_browser()
        resources = _resources(args)
        plan = StudyPlan(protocol, self.out, tuple(cells), resources)
        if resources.storage and "://" not in resources.storage and not os.path.isabs(resources.storage):
            raise ConfigError("storage", resources.storage, "must be an absolute path or a URI (s3://...)")
        seeds = len(protocol.seeds)
        recipe = protocol.recipe
        tuning = recipe.cost()  # (extension rounds come on top when a best sits at an edge)
        runs = len(plan.cells) * (tuning + seeds)
        work = runs * protocol.budget.epochs * protocol.split_sizes["train"]
        if work > WORK_LIMIT_EXAMPLES and not args.yes:
            raise ConfigError(
                "yes",
                False,
                f"this study would train up to {runs} runs of up to {protocol.budget.epochs:.3g} epochs (about "
                f"{work:.2g} training examples in all, {work / DEFAULT_STUDY_EXAMPLES:.0f} times the "
                "default study, which takes about 9 minutes on 2 CPU cores): check the budget, or pass --yes to "
                "start it",
            )
        check_writable(self.out, "out")
        if resources.storage and "://" not in resources.storage:
            check_writable(Path(resources.storage), "storage")
        check_folder(plan, args.extend_seeds)
        first = protocol.design.looks[0]
        runs_text = f"{first} to {seeds} seeds" if protocol.sequential else f"{seeds} seeds"
        print(
            f"{self.kind} study {protocol.name!r}: {len(plan.cells)} cells x {protocol.trials_per_cell} tuning trials"
            + (f" ({len(protocol.tuning_seeds)} seeds each)" if len(protocol.tuning_seeds) > 1 else "")
            + (f" + {recipe.confirm_top} x {recipe.confirm_seeds} confirmation runs" if recipe.confirm_top else "")
            + f" + {runs_text} = {runs} training runs or so (3 more per range extension); output in {self.out}",
            flush=True,
        )
        print(f"budget: {protocol.budget.sentence()}", flush=True)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own experiment banner and TensorBoard hints
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # (one 'study created' line per cell)
        started = time.perf_counter()
        connection = join_or_start(args.address, args.local, num_cpus=args.num_cpus)
        check_cluster(connection, multi_worker=any(c.workers > 1 for c in plan.cells), storage=plan.storage)
        history = run_plan(plan, gradalign_trainable, address=args.address, extend_seeds=args.extend_seeds)
        cpus = float(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1.0
        print(
            f"all cells finished in {time.perf_counter() - started:.0f} s; "
            f"{TALLY.line(time.perf_counter() - started, cpus)}",
            flush=True,
        )
        return history

    def finish_report(self, path: Path, started: float) -> None:
        """The last lines: where the files are, the figures written, then the verdict."""
        from gradalign.findings import print_outcome

        if self.args.export:
            print(
                f"figures ({', '.join(self.args.export)}): {self.out / 'figures'} (report written in "
                f"{time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        print_outcome(self.out, path)


def _resources(args: argparse.Namespace):
    from gradalign.ray_adapter import Resources

    if not (math.isfinite(args.cpus_per_worker) and args.cpus_per_worker > 0):
        raise ConfigError("cpus_per_worker", args.cpus_per_worker, "must be a positive number")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError("num_cpus", args.num_cpus, "a Ray started here needs at least 1 CPU")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError("max_concurrent", args.max_concurrent, "must be >= 1")
    if args.max_failures < 0:
        raise ConfigError("max_failures", args.max_failures, "must be >= 0 (retries per trial)")
    return Resources(
        storage=args.storage,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        max_concurrent=args.max_concurrent,
        max_failures=args.max_failures,
    )


def check_writable(folder: Path, option: str) -> None:
    """Create `folder` if needed and write a file into it; `ConfigError` naming the option if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            option, str(folder), f"cannot write there ({err.strerror or err}); choose a folder you can write to"
        ) from None


def fail(err: Exception | str, code: int = 2) -> int:
    print(f"error: {err}", file=sys.stderr, flush=True)
    return code


def _option_of(parser: argparse.ArgumentParser, field: str) -> str | None:
    """The long option whose destination is `field` (or `field` + '_range'), if the parser has one."""
    for dest in (field, f"{field}_range", field.removesuffix("_range")):
        for action in parser._actions:
            if action.dest == dest and action.option_strings and action.help != argparse.SUPPRESS:
                return max(action.option_strings, key=len)
    return None


def _typed(argv: Sequence[str], option: str) -> str | None:
    """What the user typed after `option` ('--opt a b' -> 'a b', '--opt=a' -> 'a'); None if not given. The last
    occurrence, as argparse keeps it."""
    found = None
    for i, token in enumerate(argv):
        if token.startswith(option + "="):
            found = token.split("=", 1)[1]
        elif token == option:
            values = []
            for value in argv[i + 1 :]:
                if value.startswith("--") or (value.startswith("-") and not _NEGATIVE.match(value)):
                    break
                values.append(value)
            found = " ".join(values)
    return found
