"""Cost of one GradAlign update relative to one large-batch SGD update at the same global batch.

    python benchmarks/step_cost.py                # MLP and CNN on MNIST-shaped inputs, several shapes
    python benchmarks/step_cost.py --model mlp --repeats 30
    python benchmarks/step_cost.py --model lenet,resnet18 --shapes 8x64,32x32 --device cuda --no-loop
    python benchmarks/step_cost.py --model mnist1d_mlp,mnist1d_cnn --threads 1 --repeats 10

Models: mlp and cnn take MNIST-shaped inputs (1, 28, 28), lenet and resnet18 CIFAR-shaped ones (3, 32, 32);
mnist1d_mlp and mnist1d_cnn are the MNIST-1D paper's MLP and CNN (model mlp and cnn on MNIST-1D's signals (1, 40));
all with 10 classes and random data; `all` = mlp,cnn. Shapes are `CLIENTSxB` (b examples per client, global batch
CLIENTS*b).

GradAlign needs two gradient evaluations per update, so 2.0x is the floor. All variants are timed side by side in
one run (interleaved, median of repeats after --warmup untimed steps each): `gradalign` is the default path (`path`
says which ran: `fast` for models of Linear/Conv2d/GroupNorm layers, see gradalign.fast_paths), `vmap` the per-client
torch.func.vmap path it replaces (GradAlign(fast_path=False)), `loop` GradAlign with a naive per-client Python loop
(config vmap=False). On cuda every timed step ends with torch.cuda.synchronize().

`best` is the ratio of the fastest repeats (other load on the machine only ever adds time, so on a shared or noisy
machine it is the steadier estimate of the intrinsic cost; the median is the typical one). `paired` is the median of
the per-repeat ratios (each GradAlign step over the large-batch step timed right before it, so slow drifts of the
machine cancel) and `95% CI` a distribution-free confidence interval for it (order statistics of the paired ratios;
'-' with fewer than 6 repeats): a target is met with confidence only if the whole interval lies below it.

`rel err` checks the numbers before timing, on the same device, model and data: ||fast - vmap|| / ||vmap|| for
GradAlign's update direction (gradalign.gradalign_gradient with beta=0.1, fast_path=True against fast_path=False).
The check runs in full float32 (TF32 off: TF32 alone gives differences near 1e-3 on an H100, where two runs of the
vmap path differ by 1e-3 for resnet18); expect about 1e-7 to 1e-6 on CPU and up to about 1e-4 on cuda (cuDNN picks
other algorithms). Above 1e-3 a WARNING line follows the row. The timed steps keep torch's defaults.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from gradalign import TrainConfig, gradalign_gradient
from gradalign.algorithms import ALGORITHM_CLASSES, RoundBatch, build_algorithm
from gradalign.models import build_model
from gradalign.provenance import provenance

SHAPES = ((4, 128), (8, 64), (16, 64), (8, 128), (32, 32))
MNIST_SHAPE, CIFAR_SHAPE, MNIST1D_SHAPE = (1, 28, 28), (3, 32, 32), (1, 40)
INPUTS = {
    "mlp": (MNIST_SHAPE, "mnist", "mlp"),
    "cnn": (MNIST_SHAPE, "mnist", "cnn"),
    "lenet": (CIFAR_SHAPE, "cifar10", "lenet"),
    "resnet18": (CIFAR_SHAPE, "cifar10", "resnet18"),
    "mnist1d_mlp": (MNIST1D_SHAPE, "mnist1d", "mlp"),
    "mnist1d_cnn": (MNIST1D_SHAPE, "mnist1d", "cnn"),
}
"""Benchmark model name -> (input shape, dataset it stands for, model name of gradalign.models)."""
ALL_MODELS = ("mlp", "cnn")
NUM_CLASSES = 10
CHECK_BETA = 0.1
REL_ERR_LIMIT = 1e-3


def _within(item: str, value: str) -> str:
    return "" if item.strip() == value.strip() else f" in {value!r}"


def parse_models(value: str) -> tuple[str, ...]:
    """'mlp,resnet18' -> ('mlp', 'resnet18'); 'all' -> mlp, cnn. Duplicates are dropped, order kept."""
    models: list[str] = []
    for name in value.split(","):
        name = name.strip()
        if name == "all":
            models.extend(ALL_MODELS)
        elif name in INPUTS:
            models.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"invalid model {name!r}{_within(name, value)}: choose from {', '.join(INPUTS)}, all (comma-separated)"
            )
    return tuple(dict.fromkeys(models))


def parse_shapes(value: str) -> tuple[tuple[int, int], ...]:
    """'4x128,32x32' -> ((4, 128), (32, 32)): clients x examples per client, both positive."""
    shapes = []
    for item in value.split(","):
        parts = item.strip().lower().split("x")
        try:
            clients, per_client = (int(p) for p in parts)
            if clients < 1 or per_client < 1:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid shape {item.strip()!r}{_within(item, value)}: expected CLIENTSxB with positive integers, "
                "comma-separated, e.g. 4x128,32x32"
            ) from None
        shapes.append((clients, per_client))
    return tuple(shapes)


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


def make_problem(model_name: str, clients: int, per_client: int, device: torch.device):
    """The benchmark's model and data (seeded, so every variant and the check see the same ones)."""
    torch.manual_seed(0)
    shape, _, kind = INPUTS[model_name]
    model = build_model(kind, shape, NUM_CLASSES).to(device)
    x = torch.randn(clients, 1, per_client, *shape, device=device)
    y = torch.randint(0, NUM_CLASSES, (clients, 1, per_client), device=device)
    return model, x, y


