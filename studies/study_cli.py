"""Command-line options and checks that every study script shares."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from gradalign.config import ConfigError
from gradalign.data import DatasetCorruptError, DatasetNotFoundError


def range_arg(text: str) -> tuple[float, float] | None:
    """'LOW,HIGH' -> (low, high); 'none' -> None. Emptiness (low >= high) is refused by the search space."""
    if text.strip().lower() == "none":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0.01,1.0) or 'none', got {text!r}") from None
    return low, high


def add_common_arguments(p: argparse.ArgumentParser, default_name: str, smoke: dict) -> None:
    g = p.add_argument_group("tuning and seeds")
    g.add_argument("--trials-per-cell", type=int, default=8, help="Optuna (TPE) trials per cell")
    g.add_argument("--seeds", type=int, default=3, help="seeds the best configuration of each cell is re-run with")
    g.add_argument("--asha", action="store_true", help="stop unpromising tuning trials early (ASHA on epochs)")
    g.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (cell i uses seed + i)")
    g = p.add_argument_group("where it runs")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' on a cluster node); default: RAY_ADDRESS, else a local Ray")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per training process")
    g.add_argument("--gpus-per-worker", type=int, default=0, choices=(0, 1), help="1: one GPU per training process")
    g.add_argument("--max-concurrent", type=int, default=None, help="cap on trials running at once")
    g = p.add_argument_group("files")
    g.add_argument("--name", default=default_name, help="study name; re-running a name resumes it")
    g.add_argument("--out", default=None, help="output folder (default: results/<name>)")
    g.add_argument("--storage", default=os.environ.get("GRADALIGN_STORAGE"),
                   help="Ray storage for trial state: an absolute path or URI shared by all nodes (s3://..., NFS); "
                   "default: $GRADALIGN_STORAGE, else the output folder")
    g.add_argument("--data-dir", default="data", help="where downloadable datasets live")
    g.add_argument("--download", action="store_true", help="allow downloading datasets into --data-dir")
    g = p.add_argument_group("modes")
    g.add_argument("--smoke-test", action="store_true",
                   help="the whole pipeline on a tiny budget (" + ", ".join(f"{k}={v}" for k, v in smoke.items()) + "); "
                   "options you give explicitly keep your values")
    g.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the output folder (finished or partial study) without training")
    g.add_argument("--extend-seeds", action="store_true",
                   help="accept a larger --seeds for a study folder started with fewer seeds: only the runs of the "
                   "new seeds are trained (any other change of settings is refused)")
    p.set_defaults(_smoke=smoke, _default_name=default_name)


_UNSET = object()


def parse_study_args(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                     presets: Mapping[str, Mapping[str, Any]] | None = None) -> argparse.Namespace:
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
        parser.error(f"{chosen[0][0]} and {chosen[1][0]} set the same options differently; use one of them "
                     "(and give any value you want to change explicitly)")
    for label, values, name in chosen:
        applied = {k: v for k, v in values.items() if k not in explicit}
        for key, value in applied.items():
            setattr(args, key, value)
        if "name" not in explicit:
            args.name = name
        kept = [f"--{k.replace('_', '-')}" for k in values if k in explicit]
        print(f"{label}: {', '.join(f'{k}={v}' for k, v in applied.items())}"
              + (f" (your {', '.join(kept)} kept)" if kept else ""), flush=True)
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


def common_settings(args: argparse.Namespace) -> dict:
    return dict(trials_per_cell=args.trials_per_cell, seeds=tuple(range(args.seeds)), storage=args.storage,
                cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, asha=args.asha,
                max_concurrent=args.max_concurrent, sampler_seed=args.sampler_seed)


def run_study_script(args: argparse.Namespace, argv: list[str] | None, plan_cells, validate, report,
                     describe) -> int:
    """The body every study script shares: report-only, or validate -> plan -> check -> run every cell -> report.

    `plan_cells(args)` and `validate(args)` must raise ConfigError (or ValueError) on bad input, before Ray starts;
    `report(out, args, command, history)` writes the report; `describe(plan)` is the opening progress line.
    Before Ray starts, the datasets must be present (or --download given), the output folder writable, and a study
    already in the folder must have been started with the same settings.
    """
    from studies.cells import StudyFailed, StudyPlan, load_history, run_plan
    from studies.settings_file import check_plan

    out = Path(args.out).resolve()
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    if args.report_only:
        try:
            history = load_history(out)
        except StudyFailed as err:
            return fail(err)
        return report(out, args, command, history)
    try:
        validate_common(args)
        validate(args)
        plan = StudyPlan(name=args.name, out_dir=out, cells=plan_cells(args), **common_settings(args))
        check_datasets(plan)
        check_writable(out, "out")
        if plan.storage and "://" not in plan.storage:
            check_writable(Path(plan.storage), "storage")
        check_plan(plan, extend_seeds=args.extend_seeds)
    except (ConfigError, ValueError, DatasetNotFoundError, DatasetCorruptError) as err:
        return fail(err)
    print(f"{describe(plan)}; output in {out}", flush=True)
    started = time.perf_counter()
    try:
        check_storage(args, plan)
        history = run_plan(plan, address=args.address, extend_seeds=args.extend_seeds)
    except ConfigError as err:
        return fail(err)
    except StudyFailed as err:
        return fail(err, code=1)
    print(f"all cells finished in {time.perf_counter() - started:.0f} s", flush=True)
    return report(out, args, command, history)


def check_datasets(plan) -> None:
    """Load every dataset the plan's cells use, once, in this process: a missing one (without --download) raises
    `DatasetNotFoundError` naming the files and how to get them, before Ray starts. With --download, this is where
    it is downloaded (once, not by every trial at the same time)."""
    from gradalign.data import clear_cache, load_dataset

    needed = {(c.space.fixed.get("dataset", "digits"), c.space.fixed.get("data_dir", "data"),
               bool(c.space.fixed.get("download", False))) for c in plan.cells}
    for name, data_dir, download in sorted(needed):
        load_dataset(name, data_dir=data_dir, download=download)
    clear_cache()  # the trials load their own copies: do not keep one in the driver


def check_writable(folder: Path, option: str) -> None:
    """Create `folder` if needed and write a file into it; `ConfigError` naming the option if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(option, str(folder), f"cannot write there ({err.strerror or err}); choose a folder you "
                          "can write to") from None


