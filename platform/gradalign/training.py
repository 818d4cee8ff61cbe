"""The training loop: data split over clients, one algorithm, a budget of updates, evaluations and checkpoints.

A `Trainer` runs in one process. With `LocalComm` it holds every client; with `TorchDistributedComm` (e.g. inside a
Ray TorchTrainer worker) it holds a block of clients and the algorithm all-reduces. Every client's batches come from
its own seeded sampler and the model is initialised from the run's seed, so the same configuration gives the same
numbers however the clients are spread over processes.

The budget is exact: `planned_updates` turns the configuration's budget (examples, steps or epochs) into a number
of updates, and the batches carry over epoch boundaries (no remainder is dropped). The run is evaluated on the
validation and test splits on a schedule in updates (`eval_schedule`: log-spaced by default), so that the step at
which a target is reached is resolved as finely early in training as late.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .algorithms import RoundBatch, build_algorithm
from .comm import LocalComm
from .config import TrainConfig
from .data import Dataset, load_dataset
from .models import build_model
from .partition import describe_partition, partition
from .splits import with_validation

METRIC_KEYS = (
    "evaluation",
    "epochs",
    "steps",
    "rounds",
    "examples",
    "communications",
    "messages",
    "values_sent",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "grad_variance",
    "grad_cosine",
    "grad_norm_sq",
    "gns_trace",
    "gns_grad_sq",
    "gns_simple",
    "label_tv",
    "wall_time",
    "status",
)
"""The metrics of every evaluation (`Trainer.train_until_eval`). `evaluation` counts evaluations (1, 2, ...);
`epochs` = examples / training-set size; `steps` counts sequential parameter updates (small-batch SGD: one per
micro-batch; federated rounds: K local steps), `rounds` updates of the global model; `communications` collective
exchanges (all-reduces) of the algorithm, `messages` the messages participating clients sent in them,
`values_sent` the numbers they sent in total; `label_tv` how non-iid this run's client split is."""
_ALIGNMENT_KEYS = ("grad_variance", "grad_cosine", "grad_norm_sq", "gns_trace", "gns_grad_sq")


class ClientSampler:
    """Draws a client's batches: a seeded permutation of its examples, reshuffled whenever it runs out."""

    def __init__(self, indices, seed: int, client_id: int):
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + client_id)
        self.order = self._shuffle()
        self.position = 0

    def _shuffle(self) -> torch.Tensor:
        return self.indices[torch.randperm(len(self.indices), generator=self.generator)]

    def draw(self, n: int) -> torch.Tensor:
        taken = []
        while n > 0:
            if self.position == len(self.order):
                self.order, self.position = self._shuffle(), 0
            chunk = self.order[self.position : self.position + n]
            self.position += len(chunk)
            n -= len(chunk)
            taken.append(chunk)
        return torch.cat(taken)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"].clone(), int(state["position"])


def planned_updates(config: TrainConfig, train_size: int) -> int:
    """The run's budget in updates: `budget_steps`, else ceil(examples / examples per update) for the examples of
    `budget_examples` (or `epochs` x `train_size`)."""
    if config.budget_steps is not None:
        return config.budget_steps
    examples = config.budget_examples if config.budget_examples is not None else config.epochs * train_size
    return max(1, math.ceil(examples / config.examples_per_update - 1e-9))


def eval_schedule(total_updates: int, points: int = 40, every: int | None = None) -> list[int]:
    """The updates after which a run is evaluated: every `every` updates, or `points` log-spaced ones (rounded,
    duplicates merged, so short runs evaluate after every update); the last update is always included."""
    if total_updates < 1:
        raise ValueError(f"total_updates={total_updates!r}: must be >= 1")
    if every is not None:
        marks = set(range(every, total_updates + 1, every))
    else:
        marks = {int(round(v)) for v in np.geomspace(1, total_updates, max(points, 1))}
    marks.add(total_updates)
    return sorted(m for m in marks if 1 <= m <= total_updates)


def lr_factor(schedule: str, warmup: float, update: int, total: int) -> float:
    """The step size's factor for update `update` (0-based) of `total`: a linear warmup over the first `warmup`
    fraction of the updates, then constant, or a linear / cosine decay towards zero at the end of the budget."""
    warm = int(round(warmup * total))
    if update < warm:
        return (update + 1) / warm
    if schedule == "constant":
        return 1.0
    progress = (update - warm) / max(total - warm, 1)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(requested: str, override: str | torch.device | None = None) -> torch.device:
    if override is not None:
        return torch.device(override)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("invalid device='cuda': no CUDA device is available here (use device='auto' or 'cpu')")
    return torch.device(requested)