def make_step(
    model_name: str,
    algorithm: str,
    clients: int,
    per_client: int,
    vmap: bool,
    device: torch.device,
    fast_path: bool = True,
):
    model, x, y = make_problem(model_name, clients, per_client, device)
    _, dataset, model_kind = INPUTS[model_name]
    cfg = TrainConfig(
        algorithm=algorithm,
        batch_size=clients * per_client,
        clients=clients,
        lr=0.01,
        vmap=vmap,
        model=model_kind,
        dataset=dataset,
    )
    if algorithm == "gradalign":
        algo = ALGORITHM_CLASSES[algorithm](model, F.cross_entropy, cfg, fast_path=fast_path)
    else:
        algo = build_algorithm(model, F.cross_entropy, cfg)
    batch = RoundBatch(list(range(clients)), x, y, clients, diagnose=False)

    def step():
        algo.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step.algorithm = algo
    return step


PRODUCT_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"})
"""The aten ops (and their in-place / out= forms) that do a step's matrix products and convolutions."""


class _ProductRecorder(TorchDispatchMode):
    """Keeps every product op dispatched while active, with (detached) references to its arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__.rstrip("_") in PRODUCT_OPS:
            self.calls.append((func, *tree_map(_detached, (args, kwargs))))
        return func(*args, **kwargs)


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def record_products(step) -> list:
    """The matrix products and convolutions of one call of `step`: (op, args, kwargs) in the order they ran.

    The arguments are the step's own tensors, kept alive (replaying writes into the outputs of in-place and out=
    calls again: the values change, the work does not).
    """
    with _ProductRecorder() as recorder:
        step()
    return recorder.calls


def replay(calls: list, device: torch.device) -> None:
    """Run recorded calls again, back to back (no autograd); on cuda, wait for them."""
    with torch.no_grad():
        for func, args, kwargs in calls:
            func(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_ratio(steps: dict, repeats: int, device: torch.device) -> float:
    """Median time of the recorded products of a `gradalign` step over those of a `large` step (interleaved)."""
    calls = {name: record_products(steps[name]) for name in ("large", "gradalign")}
    times = time_side_by_side({name: (lambda c=c: replay(c, device)) for name, c in calls.items()}, repeats, 1)
    return statistics.median(times["gradalign"]) / statistics.median(times["large"])


def direction_rel_err(
    model_name: str, clients: int, per_client: int, device: torch.device, beta: float = CHECK_BETA
) -> float:
    """||fast - vmap|| / ||vmap|| of GradAlign's update direction on the benchmark's model and data."""
    model, x, y = make_problem(model_name, clients, per_client, device)
    batches = [(x[i, 0], y[i, 0]) for i in range(clients)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:  # full float32 for the check: TF32 alone gives differences near 1e-3 (the timed steps keep torch's defaults)
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            fast = gradalign_gradient(model, F.cross_entropy, batches, beta, fast_path=True)
            ref = gradalign_gradient(model, F.cross_entropy, batches, beta, fast_path=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    fast = torch.cat([g.detach().reshape(-1) for g in fast]).double()
    ref = torch.cat([g.detach().reshape(-1) for g in ref]).double()
    diff = (fast - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def median_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): a distribution-free confidence interval for the median of `values`.

    The bounds are order statistics x_(j) and x_(n+1-j), with the largest j for which P(Binomial(n, 1/2) < j) stays
    within (1 - level) / 2, so the interval covers the true median with probability >= level for any continuous
    distribution; (median, nan, nan) when n is too small for that.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    alpha, j, below = (1.0 - level) / 2, 0, 0.0  # below = P(B < j + 1) as j grows
    while j < n // 2:
        below += math.comb(n, j) / 2**n
        if below > alpha:
            break
        j += 1
    if j == 0:
        return statistics.median(xs), math.nan, math.nan
    return statistics.median(xs), xs[j - 1], xs[n - j]


def time_side_by_side(steps: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so drift in machine load hits every variant alike
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=parse_models,
        default=ALL_MODELS,
        metavar="MODELS",
        help=f"comma-separated models from {', '.join(INPUTS)}, or all (= mlp,cnn; the default)",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=SHAPES,
        metavar="SHAPES",
        help="comma-separated CLIENTSxB (default: " + ",".join(f"{c}x{b}" for c, b in SHAPES) + ")",
    )
    parser.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=20,
        help="timed repeats per variant, median reported (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=_int_at_least(0),
        default=3,
        help="untimed steps per variant before timing (default: %(default)s)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its algorithms per shape (torch.backends.cudnn.benchmark = True)",
    )
    parser.add_argument("--no-loop", action="store_true", help="skip the naive per-client loop (slow for many clients)")
    parser.add_argument("--no-vmap", action="store_true", help="skip the vmap path (GradAlign(fast_path=False))")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the products-only ratio (it records one step's product arguments)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = provenance()
    print(
        f"# torch {info['torch']} on {info['hardware']}, device {device}, {torch.get_num_threads()} threads, "
        f"commit {info['git_commit'][:12]}"
    )
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if device.type == "cuda":
        print(
            f"# cuda: TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}, cuDNN benchmark {torch.backends.cudnn.benchmark}"
        )
    print(
        f"# median of {args.repeats} interleaved repeats after {args.warmup} warm-up steps; ratio = time / "
        "large-batch SGD time at the same global batch; best = the same for the fastest repeat of each; paired = "
        "median of the per-repeat ratios, 95% CI its distribution-free confidence interval; floor = the ratio of the "
        "matrix products and convolutions alone (recorded from one step of each, replayed)"
    )
    print(
        f"# rel err = ||fast - vmap|| / ||vmap|| of GradAlign's direction (beta={CHECK_BETA}) on this device "
        "and data, checked before timing"
    )
    width = max(5, *(len(m) for m in args.model))
    print(
        f"{'model':>{width}} {'clients x b':>12} {'batch':>6} {'large-batch ms':>15} {'gradalign ms':>13} "
        f"{'path':>5} {'ratio':>6} {'best':>6} {'paired':>6} {'95% CI':>9} {'floor':>6} {'vmap ratio':>11} "
        f"{'loop ratio':>11} {'rel err':>8}"
    )
    for model_name in args.model:
        for clients, per_client in args.shapes:
            rel_err = direction_rel_err(model_name, clients, per_client, device)
            steps = {
                "large": make_step(model_name, "large_batch_sgd", clients, per_client, True, device),
                "gradalign": make_step(model_name, "gradalign", clients, per_client, True, device),
            }
            if not args.no_vmap:
                steps["vmap"] = make_step(model_name, "gradalign", clients, per_client, True, device, fast_path=False)
            if not args.no_loop:
                steps["loop"] = make_step(model_name, "gradalign", clients, per_client, False, device)
            times = time_side_by_side(steps, args.repeats, args.warmup)
            t = {name: statistics.median(ts) for name, ts in times.items()}
            best = min(times["gradalign"]) / min(times["large"])
            paired, low, high = median_ci([g / lb for g, lb in zip(times["gradalign"], times["large"])])
            ci = f"{low:.2f}-{high:.2f}" if math.isfinite(low) else "-"
            floor = "-" if args.no_floor else f"{floor_ratio(steps, args.repeats, device):.2f}x"
            path = steps["gradalign"].algorithm.path  # after the steps: a fallback would show here
            vmap = f"{t['vmap'] / t['large']:.2f}x" if "vmap" in t else "-"
            loop = f"{t['loop'] / t['large']:.2f}x" if "loop" in t else "-"
            print(
                f"{model_name:>{width}} {f'{clients} x {per_client}':>12} {clients * per_client:>6} "
                f"{t['large'] * 1e3:>15.2f} {t['gradalign'] * 1e3:>13.2f} {path:>5} "
                f"{t['gradalign'] / t['large']:>5.2f}x {best:>5.2f}x {paired:>5.2f}x {ci:>9} {floor:>6} {vmap:>11} "
                f"{loop:>11} {rel_err:>8.1e}",
                flush=True,
            )
            if not rel_err <= REL_ERR_LIMIT:  # also catches nan
                print(
                    f"# WARNING: {model_name} {clients} x {per_client} on {device}: the fast path's update direction "
                    f"differs from the vmap path's by rel err {rel_err:.1e} > {REL_ERR_LIMIT:g}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