def describe_study(kind: str, args: argparse.Namespace, budget: str):
    """`run_study_script`'s `describe`: '<kind> study <name>: N cells x T tuning trials + S seeds, <budget>'."""
    return lambda plan: (f"{kind} study {args.name!r}: {len(plan.cells)} cells x {args.trials_per_cell} "
                         f"tuning trials + {len(plan.seeds)} seeds, {budget}")


def fail(err: Exception, code: int = 2) -> int:
    print(f"error: {err}", file=sys.stderr)
    return code


SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse.s3fs",
                      "fuse.gcsfuse", "fuse.juicefs", "efs")


def check_storage(args: argparse.Namespace, plan) -> None:
    """On a cluster of several hosts, trial state must live where every node sees it: refuse a local folder."""
    import ray

    from gradalign.ray_adapter import connect

    connect(args.address)
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    problem = storage_problem(hosts, plan.storage or str(plan.out_dir))
    if problem:
        raise ConfigError("storage", plan.storage or str(plan.out_dir), problem)


def storage_problem(hosts: set[str], storage: str) -> str | None:
    """Why `storage` cannot serve a cluster on `hosts` (None when it can)."""
    if len(hosts) <= 1 or "://" in storage or _filesystem(storage) in SHARED_FILESYSTEMS:
        return None
    return (f"the cluster spans {len(hosts)} hosts but this is a local folder that the other hosts cannot see; pass "
            "--storage s3://BUCKET/PATH (or gs://..., or a folder on NFS mounted on every node)")


def _filesystem(path: str) -> str:
    """The filesystem type holding `path` (longest matching mount point in /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    target = str(Path(path).resolve())
    best = max((m for m in mounts if target.startswith(m[0].rstrip("/") + "/") or target == m[0]),
               key=lambda m: len(m[0]), default=("", "unknown"))
    return best[1]
