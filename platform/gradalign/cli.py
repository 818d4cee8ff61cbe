"""Train one configuration locally, without Ray.

    python -m gradalign.cli --dataset digits --algorithm gradalign --batch-size 256 --clients 8 --epochs 10

The first line states the run's budget (examples, updates, steps, evaluations); then a line per evaluation
(validation and test accuracy); metrics.csv, metrics.json and config.json are written into --out. Every bad value is
refused before training, as `error: --option value: why` with exit code 2; so is a run of more than `MAX_STEPS`
steps or `MAX_EVALUATIONS` evaluations, or one that generates more than `MAX_GENERATED` examples, unless --yes is
given. A diverged run (NaN/inf loss) ends with status 'diverged' and exit code 3, not a traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

from .cli_checks import MAX_EVALUATIONS, MAX_GENERATED, MAX_STEPS, UsageError, prepare_run, steps_per_update
from .config import TrainConfig, field_docs
from .provenance import provenance

_COLUMNS = (
    "epochs",
    "steps",
    "examples",
    "train_loss",
    "val_accuracy",
    "test_accuracy",
    "grad_variance",
    "grad_cosine",
    "wall_time",
)
EXIT_USAGE = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors raise `UsageError`-style messages instead of printing the (long) usage and exiting."""

    def error(self, message: str):
        found = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)?: (.*)", message, re.S)
        raise _ParseError(f"{found.group(1)} {found.group(2)}" if found else message)


class _ParseError(Exception):
    pass


def build_parser(typed: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line: an option per `TrainConfig` field, --out, --quiet, --yes. `typed` (if given) receives the
    text the user typed for each option, by destination."""
    typed = {} if typed is None else typed
    parser = _Parser(
        prog="python -m gradalign.cli",
        description="Train one configuration of GradAlign or a baseline on this machine (no Ray).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    docs = field_docs()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extras":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=docs.get(f.name))
            continue
        kind = _typed(_kind(str(f.type)), f.name, typed)
        parser.add_argument(flag, type=kind, default=default, help=docs.get(f.name), metavar=f.name.upper())
    parser.add_argument(
        "--out",
        type=_typed(str, "out", typed),
        default="results/local-run",
        help="folder for metrics.csv, metrics.json and config.json (made if missing; files there are replaced)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the first and the final line")
    parser.add_argument(
        "--yes",
        action="store_true",
        help=f"run even when the budget is beyond {MAX_STEPS:,} steps or {MAX_EVALUATIONS:,} evaluations, or the "
        f"generated data beyond {MAX_GENERATED:,} examples (otherwise refused, saying how much it would be)",
    )
    return parser


def _kind(annotation: str):
    """The argparse type of a field annotation such as 'int', 'float | None' or 'int | None'."""
    for name, kind in (("float", _number), ("int", _whole), ("str", str)):
        if name in annotation:
            return kind
    return str


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a number") from None


def _whole(text: str) -> int:
    """An integer, also written as 1e6 or 1000.0."""
    try:
        return int(text)
    except ValueError:
        pass
    value = _number(text)
    if not (math.isfinite(value) and value == int(value)):
        raise argparse.ArgumentTypeError(f"{text}: not a whole number")
    return int(value)


def _typed(kind, name: str, typed: dict[str, str]):
    def parse(text: str):
        typed[name] = text
        return kind(text)

    return parse


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    typed: dict[str, str] = {}
    try:
        args = build_parser(typed).parse_args(argv)
    except _ParseError as err:
        print(f"error: {err} (python -m gradalign.cli --help lists the options)", file=sys.stderr)
        return EXIT_USAGE
    try:
        config, trainer = prepare_run(args, typed)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    print(_budget_line(config, trainer), flush=True)
    if not args.quiet:
        print("  ".join(f"{c:>13}" for c in _COLUMNS))

    def show(metrics: dict) -> None:
        if not args.quiet:
            print("  ".join(f"{_fmt(metrics[c]):>13}" for c in _COLUMNS), flush=True)
        _write(out, config, trainer.history)

    history = trainer.fit(show)
    last = history[-1]
    print(
        f"status {last['status']}: validation accuracy {last['val_accuracy']:.4f}, test accuracy "
        f"{last['test_accuracy']:.4f} after {last['epochs']:.3g} epochs, {last['steps']} steps, "
        f"{last['wall_time']:.1f} s; metrics in {out}/metrics.csv"
    )
    return EXIT_DIVERGED if last["status"] == "diverged" else 0


# -- output -----------------------------------------------------------------------------------------------------------
def _budget_line(config: TrainConfig, trainer) -> str:
    """The first line: what is trained, and the budget in examples, updates, steps and evaluations."""
    updates, per_update = trainer.total_updates, config.examples_per_update
    train_size = len(trainer.y_train)
    examples = updates * per_update
    steps = updates * steps_per_update(config)
    if config.is_federated:
        shape = f"{config.clients_per_round} clients x {config.local_steps} local steps x {config.client_batch_size}"
    else:
        shape = f"{config.clients} clients x {config.client_batch_size}"
    return (
        f"training {config.algorithm} on {config.dataset} ({config.model}) on {trainer.device}; budget: "
        f"{examples:,} examples ({examples / train_size:.3g} epochs of {train_size:,}) = {updates:,} updates of "
        f"{per_update:,} ({shape}) = {steps:,} steps; {len(trainer.schedule)} evaluations"
    )


def _write(out: Path, config: TrainConfig, history: list[dict]) -> None:
    rows = [{**config.to_dict(), **row} for row in history]
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "config": config.to_dict(),
        "status": history[-1]["status"],
        "history": history,
        "provenance": provenance(),
    }
    (out / "metrics.json").write_text(json.dumps(_strict(summary), indent=2, default=str))


def _strict(value):
    """NaN/inf become null, so that the file is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
