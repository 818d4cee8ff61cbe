"""Our MNIST-1D data and models against the MNIST-1D paper's table (Greydanus & Kobak, ICML 2024).

    python benchmarks/mnist1d_paper.py                      # logistic, mlp, cnn; 3 seeds; the paper's recipe
    python benchmarks/mnist1d_paper.py --model cnn --seeds 5 --threads 1
    python benchmarks/mnist1d_paper.py --steps 20 --seeds 1 # a quick check that everything runs

Trains logistic regression, the MLP and the CNN (gradalign.models: `logistic`, and `mlp` and `cnn` on MNIST-1D's
(1, 40) signals, the paper's `LinearBase`, `MLPBase` and `ConvBase`) on the canonical split (4,000 train / 1,000
test, from gradalign.data.load_dataset("mnist1d")) with the training recipe of the mnist1d repository
(`get_model_args` and `train_model` in its train.py): Adam, learning rate 1e-2, no weight decay, batches of 100
taken in order from the (already shuffled) training set, wrapping around, 8,000 steps, cross-entropy. It is a plain
torch loop: it checks the data and the models, not this project's algorithms.

The table gives the paper's test accuracy (the mnist1d README: logistic regression 32%, MLP 68%, CNN 94%), ours as
mean ± sample standard deviation over the seeds (n = number of seeds; each seed initialises the model), and the gap
(ours - paper, in percentage points). Ours is the test accuracy after the last step; `best seen` is the highest of
the test accuracies evaluated every --eval-every steps (an optimistic number: it picks a step by the test set).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from gradalign.data import load_dataset
from gradalign.models import build_model
from gradalign.provenance import provenance

PAPER_ACCURACY = {"logistic": 32.0, "mlp": 68.0, "cnn": 94.0}
"""Test accuracy (%) on MNIST-1D in the README of github.com/greydanus/mnist1d (logistic regression, MLP, CNN)."""
MODELS = tuple(PAPER_ACCURACY)
LEARNING_RATE = 1e-2
BATCH_SIZE = 100
STEPS = 8000
"""`total_steps` of the repository's get_model_args (its train.py)."""


def parse_models(value: str) -> tuple[str, ...]:
    models = tuple(dict.fromkeys(name.strip() for name in value.split(",")))
    for name in models:
        if name not in MODELS:
            raise argparse.ArgumentTypeError(
                f"invalid model {name!r}: choose from {', '.join(MODELS)} (comma-separated)"
            )
    return models


def _int_at_least(minimum: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {value!r}: must be an integer >= {minimum}")
        return number

    return parse


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percentage of examples whose highest score is their label."""
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).double().mean().item()


def train_one(name: str, data, seed: int, steps: int, eval_every: int, print_every: int) -> dict:
    """One run of the paper's recipe; returns its final and best-seen test accuracy and its wall time."""
    torch.manual_seed(seed)
    model = build_model(name, data.input_shape, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    x, y, n = data.x_train, data.y_train, len(data.y_train)
    best, start = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        first = ((step - 1) * BATCH_SIZE) % n  # consecutive batches of the shuffled training set, as the repository
        loss = F.cross_entropy(model(x[first : first + BATCH_SIZE]), y[first : first + BATCH_SIZE])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            best = max(best, accuracy(model, data.x_test, data.y_test))
        if print_every and step % print_every == 0 and step < steps:
            print(f"#   {name} seed {seed}: step {step}/{steps}, loss {loss.item():.3f}", flush=True)
    final = accuracy(model, data.x_test, data.y_test)
    return {
        "model": name,
        "seed": seed,
        "final": final,
        "best": best,
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """A row per model: the paper's accuracy, ours (mean, sample std, n), the gap, the mean best-seen accuracy."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        finals = [r["final"] for r in runs if r["model"] == name]
        mean = statistics.fmean(finals)
        rows.append(
            {
                "model": name,
                "parameters": next(r["parameters"] for r in runs if r["model"] == name),
                "paper": PAPER_ACCURACY[name],
                "mean": mean,
                "n": len(finals),
                "gap": mean - PAPER_ACCURACY[name],
                "std": statistics.stdev(finals) if len(finals) > 1 else math.nan,
                "best": statistics.fmean(r["best"] for r in runs if r["model"] == name),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'model':>8} {'params':>7} {'paper %':>8} {'ours % (mean ± std, n)':>24} {'gap':>7} {'best seen %':>12}"
    lines = [header]
    for r in rows:
        spread = "-" if math.isnan(r["std"]) else f"{r['std']:.1f}"
        ours = f"{r['mean']:.1f} ± {spread} (n={r['n']})"
        lines.append(
            f"{r['model']:>8} {r['parameters']:>7} {r['paper']:>8.0f} {ours:>24} {r['gap']:>+7.1f} {r['best']:>12.1f}"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=parse_models,
        default=MODELS,
        metavar="MODELS",
        help=f"comma-separated models from {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument("--seeds", type=_int_at_least(1), default=3, help="runs per model, seeds 0.. (default: 3)")
    parser.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=STEPS,
        help="Adam steps per run (default: %(default)s, the repository's total_steps)",
    )
    parser.add_argument(
        "--eval-every",
        type=_int_at_least(1),
        default=250,
        help="steps between test evaluations for the best-seen column (default: %(default)s)",
    )
    parser.add_argument(
        "--print-every",
        type=_int_at_least(0),
        default=2000,
        help="steps between progress lines, 0 for none (default: %(default)s)",
    )
    parser.add_argument("--data-dir", default="data", help="where the generated set is cached (default: %(default)s)")
    parser.add_argument(
        "--num-samples",
        type=_int_at_least(10),
        default=None,
        help="examples to generate (default: the canonical 5,000, split 4,000/1,000)",
    )
    parser.add_argument("--threads", type=_int_at_least(1), default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_dataset("mnist1d", data_dir=args.data_dir, num_samples=args.num_samples)
    except ValueError as err:
        parser.error(str(err))
    info = provenance()
    print(
        f"# torch {info['torch']} on {info['hardware']}, {torch.get_num_threads()} threads, commit "
        f"{info['git_commit'][:12]}"
    )
    print(
        f"# MNIST-1D: {len(data.y_train)} train / {len(data.y_test)} test; Adam lr {LEARNING_RATE}, batch "
        f"{BATCH_SIZE}, {args.steps} steps, seeds 0-{args.seeds - 1}",
        flush=True,
    )
    runs = []
    for name in args.model:
        for seed in range(args.seeds):
            run = train_one(name, data, seed, args.steps, args.eval_every, args.print_every)
            print(
                f"# {name} seed {seed}: test accuracy {run['final']:.1f}% (best seen {run['best']:.1f}%), "
                f"{run['seconds']:.1f} s",
                flush=True,
            )
            runs.append(run)
    rows = summarise(runs)
    print(format_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
