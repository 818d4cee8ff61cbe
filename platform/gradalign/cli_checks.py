"""Every input of `python -m gradalign.cli` checked before training (`prepare_run`).

A value that cannot work is refused with a `UsageError` whose message is `--option value: why`, naming the option and
the text the user typed (or the default's value); so is a run far beyond what a local run is for (more than
`MAX_STEPS` steps or `MAX_EVALUATIONS` evaluations, or more than `MAX_GENERATED` generated examples) unless --yes is
given. The checks cost no training: the configuration is validated, the data loaded, the model built on the meta
device, the budget computed from the training split's size, and --out made and written to.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

from .config import ConfigError, TrainConfig

MAX_STEPS = 10_000_000
"""Sequential parameter updates a run may take without --yes: hours at the least, even for the smallest model
(`--epochs 1e9` on digits would be 10^10)."""
MAX_EVALUATIONS = 100_000
"""Evaluations (each on the whole validation and test splits) a run may make without --yes; --eval-points is
refused above it in any case (the schedule is computed in memory)."""
MAX_GENERATED = 1_000_000
"""Examples a generated dataset (mnist1d's --num-samples, synthetic's up to 2,000 per client) may have without
--yes."""
_SYNTHETIC_MAX_PER_CLIENT = 2000


class UsageError(ValueError):
    """A command-line value that cannot work; the message is `--option value: why`."""

    def __init__(self, option: str, value: str, reason: str):
        super().__init__(f"{option} {value}: {reason}")


def prepare_run(args: argparse.Namespace, typed: dict[str, str]):
    """The validated configuration and its Trainer (data loaded, model built), with --out made and writable; raises
    `UsageError` naming the option and the value typed for anything that cannot work. `typed`: the text typed for
    each option, by field name."""
    from .training import Trainer

    shown = functools.partial(_shown, typed)
    config = _checked_config(args, shown)
    data, train_size = _checked_data(config, args.yes, shown)
    _check_budget(config, train_size, args.yes, shown)
    try:
        trainer = Trainer(config, dataset=data)
    except ValueError as err:  # what only the data can tell (a partition that leaves a client empty, ...)
        raise UsageError(f"--partition {config.partition}", f"with --clients {config.clients}", str(err)) from None
    _make_folder("--out", shown("out", args.out), args.out)
    return config, trainer


def _shown(typed: dict[str, str], name: str, value) -> str:
    """What the user typed for field `name`, or the default's value."""
    return typed[name] if name in typed else f"{value} (the default)"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _checked_config(args: argparse.Namespace, shown) -> TrainConfig:
    """The paths and the configuration, before any data is loaded."""
    _check_folder("--out", shown("out", args.out), args.out)
    _check_folder("--data-dir", shown("data_dir", args.data_dir), args.data_dir)
    values = {k: v for k, v in vars(args).items() if k not in ("out", "quiet", "yes")}
    try:
        config = TrainConfig(**values)
    except ConfigError as err:
        raise UsageError(_option(err.field), shown(err.field, err.value), err.reason) from None
    if config.eval_points > MAX_EVALUATIONS:
        reason = f"at most {MAX_EVALUATIONS:,} evaluations per run"
        raise UsageError("--eval-points", shown("eval_points", config.eval_points), reason)
    from .training import resolve_device

    try:
        resolve_device(config.device)
    except ValueError as err:
        reason = "no CUDA device is available here (use --device auto or cpu)" if "CUDA" in str(err) else str(err)
        raise UsageError("--device", shown("device", config.device), reason) from None
    return config


