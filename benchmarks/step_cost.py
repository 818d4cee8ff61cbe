"""Cost of one GradAlign update relative to one large-batch SGD update at the same global batch.

    python benchmarks/step_cost.py                # MLP and CNN on MNIST-shaped inputs, several shapes
    python benchmarks/step_cost.py --model mlp --repeats 30

GradAlign needs two gradient evaluations per update, so 2.0x is the floor. All variants are timed side by side in
one run (interleaved, median of repeats): `gradalign` is the default path (`path` says which ran: `fast` for models
of Linear/Conv2d/GroupNorm layers, see gradalign.fast_paths), `vmap` the per-client torch.func.vmap path it
replaces (GradAlign(fast_path=False)), `loop` GradAlign with a naive per-client Python loop (config vmap=False).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gradalign import TrainConfig
from gradalign.algorithms import ALGORITHM_CLASSES, RoundBatch, build_algorithm
from gradalign.models import build_model
from gradalign.provenance import provenance

SHAPES = ((4, 128), (8, 64), (16, 64), (8, 128), (32, 32))


def make_step(model_name: str, algorithm: str, clients: int, per_client: int, vmap: bool, device: torch.device,
              fast_path: bool = True):
    torch.manual_seed(0)
    shape = (1, 28, 28)
    model = build_model(model_name, shape, 10).to(device)
    cfg = TrainConfig(algorithm=algorithm, batch_size=clients * per_client, clients=clients, lr=0.01, vmap=vmap,
                      model=model_name, dataset="mnist")
    if algorithm == "gradalign":
        algo = ALGORITHM_CLASSES[algorithm](model, F.cross_entropy, cfg, fast_path=fast_path)
    else:
        algo = build_algorithm(model, F.cross_entropy, cfg)
    x = torch.randn(clients, 1, per_client, *shape, device=device)
    y = torch.randint(0, 10, (clients, 1, per_client), device=device)
    batch = RoundBatch(list(range(clients)), x, y, clients, diagnose=False)

    def step():
        algo.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    step.algorithm = algo
    return step


def time_side_by_side(steps: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so drift in machine load hits every variant alike
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "cnn", "all"), default="all", help="model(s) to time")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per variant (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-loop", action="store_true", help="skip the naive per-client loop (slow for many clients)")
    parser.add_argument("--no-vmap", action="store_true", help="skip the vmap path (GradAlign(fast_path=False))")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = provenance()
    print(f"# torch {info['torch']} on {info['hardware']}, {torch.get_num_threads()} threads, commit {info['git_commit'][:12]}")
    print(f"# median of {args.repeats} interleaved repeats; ratio = time / large-batch SGD time at the same global batch")
    print(f"{'model':>5} {'clients x b':>12} {'batch':>6} {'large-batch ms':>15} {'gradalign ms':>13} {'path':>5} "
          f"{'ratio':>6} {'vmap ratio':>11} {'loop ratio':>11}")
    models = ("mlp", "cnn") if args.model == "all" else (args.model,)
    for model_name in models:
        for clients, per_client in SHAPES:
            steps = {
                "large": make_step(model_name, "large_batch_sgd", clients, per_client, True, device),
                "gradalign": make_step(model_name, "gradalign", clients, per_client, True, device),
            }
            if not args.no_vmap:
                steps["vmap"] = make_step(model_name, "gradalign", clients, per_client, True, device, fast_path=False)
            if not args.no_loop:
                steps["loop"] = make_step(model_name, "gradalign", clients, per_client, False, device)
            t = time_side_by_side(steps, args.repeats)
            path = steps["gradalign"].algorithm.path  # after the steps: a fallback would show here
            vmap = f"{t['vmap'] / t['large']:.2f}x" if "vmap" in t else "-"
            loop = f"{t['loop'] / t['large']:.2f}x" if "loop" in t else "-"
            print(f"{model_name:>5} {f'{clients} x {per_client}':>12} {clients * per_client:>6} {t['large'] * 1e3:>15.2f} "
                  f"{t['gradalign'] * 1e3:>13.2f} {path:>5} {t['gradalign'] / t['large']:>5.2f}x {vmap:>11} {loop:>11}",
                  flush=True)


if __name__ == "__main__":
    main()
