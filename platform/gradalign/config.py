"""Validated run configuration.

One flat, frozen dataclass describes a training run, so that it maps one-to-one onto a Ray Tune / Optuna
config dict (`TrainConfig.from_dict`, `asdict`). It validates itself at construction and names the field and
the value that are wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("digits", "synthetic", "mnist", "fashion_mnist", "emnist", "cifar10", "cifar100", "mnist1d")
MODELS = ("mlp", "cnn", "lenet", "resnet18", "logistic")
ALGORITHMS = ("sgd", "large_batch_sgd", "gradalign", "fedavg", "fedprox", "scaffold", "fedga")
FEDERATED_ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedga")
# Algorithms that evaluate per-client gradients at displaced parameters.
ALIGNING_ALGORITHMS = ("gradalign", "fedga")
LR_SCHEDULES = ("constant", "linear", "cosine")
PARTITIONS = ("iid", "dirichlet", "dirichlet_by_class", "sorted", "one_class", "natural")
DTYPES = ("float32", "float64")


class ConfigError(ValueError):
    """A configuration field holds a value that cannot work. The message names the field and the value."""

    def __init__(self, field_name: str, value: Any, reason: str):
        self.field = field_name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field_name}={value!r}: {reason}")


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(name, value, f"must be one of {', '.join(valid)}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, model, algorithm, hyperparameters and budget."""

    dataset: str = "digits"
    """Dataset name: one of DATASETS. `digits` (scikit-learn's bundled 8x8 digits) needs no download."""
    num_samples: int | None = None
    """Examples generated for procedurally generated datasets (mnist1d: None = the canonical 5,000, split
    4,000/1,000)."""
    model: str = "mlp"
    """Model name: one of MODELS."""
    algorithm: str = "gradalign"
    """Training algorithm: one of ALGORITHMS."""
    batch_size: int = 128
    """Global batch per update, summed over all clients; each client's (micro-)batch is batch_size // clients."""
    clients: int = 8
    """Number of clients m (micro-batches for data-parallel algorithms, data-holding clients for federated ones)."""
    lr: float = 0.1
    """Step size: of the server optimizer for data-parallel algorithms, of the local steps for federated ones."""
    beta: float | None = None
    """Alignment coefficient of GradAlign / FedGA; None means lr / 2 (matches small-batch SGD's implicit
    regulariser)."""
    momentum: float = 0.0
    """Heavy-ball momentum of the server optimizer, in [0, 1)."""
    lr_schedule: str = "constant"
    """How the step size changes over the budget: 'constant', or 'linear' / 'cosine' decay to zero at the end."""
    warmup: float = 0.0
    """Fraction of the budget's updates over which the step size rises linearly from 0 (large batches need it)."""
    weight_decay: float = 0.0
    """L2 weight decay (server optimizer for data-parallel algorithms, local steps for federated ones)."""
    local_steps: int = 1
    """K: local steps per client and round (federated algorithms)."""
    mu: float = 0.0
    """FedProx proximal coefficient: mu/2 ||y - x||^2 enters every local gradient."""
    participation: float = 1.0
    """Fraction of clients that take part in each round, in (0, 1] (federated algorithms)."""
    server_lr: float = 1.0
    """Server step size applied to the averaged client update (federated algorithms)."""
    epochs: float = 5.0
    """Budget in passes over the training split: the run lasts ceil(epochs * n_train / examples per update) updates.
    Ignored when `budget_examples` or `budget_steps` is set."""
    budget_examples: int | None = None
    """Budget in training examples: ceil(budget_examples / examples per update) updates (exact when it divides).
    Studies set it so that every cell sees the same number of examples, whatever the batch size."""
    budget_steps: int | None = None
    """Budget in updates of the global model (one per round: small-batch SGD's sequential micro-steps and the
    federated local steps do not count separately). Excludes `budget_examples`."""
    eval_points: int = 40
    """Evaluations per run, log-spaced in updates (the last update always included), so that steps to a target are
    resolved finely early in training as well as late."""
    eval_every: int | None = None
    """Evaluate every this many updates instead (a linear schedule; the last update always included)."""
    val_fraction: float = 0.1
    """Fraction of the training data held out as the validation split (stratified by label, never trained on).
    Tuning decisions read the validation metrics; the test split is only reported. 0 disables it."""
    split_seed: int = 0
    """Seed of the train/validation split: the same for every run seed, so all runs are scored on one split."""
    partition: str = "iid"
    """How training examples are split over clients: one of PARTITIONS."""
    alpha: float = 0.5
    """Dirichlet concentration for partition='dirichlet' (each client's label mix ~ Dir(alpha * global mix), equal
    client sizes; Hsu et al. 2019) and 'dirichlet_by_class'; smaller = more heterogeneous."""
    iid_fraction: float = 0.0
    """For partition='sorted' (the paper's split): fraction p of the data spread iid, the rest sorted by label and
    cut."""
    heterogeneity: float = 1.0
    """For dataset='synthetic': how different the clients' data are (0 = identical distributions)."""
    seed: int = 0
    """Seed of model initialisation, partitioning over clients, client participation and batch order."""
    dtype: str = "float32"
    """Floating-point type of model and data: float32 or float64."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    diag_every: int = 10
    """Compute the alignment diagnostics every this many updates and on each epoch's first update. GradAlign and
    FedGA get V, |ḡ|^2 and B_simple free on every update; their mean pairwise cosine, which costs a second P-sized
    moment in the first all-reduce, follows this schedule too."""
    vmap: bool = True
    """Compute per-client gradients batched with torch.func.vmap; False uses a per-client loop (same numbers)."""
    data_dir: str = "data"
    """Where downloadable datasets live (and are downloaded to when download is allowed)."""
    download: bool = False
    """Allow downloading datasets that are not yet in data_dir."""
    extras: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Free-form keys carried along (e.g. study bookkeeping); not used by training."""

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, DATASETS)
        _choice("model", self.model, MODELS)
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("partition", self.partition, PARTITIONS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not _finite(self.warmup) or not 0 <= self.warmup < 1:
            raise ConfigError("warmup", self.warmup, "must lie in [0, 1): a fraction of the budget")
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        for name in ("batch_size", "clients", "local_steps", "diag_every", "eval_points"):
            value = getattr(self, name)
            if not _positive_int(value):
                reason = "K (local steps) must be >= 1" if name == "local_steps" else "must be a positive integer"
                raise ConfigError(name, value, reason)
        for name in ("budget_examples", "budget_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ConfigError(name, value, "must be a positive integer or None")
        if self.budget_examples is not None and self.budget_steps is not None:
            raise ConfigError(
                "budget_steps",
                self.budget_steps,
                f"a run's budget is in examples or in steps, not both (budget_examples={self.budget_examples})",
            )
        if not _finite(self.epochs) or self.epochs <= 0:
            raise ConfigError("epochs", self.epochs, "must be a positive finite number")
        if not _finite(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", self.val_fraction, "must lie in [0, 1)")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(name, value, "must be an integer >= 0")
        if self.batch_size % self.clients:
            raise ConfigError(
                "batch_size",
                self.batch_size,
                f"must be divisible by clients={self.clients} (each client gets batch_size // clients examples)",
            )
        for name in ("lr", "server_lr"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ConfigError(name, value, "must be a positive finite number")
        if self.beta is None:
            object.__setattr__(self, "beta", self.lr / 2)
        if not _finite(self.beta) or self.beta < 0:
            raise ConfigError("beta", self.beta, "must be a finite number >= 0")
        if not _finite(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError("momentum", self.momentum, "must lie in [0, 1)")
        for name in ("weight_decay", "mu", "iid_fraction", "heterogeneity"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ConfigError(name, value, "must be a finite number >= 0")
        if self.iid_fraction > 1:
            raise ConfigError("iid_fraction", self.iid_fraction, "must lie in [0, 1]")
        if not _finite(self.participation) or not 0 < self.participation <= 1:
            raise ConfigError("participation", self.participation, "must lie in (0, 1]")
        if not _finite(self.alpha) or self.alpha <= 0:
            raise ConfigError("alpha", self.alpha, "Dirichlet alpha must be > 0")
        if self.num_samples is not None:
            if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
                raise ConfigError("num_samples", self.num_samples, "must be a positive integer or None")
            if self.dataset != "mnist1d":
                raise ConfigError(
                    "num_samples",
                    self.num_samples,
                    f"only generated datasets (mnist1d) take it, not dataset={self.dataset!r}",
                )
            if self.num_samples % 10:
                raise ConfigError(
                    "num_samples",
                    self.num_samples,
                    "mnist1d generates as many examples of each of its 10 digits: a multiple of 10",
                )
        if self.partition == "natural" and self.dataset != "synthetic":
            raise ConfigError("partition", self.partition, "'natural' exists only for dataset='synthetic'")
        if self.algorithm not in FEDERATED_ALGORITHMS:
            if self.local_steps != 1:
                raise ConfigError(
                    "local_steps", self.local_steps, f"only federated algorithms take K > 1, not {self.algorithm}"
                )
            if self.participation != 1:
                raise ConfigError(
                    "participation",
                    self.participation,
                    f"only federated algorithms sample clients, not {self.algorithm}",
                )

    # -- derived quantities -------------------------------------------------------------------------------------
    @property
    def client_batch_size(self) -> int:
        """b: examples per client (micro-)batch."""
        return self.batch_size // self.clients

    @property
    def clients_per_round(self) -> int:
        """How many clients take part in each round."""
        return max(1, round(self.participation * self.clients))

    @property
    def is_federated(self) -> bool:
        return self.algorithm in FEDERATED_ALGORITHMS

    @property
    def examples_per_update(self) -> int:
        """Training examples consumed by one update (one round for federated algorithms)."""
        return self.clients_per_round * self.local_steps * self.client_batch_size

    # -- conversion ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extras"}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a Tune config); keys that are not fields go to `extras`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        known = {k: _plain(v) for k, v in values.items() if k in names}
        extras = {k: v for k, v in values.items() if k not in names}
        return cls(**known, extras=extras)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """The docstring under each dataclass field (the `--help` text of the command-line tools)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: Any) -> Any:
    """numpy scalars (as Optuna/Tune hand them over) to Python scalars, so type checks behave."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (str, bytes)) else value
