"""Command-line options and checks that every study script shares."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradalign.config import ConfigError
from gradalign.data import DatasetCorruptError, DatasetNotFoundError
from gradalign.export import FORMATS, ExportUnavailable, find_browser, parse_formats
from studies.cluster_checks import (  # noqa: F401  (storage_problem: re-exported)
    ClusterNotReady,
    check_cluster,
    join_or_start,
    storage_problem,
)

SEED_BASE = 1000
"""The final runs' seeds are SEED_BASE, SEED_BASE + 1, ...; tuning trials use 0, 1, ...: never the same run."""


def range_arg(text: str) -> tuple[float, float] | None:
    """'LOW,HIGH' -> (low, high); 'none' -> None. Emptiness (low >= high) is refused by the search space."""
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


def add_common_arguments(p: argparse.ArgumentParser, default_name: str, smoke: dict, tuning_seeds: int = 1) -> None:
    g = p.add_argument_group(
        "tuning and seeds (tuning reads the validation split; the seed runs report the test split)"
    )
    g.add_argument("--trials-per-cell", type=int, default=8, help="Optuna (TPE) trials per cell")
    g.add_argument(
        "--tuning-seeds",
        type=int,
        default=tuning_seeds,
        help="seeds each tuning trial trains side by side, scored by their mean (robust to a configuration "
        "at the edge of stability; costs that many runs per trial). Tuning seeds are 0, 1, ... "
        f"(default {tuning_seeds})",
    )
    g.add_argument(
        "--seeds",
        type=int,
        default=3,
        help=f"seeds the best configuration of each cell is re-run with ({SEED_BASE}, {SEED_BASE + 1}, ...: "
        "disjoint from the tuning seeds, so no final run repeats a tuning trial)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of the training data held out for validation (stratified; the same split for every seed)",
    )
    g.add_argument(
        "--eval-points",
        type=int,
        default=40,
        help="evaluations per run, log-spaced in steps (resolves steps to target early and late)",
    )
    g.add_argument("--asha", action="store_true", help="stop unpromising tuning trials early (ASHA on epochs)")
    g.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (cell i uses seed + i)")
    g = p.add_argument_group("where it runs")
    where = g.add_mutually_exclusive_group()
    where.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (HOST:PORT); default: RAY_ADDRESS, else the Ray that `ray start` "
        "runs on this machine (on a cluster's head node: the cluster), else a new local Ray",
    )
    where.add_argument(
        "--local",
        action="store_true",
        help="always start a private local Ray, even where a cluster runs on this machine",
    )
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per training process")
    g.add_argument("--gpus-per-worker", type=int, default=0, choices=(0, 1), help="1: one GPU per training process")
    g.add_argument("--max-concurrent", type=int, default=None, help="cap on trials running at once")
    g = p.add_argument_group("files")
    g.add_argument("--name", default=default_name, help="study name; re-running a name resumes it")
    g.add_argument("--out", default=None, help="output folder (default: results/<name>)")
    g.add_argument(
        "--storage",
        default=os.environ.get("GRADALIGN_STORAGE"),
        help="Ray storage for trial state: an absolute path or URI shared by all nodes (s3://..., NFS); "
        "default: $GRADALIGN_STORAGE, else the output folder",
    )
    g.add_argument("--data-dir", default="data", help="where downloadable datasets live")
    g.add_argument("--download", action="store_true", help="allow downloading datasets into --data-dir")
    g.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="mnist1d only: examples to generate (default: the canonical 5000 = 4000 train / 1000 test; "
        "a multiple of 10); a larger test set narrows the confidence intervals",
    )
    g.add_argument(
        "--export",
        type=export_arg,
        default=(),
        metavar="FORMATS",
        help=f"also write every report figure as <out>/figures/<figure>.<format>, for papers; "
        f"FORMATS: comma-separated, any of {','.join(FORMATS)}. Needs Chrome or Chromium (checked before "
        "training; `apt-get install chromium` or `make browser`, or set BROWSER_PATH); works with "
        "--report-only",
    )
    g = p.add_argument_group("modes")
    g.add_argument(
        "--smoke-test",
        action="store_true",
        help="the whole pipeline on a tiny budget (" + ", ".join(f"{k}={v}" for k, v in smoke.items()) + "); "
        "options you give explicitly keep your values",
    )
    g.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report from the output folder (finished or partial study) without training",
    )
    g.add_argument(
        "--extend-seeds",
        action="store_true",
        help="accept a larger --seeds for a study folder started with fewer seeds: only the runs of the "
        "new seeds are trained (any other change of settings is refused)",
    )
    p.set_defaults(_smoke=smoke, _default_name=default_name)


