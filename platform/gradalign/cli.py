"""Train one configuration locally, without Ray.

    python -m gradalign.cli --dataset digits --algorithm gradalign --batch-size 256 --clients 8 --epochs 10

Prints a line per evaluation (validation and test accuracy) and writes metrics.csv, metrics.json and config.json into
--out. A diverged run (NaN/inf loss) ends with status 'diverged' and exit code 3, not a traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

from .config import ConfigError, TrainConfig, field_docs
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
EXIT_DIVERGED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        kind = _kind(str(f.type))
        parser.add_argument(flag, type=kind, default=default, help=docs.get(f.name), metavar=f.name.upper())
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/local-run"),
        help="folder for metrics.csv, metrics.json and config.json",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final line")
    return parser


def _kind(annotation: str) -> type:
    """The argparse type of a field annotation such as 'int', 'float | None' or 'int | None'."""
    for name, kind in (("float", float), ("int", int), ("str", str)):
        if name in annotation:
            return kind
    return str


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
    try:
        config = TrainConfig(**values)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .training import Trainer  # after validation: building the data may take a moment

    try:
        trainer = Trainer(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    print(
        f"training {config.algorithm} on {config.dataset} ({config.model}), batch {config.batch_size} = "
        f"{config.clients} clients x {config.client_batch_size}, {trainer.total_updates} updates "
        f"({trainer.total_updates * config.examples_per_update} examples), {len(trainer.schedule)} evaluations "
        f"on {trainer.device}"
    )
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
