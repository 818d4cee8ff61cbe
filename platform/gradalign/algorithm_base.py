"""The interface every algorithm implements: `Algorithm` (server optimizer, per-client gradients, the all-reduce
of their moments), what one update takes (`RoundBatch`) and gives back (`StepResult`, `Traffic`).

The algorithms themselves are in `gradalign.algorithms` (SGD, large-batch SGD, GradAlign; the table of all of them)
and `gradalign.federated` (FedAvg, FedProx, SCAFFOLD, FedGA); both build on this module.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .comm import LocalComm
from .config import TrainConfig
from .functional import (
    Alignment,
    LossFn,
    ParamLayout,
    Params,
    alignment_from_moments,
    client_gradients,
    gradient_moments,
    make_grad_fn,
    write_flat_grads_,
)
from .models import has_batchnorm


@dataclass
class RoundBatch:
    """The data of one update (one round), for the clients held by this process."""

    client_ids: list[int]
    """Global ids of this process's participating clients (may be empty)."""
    inputs: Tensor
    """[local clients, K, b, ...]: K local batches of b examples per client (K = 1 for data-parallel algorithms)."""
    targets: Tensor
    """[local clients, K, b]."""
    num_participants: int
    """Participating clients over all processes (the m of the means)."""
    diagnose: bool = False
    """Compute the alignment diagnostics this step."""


@dataclass(frozen=True)
class Traffic:
    """What one update sends, counted as a deployment with one node per client would send it (downloads of the
    model are broadcasts and not counted). Exchanges that only serve the diagnostics are not counted either."""

    communications: int = 0
    """Collective exchanges (all-reduces) in the update: 1 for large-batch SGD and FedAvg, 2 for GradAlign/FedGA."""
    messages: int = 0
    """Messages the clients send: one per participating client per exchange."""
    values: int = 0
    """Numbers the clients send, summed over clients and exchanges (P per client for a gradient)."""

    @classmethod
    def all_reduces(cls, participants: int, sizes: list[int]) -> Traffic:
        """Exchanges of `sizes` values each, every participating client sending its share to each."""
        return cls(len(sizes), len(sizes) * participants, sum(sizes) * participants)


@dataclass
class StepResult:
    loss: float
    """Mean training loss over the participating clients, at the parameters before the update."""
    steps: int
    """Sequential parameter-update steps taken (m for small-batch SGD, K for federated rounds, else 1)."""
    alignment: Alignment | None
    traffic: Traffic = field(default_factory=Traffic)
    """What the update sent."""


class Algorithm(abc.ABC):
    """Base class: server optimizer, per-client gradients, and the all-reduce of their moments."""

    name = ""
    federated = False
    communications_per_update = 1
    """Collective exchanges per update (per round), whatever the diagnostics: what a budget in communications
    divides by. A test checks it against the counted `Traffic`."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, config: TrainConfig, comm: LocalComm | None = None):
        if config.algorithm != self.name:
            raise ValueError(
                f"{type(self).__name__} runs algorithm {self.name!r}, config asks for {config.algorithm!r}"
            )
        self.model, self.loss_fn, self.config = model, loss_fn, config
        self.comm = comm or LocalComm()
        self.layout = ParamLayout.of(model)
        self.grad_fn = make_grad_fn(model, loss_fn)
        self.optimizer = self.make_optimizer()
        self._sent: list[int] = []  # sizes of this update's counted exchanges (see `all_reduce`)
        self.lr_scale = 1.0

    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def set_lr_scale(self, scale: float) -> None:
        """Scale the step size `config.lr` for the next update (the learning-rate schedule's factor)."""
        self.lr_scale = scale
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale

    @abc.abstractmethod
    def step(self, batch: RoundBatch) -> StepResult:
        """Take one update (one round) on `batch` and return its loss and diagnostics."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    # -- shared pieces -------------------------------------------------------------------------------------------
    def all_reduce(self, tensor: Tensor, counted: bool | int = True) -> Tensor:
        """`comm.sum_(tensor)`, recorded in this update's traffic: all its values (`counted=True`), the first
        `counted` ones (an int: the rest are diagnostics riding along), or none (False: diagnostics only)."""
        if counted is not False:
            self._sent.append(tensor.numel() if counted is True else int(counted))
        return self.comm.sum_(tensor)

    def take_traffic(self, batch: RoundBatch) -> Traffic:
        """The traffic of the exchanges recorded since the last call (one update's)."""
        sent, self._sent = self._sent, []
        return Traffic.all_reduces(batch.num_participants, sent)

    def client_grads(
        self, params: Params, inputs: Tensor, targets: Tensor, per_client: bool = False
    ) -> tuple[Params, Tensor]:
        """Per-client gradients by name ([local clients, ...]) and losses, at shared or per-client `params`."""
        if inputs.shape[0] == 0:
            shapes = {n: t.shape[1:] if per_client else t.shape for n, t in params.items()}
            return {n: params[n].new_zeros(0, *shapes[n]) for n in params}, inputs.new_zeros(0, dtype=self.dtype)
        return client_gradients(self.grad_fn, params, inputs, targets, per_client=per_client, use_vmap=self.config.vmap)

    def reduce_moments(
        self, grads: Params, losses: Tensor, batch: RoundBatch, cosine: bool = True, counted: bool | int = True
    ) -> tuple[Tensor, Alignment, float]:
        """One all-reduce of the clients' gradient moments and losses -> (ḡ, alignment diagnostics, mean loss).

        Without `cosine` the all-reduce carries P + 2 values instead of 2P + 2, and the cosine diagnostic is NaN.
        The traffic counts P + 2 values (the cosine's moment is a diagnostic) unless `counted` says otherwise
        (False: the whole exchange only serves the diagnostics; an int: that many values).
        """
        packed = torch.cat([gradient_moments(grads, cosine=cosine), losses.sum().reshape(1)])
        self.all_reduce(packed, self.layout.size + 2 if counted is True else counted)
        mean_grad, alignment = alignment_from_moments(
            packed[:-1], batch.num_participants, self.config.client_batch_size, cosine=cosine
        )
        return mean_grad, alignment, packed[-1].item() / batch.num_participants

    def server_step(self, direction: Tensor) -> None:
        """Let the server optimizer step on a flat direction (a gradient or a pseudo-gradient)."""
        write_flat_grads_(self.model, direction)
        self.optimizer.step()


def refuse_batchnorm(model: nn.Module, config: TrainConfig) -> None:
    """Gradients at displaced parameters would corrupt BatchNorm running statistics: refuse such models."""
    if has_batchnorm(model):
        raise ValueError(
            f"invalid model for algorithm={config.algorithm!r}: it contains BatchNorm, whose running statistics the "
            "displaced gradient evaluations would corrupt; use a model without BatchNorm (all built-in models qualify)"
        )