_UNSET = object()


def parse_study_args(
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> argparse.Namespace:
    """Parse `argv`, then apply `--smoke-test` (or `--preset NAME`, one of `presets`) to every option the user did not
    give explicitly: explicit values always win, and are then validated like any other (`--smoke-test --seeds 0`
    is refused, not replaced). Both at once are refused. Prints which values the preset set."""
    args = parser.parse_args(argv)
    # An option given on the command line overwrites a marker put in its place beforehand; defaults do not.
    marked = parser.parse_args(argv, namespace=argparse.Namespace(**{k: _UNSET for k in vars(args)}))
    explicit = {k for k, v in vars(marked).items() if v is not _UNSET}
    chosen = []
    if getattr(args, "preset", None):
        chosen.append((f"--preset {args.preset}", (presets or {})[args.preset], f"{args._default_name}-{args.preset}"))
    if args.smoke_test:
        chosen.append(("--smoke-test", args._smoke, f"{args._default_name}-smoke"))
    if len(chosen) > 1:
        parser.error(
            f"{chosen[0][0]} and {chosen[1][0]} set the same options differently; use one of them "
            "(and give any value you want to change explicitly)"
        )
    for label, values, name in chosen:
        applied = {k: v for k, v in values.items() if k not in explicit}
        for key, value in applied.items():
            setattr(args, key, value)
        if "name" not in explicit:
            args.name = name
        kept = [f"--{k.replace('_', '-')}" for k in values if k in explicit]
        print(
            f"{label}: {', '.join(f'{k}={v}' for k, v in applied.items())}"
            + (f" (your {', '.join(kept)} kept)" if kept else ""),
            flush=True,
        )
    if args.out is None:
        args.out = str(Path("results") / args.name)
    return args


def validate_common(args: argparse.Namespace) -> None:
    """Refuse impossible tuning and execution options, naming the option and the value."""
    if args.trials_per_cell < 1:
        raise ConfigError("trials_per_cell", args.trials_per_cell, "each cell needs at least one tuning trial")
    if args.seeds < 1:
        raise ConfigError("seeds", args.seeds, "the best configuration of each cell needs at least one seed run")
    if not (args.cpus_per_worker > 0 and math.isfinite(args.cpus_per_worker)):
        raise ConfigError("cpus_per_worker", args.cpus_per_worker, "must be a positive number")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError("max_concurrent", args.max_concurrent, "must be >= 1")
    for name in ("tuning_seeds", "eval_points"):
        if getattr(args, name) < 1:
            raise ConfigError(name, getattr(args, name), "must be >= 1")
    if not 0 < args.val_fraction < 1:
        raise ConfigError("val_fraction", args.val_fraction, "must lie in (0, 1): tuning needs a validation split")


def common_settings(args: argparse.Namespace) -> dict:
    return dict(
        trials_per_cell=args.trials_per_cell,
        seeds=tuple(SEED_BASE + i for i in range(args.seeds)),
        tuning_seeds=tuple(range(args.tuning_seeds)),
        storage=args.storage,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        asha=args.asha,
        max_concurrent=args.max_concurrent,
        sampler_seed=args.sampler_seed,
    )


def run_study_script(args: argparse.Namespace, argv: list[str] | None, plan_cells, validate, report, describe) -> int:
    """The body every study script shares: report-only, or validate -> plan -> check -> run every cell -> report.

    `plan_cells(args)` and `validate(args)` must raise ConfigError (or ValueError) on bad input, before Ray starts;
    `report(out, args, command, history)` writes the report; `describe(plan)` is the opening progress line.
    Before Ray starts, the datasets must be present (or --download given), the output folder writable, and a study
    already in the folder must have been started with the same settings.
    """
    from studies.cells import StudyFailed, StudyPlan, load_history, run_plan, throughput
    from studies.settings_file import check_plan

    out = Path(args.out).resolve()
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    try:
        if args.export:  # no browser: say so now, not after the study has trained
            find_browser()
    except ExportUnavailable as err:
        return fail(err)
    if args.report_only:
        try:
            history = load_history(out)
        except StudyFailed as err:
            return fail(err)
        return _report(report, out, args, command, history)
    try:
        validate_common(args)
        validate(args)
        plan = StudyPlan(
            name=args.name,
            out_dir=out,
            cells=plan_cells(args),
            budget_epochs=args.budget_epochs,
            **common_settings(args),
        )
        check_datasets(plan)
        check_writable(out, "out")
        if plan.storage and "://" not in plan.storage:
            check_writable(Path(plan.storage), "storage")
        check_plan(plan, extend_seeds=args.extend_seeds)
    except (ConfigError, ValueError, DatasetNotFoundError, DatasetCorruptError) as err:
        return fail(err)
    print(f"{describe(plan)}; output in {out}", flush=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own experiment banner and TensorBoard hints: not ours
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # (one 'study created' line per cell)
    started = time.perf_counter()
    try:
        prepare_cluster(args, plan)
        history = run_plan(plan, address=args.address, extend_seeds=args.extend_seeds)
    except (ConfigError, ConnectionError, ClusterNotReady) as err:
        return fail(err)
    except StudyFailed as err:
        return fail(err, code=1)
    seconds = time.perf_counter() - started
    print(f"all cells finished in {seconds:.0f} s; {throughput(history, seconds, _cluster_cpus())}", flush=True)
    return _report(report, out, args, command, history)


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1.0


def _report(report, out: Path, args: argparse.Namespace, command: str, history) -> int:
    """`report(...)`, with a failed figure export said in one line (the HTML report and tables are written)."""
    started = time.perf_counter()
    try:
        code = report(out, args, command, history)
    except ExportUnavailable as err:
        return fail(
            ExportUnavailable(
                f"{err}\n(the HTML report and tables are written; retry the figures with "
                f"--report-only --export {','.join(args.export)})"
            )
        )
    if args.export:
        print(
            f"figures ({', '.join(args.export)}): {out / 'figures'} (report written in "
            f"{time.perf_counter() - started:.1f} s)",
            flush=True,
        )
    return code


def split_sizes(args: argparse.Namespace, clients: int | None = None) -> dict[str, int]:
    """Examples in the train / val / test splits of `args.dataset` (the training split is what one epoch is).
    Loads the dataset in the driver, so a missing one is refused before Ray starts; records the sizes in `args`."""
    from gradalign.data import load_dataset
    from gradalign.splits import with_validation

    data = load_dataset(
        args.dataset, data_dir=args.data_dir, download=args.download, num_clients=clients, num_samples=args.num_samples
    )
    split = with_validation(data, args.val_fraction, 0)
    args.split_sizes = {"train": len(split.y_train), "val": len(split.y_val), "test": len(split.y_test)}
    return args.split_sizes


def check_datasets(plan) -> None:
    """Load every dataset the plan's cells use, once, in this process: a missing one (without --download) raises
    `DatasetNotFoundError` naming the files and how to get them, before Ray starts. With --download, this is where
    it is downloaded (once, not by every trial at the same time)."""
    from gradalign.data import clear_cache, load_dataset

    needed = {
        (
            c.space.fixed.get("dataset", "digits"),
            c.space.fixed.get("data_dir", "data"),
            bool(c.space.fixed.get("download", False)),
            c.space.fixed.get("num_samples"),
        )
        for c in plan.cells
    }
    for name, data_dir, download, num_samples in sorted(needed, key=str):
        load_dataset(name, data_dir=data_dir, download=download, num_samples=num_samples)
    clear_cache()  # the trials load their own copies: do not keep one in the driver


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


def describe_study(kind: str, args: argparse.Namespace, budget: str):
    """`run_study_script`'s `describe`: '<kind> study <name>: N cells x T tuning trials + S seeds, <budget>'."""
    return lambda plan: (
        f"{kind} study {args.name!r}: {len(plan.cells)} cells x {args.trials_per_cell} "
        f"tuning trials + {len(plan.seeds)} seeds, {budget}"
    )


def fail(err: Exception, code: int = 2) -> int:
    print(f"error: {err}", file=sys.stderr)
    return code


def prepare_cluster(args: argparse.Namespace, plan) -> None:
    """Join the cluster (or start a local Ray), say which, and refuse one that cannot run the plan's cells."""
    connection = join_or_start(args.address, args.local)
    check_cluster(
        connection, multi_worker=any(cell.workers > 1 for cell in plan.cells), storage=plan.storage or str(plan.out_dir)
    )