def _checked_data(config: TrainConfig, yes: bool, shown):
    """The dataset and the size of its training split, checked against the model, the clients and the batch."""
    from .data import DatasetCorruptError, DatasetNotFoundError
    from .mnist1d_data import MNIST1DCacheError
    from .splits import with_validation
    from .training import load_config_dataset

    generated, by = _generated_examples(config)
    if generated > MAX_GENERATED and not yes:
        raise UsageError(
            _option(by),
            shown(by, getattr(config, by)),
            f"generates {'up to ' if by == 'clients' else ''}{generated:,} examples of {config.dataset}, beyond the "
            f"{MAX_GENERATED:,} a local run generates without --yes; ask for fewer, or pass --yes",
        )
    try:
        data = load_config_dataset(config)
    except (DatasetNotFoundError, DatasetCorruptError, MNIST1DCacheError) as err:
        raise UsageError("--dataset", shown("dataset", config.dataset), str(err)) from None
    except OSError as err:  # the data folder cannot be made or written (mnist1d's cache, a download)
        reason = f"cannot keep the data there ({err.strerror or err}: {err.filename})"
        raise UsageError("--data-dir", shown("data_dir", config.data_dir), reason) from None
    _check_model(config, data, shown("model", config.model))
    train_size = len(with_validation(data, config.val_fraction, config.split_seed).y_train)
    for name, count in (("clients", config.clients), ("batch_size", config.batch_size)):
        if count > train_size:
            what = "clients than" if name == "clients" else "examples in one update than the"
            raise UsageError(
                _option(name),
                shown(name, count),
                f"more {what} {train_size:,} training examples of {config.dataset} (after the validation split)",
            )
    return data, train_size


def _check_budget(config: TrainConfig, train_size: int, yes: bool, shown) -> None:
    """Refuse, unless `yes`, a run of more than MAX_STEPS steps or MAX_EVALUATIONS evaluations."""
    from .training import planned_updates

    updates = planned_updates(config, train_size)
    steps, evaluations = updates * steps_per_update(config), _evaluations(config, updates)
    if yes or (steps <= MAX_STEPS and evaluations <= MAX_EVALUATIONS):
        return
    if steps <= MAX_STEPS:
        raise UsageError(
            "--eval-every",
            shown("eval_every", config.eval_every),
            f"{evaluations:,} evaluations of a run of {updates:,} updates, beyond the {MAX_EVALUATIONS:,} a local "
            "run makes without --yes; evaluate less often, or pass --yes to run it anyway",
        )
    name = "budget_steps" if config.budget_steps else "budget_examples" if config.budget_examples else "epochs"
    examples = updates * config.examples_per_update
    raise UsageError(
        _option(name),
        shown(name, getattr(config, name)),
        f"a run of {updates:,} updates{f' = {steps:,} steps' if steps != updates else ''} ({examples:,} examples), "
        f"beyond the {MAX_STEPS:,} steps a local run takes without --yes: hours at the very least; lower "
        f"{_option(name)}, or pass --yes to run it anyway",
    )


def _check_model(config: TrainConfig, data, shown: str) -> None:
    """Build the model on the meta device (no memory) and run it on two examples' shapes."""
    import torch

    from .models import build_model

    try:
        with torch.device("meta"):
            build_model(config.model, data.input_shape, data.num_classes)(torch.empty(2, *data.input_shape))
    except (ValueError, RuntimeError) as err:
        reason = f"does not fit {config.dataset}'s examples of shape {tuple(data.input_shape)}: {err}"
        raise UsageError("--model", shown, reason) from None


def _check_folder(option: str, shown: str, path: str) -> None:
    """Refuse a folder path that cannot be one: empty, an existing file, or below a file."""
    if not str(path).strip():
        raise UsageError(option, repr(path), "an empty path; name a folder")
    where = Path(path).absolute()
    if where.exists() and not where.is_dir():
        raise UsageError(option, shown, "is a file, not a folder")
    parent = next((p for p in where.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(option, shown, f"{parent} is a file, not a folder")


def _make_folder(option: str, shown: str, path: str) -> None:
    """Make the folder and write a file there, so that an unwritable one is refused before training."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(option, shown, f"cannot write there ({err.strerror or err})") from None


def _generated_examples(config: TrainConfig) -> tuple[int, str]:
    """How many examples loading the dataset generates (at most), and the option that sets it."""
    if config.dataset == "mnist1d":
        from .mnist1d_data import CANONICAL_SAMPLES

        return config.num_samples or CANONICAL_SAMPLES, "num_samples"
    if config.dataset == "synthetic":
        return config.clients * _SYNTHETIC_MAX_PER_CLIENT, "clients"
    return 0, "dataset"


def steps_per_update(config: TrainConfig) -> int:
    """Sequential parameter updates per update of the global model (`StepResult.steps`)."""
    if config.algorithm == "sgd":
        return config.clients
    return config.local_steps if config.is_federated else 1


def _evaluations(config: TrainConfig, updates: int) -> int:
    if config.eval_every is not None:
        return -(-updates // config.eval_every)
    return min(config.eval_points, updates)