def load_config_dataset(config: TrainConfig) -> Dataset:
    """The dataset `config` trains on (what `Trainer` loads when it is not given one)."""
    return load_dataset(  # (generated data depend on the split seed, not on the run seed)
        config.dataset,
        data_dir=config.data_dir,
        download=config.download,
        seed=config.split_seed,
        num_clients=config.clients,
        heterogeneity=config.heterogeneity,
        num_samples=config.num_samples,
    )


class Trainer:
    """Trains one configuration; `train_until_eval` runs to the next scheduled evaluation and returns its metrics."""

    def __init__(self, config: TrainConfig, comm: LocalComm | None = None, device=None, dataset: Dataset | None = None):
        self.config = config
        self.comm = comm or LocalComm()
        self.device = resolve_device(config.device, device)
        self.dtype = getattr(torch, config.dtype)
        data = dataset or load_config_dataset(config)
        split = with_validation(data, config.val_fraction, config.split_seed)
        parts = partition(
            split.y_train.numpy(),
            config.clients,
            config.partition,
            alpha=config.alpha,
            iid_fraction=config.iid_fraction,
            seed=config.seed,
            natural=split.natural_partition,
        )
        self.label_tv = describe_partition(split.y_train, parts, split.num_classes)["label_tv"]
        self.x_train = split.x_train.to(self.device, self.dtype)
        self.y_train = split.y_train.to(self.device)
        self.x_val = split.x_val.to(self.device, self.dtype)
        self.y_val = split.y_val.to(self.device)
        self.x_test = split.x_test.to(self.device, self.dtype)
        self.y_test = split.y_test.to(self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, split.input_shape, split.num_classes).to(self.device, self.dtype)
        self.algorithm = build_algorithm(self.model, F.cross_entropy, config, self.comm)
        self.local_clients = self.comm.local_clients(config.clients)
        self.samplers = {cid: ClientSampler(parts[cid], config.seed, cid) for cid in self.local_clients}
        self.participation_rng = torch.Generator().manual_seed(config.seed * 7919 + 17)
        self.total_updates = planned_updates(config, len(self.y_train))
        self.schedule = eval_schedule(self.total_updates, config.eval_points, config.eval_every)
        self.evaluation = self.steps = self.rounds = self.examples = 0
        self.communications = self.messages = self.values_sent = 0
        self.wall_time = 0.0
        self.status = "running"
        self.history: list[dict] = []

    @property
    def done(self) -> bool:
        return self.status != "running"

    # -- one round ------------------------------------------------------------------------------------------------
    def participants(self) -> list[int]:
        c = self.config
        if c.clients_per_round == c.clients:
            return list(range(c.clients))
        chosen = torch.randperm(c.clients, generator=self.participation_rng)[: c.clients_per_round]
        return sorted(int(i) for i in chosen)

    def next_batch(self, diagnose: bool = False) -> RoundBatch:
        """The next round's data for this process's participating clients; the alignment diagnostics are asked for
        when `diagnose` or every `diag_every` rounds."""
        c = self.config
        participants = self.participants()
        local = [cid for cid in participants if cid in self.samplers]
        k, b = c.local_steps, c.client_batch_size
        if local:
            idx = torch.stack([self.samplers[cid].draw(k * b) for cid in local]).to(self.device)
            inputs, targets = self.x_train[idx].unflatten(1, (k, b)), self.y_train[idx].unflatten(1, (k, b))
        else:
            inputs = self.x_train.new_zeros(0, k, b, *self.x_train.shape[1:])
            targets = self.y_train.new_zeros(0, k, b)
        diagnose = diagnose or self.rounds % c.diag_every == 0
        return RoundBatch(local, inputs, targets, len(participants), diagnose)

    # -- one evaluation interval ----------------------------------------------------------------------------------
    def train_until_eval(self) -> dict:
        """Run the updates up to the next scheduled evaluation, evaluate, and return the metrics (`METRIC_KEYS`)."""
        if self.done:
            raise RuntimeError(f"training is over (status={self.status!r})")
        start = time.perf_counter()
        self.model.train()
        losses, alignments = [], []
        first = True
        while self.rounds < self.schedule[self.evaluation]:  # (diagnostics at least once per interval: its first)
            batch = self.next_batch(diagnose=first)
            c = self.config
            self.algorithm.set_lr_scale(lr_factor(c.lr_schedule, c.warmup, self.rounds, self.total_updates))
            result = self.algorithm.step(batch)
            first = False
            self.steps += result.steps
            self.rounds += 1
            self.examples += self.config.examples_per_update
            self.communications += result.traffic.communications
            self.messages += result.traffic.messages
            self.values_sent += result.traffic.values
            losses.append(result.loss)
            if result.alignment is not None:
                alignments.append(result.alignment.as_dict())
            if not math.isfinite(result.loss):
                self.status = "diverged"
                break
        val_loss, val_accuracy = self.evaluate(self.x_val, self.y_val)
        test_loss, test_accuracy = self.evaluate(self.x_test, self.y_test)
        finite = math.isfinite(test_loss) and (math.isfinite(val_loss) or len(self.y_val) == 0)
        if self.status == "running" and not finite:
            self.status = "diverged"
        self.evaluation += 1
        if self.status == "running" and self.evaluation >= len(self.schedule):
            self.status = "completed"
        self.wall_time += time.perf_counter() - start
        metrics = {
            "evaluation": self.evaluation,
            "epochs": self.examples / len(self.y_train),
            "steps": self.steps,
            "rounds": self.rounds,
            "examples": self.examples,
            "communications": self.communications,
            "messages": self.messages,
            "values_sent": self.values_sent,
            "train_loss": sum(losses) / len(losses),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            **_mean_alignment(alignments),
            "label_tv": self.label_tv,
            "wall_time": self.wall_time,
            "status": self.status,
        }
        self.history.append(metrics)
        return metrics

    def fit(self, callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Run to the end of the budget; `callback(metrics)` after each evaluation."""
        while not self.done:
            metrics = self.train_until_eval()
            if callback is not None:
                callback(metrics)
        return self.history

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> tuple[float, float]:
        """Loss and accuracy on (x, y) (NaN, NaN when empty); each process evaluates every world_size-th example and
        the sums are all-reduced."""
        if len(y) == 0:
            return math.nan, math.nan
        self.model.eval()
        x, y = x[self.comm.rank :: self.comm.world_size], y[self.comm.rank :: self.comm.world_size]
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i in range(0, len(y), chunk):
            out = self.model(x[i : i + chunk])
            totals[0] += F.cross_entropy(out, y[i : i + chunk], reduction="sum").double()
            totals[1] += (out.argmax(1) == y[i : i + chunk]).sum()
            totals[2] += len(out)
        self.comm.sum_(totals)
        self.model.train()
        return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit-for-bit (this process's share of it)."""
        return {
            "config": self.config.to_dict(),
            "rank": self.comm.rank,
            "model": self.model.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "samplers": {cid: s.state_dict() for cid, s in self.samplers.items()},
            "participation_rng": self.participation_rng.get_state(),
            "counters": {name: getattr(self, name) for name in _COUNTERS},
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.config.to_dict()
        if state["config"] != mine:
            changed = sorted(k for k in mine if state["config"].get(k) != mine[k])
            raise ValueError(f"checkpoint was written by a different configuration (fields differ: {changed})")
        self.model.load_state_dict(state["model"])
        self.algorithm.load_state_dict(state["algorithm"])
        for cid, s in state["samplers"].items():
            self.samplers[int(cid)].load_state_dict(s)
        self.participation_rng.set_state(state["participation_rng"])
        for name in _COUNTERS:
            setattr(self, name, state["counters"][name])
        self.history = list(state["history"])


_COUNTERS = (
    "evaluation",
    "steps",
    "rounds",
    "examples",
    "communications",
    "messages",
    "values_sent",
    "wall_time",
    "status",
)


def _mean_alignment(alignments: list[dict]) -> dict:
    nan = float("nan")
    if not alignments:
        return {k: nan for k in (*_ALIGNMENT_KEYS, "gns_simple")}
    out = {}
    for key in _ALIGNMENT_KEYS:
        values = [a[key] for a in alignments if math.isfinite(a[key])]
        out[key] = sum(values) / len(values) if values else nan
    # McCandlish et al.: average numerator and denominator separately, then divide.
    trace, grad_sq = out["gns_trace"], out["gns_grad_sq"]
    out["gns_simple"] = trace / grad_sq if math.isfinite(trace) and math.isfinite(grad_sq) and grad_sq != 0 else nan
    return out
