"""GradAlign and its baselines, each a small class with one `step` over one round of client batches.

Every algorithm holds the clients of its own process (`RoundBatch`), computes local sums and turns them into
means over all participating clients with `comm.sum_` (one flat all-reduce per communication). The step on the
averaged direction is taken by a server optimizer (torch SGD with momentum and weight decay), so that β = 0,
K = 1 and m = 1 reduce exactly to the simpler algorithms.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .comm import LocalComm
from .config import TrainConfig
from .functional import (
    Alignment, LossFn, ParamLayout, Params, alignment_from_moments, client_gradients, displaced_params,
    gradient_moments, make_grad_fn, param_dict, sum_clients, write_flat_grads_,
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


@dataclass
class StepResult:
    loss: float
    """Mean training loss over the participating clients, at the parameters before the update."""
    steps: int
    """Sequential parameter-update steps taken (m for small-batch SGD, K for federated rounds, else 1)."""
    alignment: Alignment | None


class Algorithm(abc.ABC):
    """Base class: server optimizer, per-client gradients, and the all-reduce of their moments."""

    name = ""
    federated = False

    def __init__(self, model: nn.Module, loss_fn: LossFn, config: TrainConfig, comm: LocalComm | None = None):
        if config.algorithm != self.name:
            raise ValueError(f"{type(self).__name__} runs algorithm {self.name!r}, config asks for {config.algorithm!r}")
        self.model, self.loss_fn, self.config = model, loss_fn, config
        self.comm = comm or LocalComm()
        self.layout = ParamLayout.of(model)
        self.grad_fn = make_grad_fn(model, loss_fn)
        self.optimizer = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

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
    def client_grads(self, params: Params, inputs: Tensor, targets: Tensor, per_client: bool = False) -> tuple[Params, Tensor]:
        """Per-client gradients by name ([local clients, ...]) and losses, at shared or per-client `params`."""
        if inputs.shape[0] == 0:
            shapes = {n: t.shape[1:] if per_client else t.shape for n, t in params.items()}
            return {n: params[n].new_zeros(0, *shapes[n]) for n in params}, inputs.new_zeros(0, dtype=self.dtype)
        return client_gradients(self.grad_fn, params, inputs, targets, per_client=per_client, use_vmap=self.config.vmap)

    def reduce_moments(self, grads: Params, losses: Tensor, batch: RoundBatch) -> tuple[Tensor, Alignment, float]:
        """One all-reduce of the clients' gradient moments and losses -> (ḡ, alignment diagnostics, mean loss)."""
        packed = torch.cat([gradient_moments(grads), losses.sum().reshape(1)])
        self.comm.sum_(packed)
        mean_grad, alignment = alignment_from_moments(packed[:-1], batch.num_participants, self.config.client_batch_size)
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


class SGD(Algorithm):
    """Small-batch SGD: the clients' batches visited one after another, one optimizer step each."""

    name = "sgd"

    def step(self, batch: RoundBatch) -> StepResult:
        alignment = None
        if batch.diagnose:
            grads, losses = self.client_grads(param_dict(self.model), batch.inputs[:, 0], batch.targets[:, 0])
            _, alignment, _ = self.reduce_moments(grads, losses, batch)
        position = {cid: j for j, cid in enumerate(batch.client_ids)}
        order = sorted(position) if self.comm.world_size == 1 else range(self.config.clients)
        losses = []
        for cid in order:  # every process walks all clients; the owner contributes the gradient
            packed = torch.zeros(self.layout.size + 1, dtype=self.dtype, device=self.device)
            if cid in position:
                j = position[cid]
                grad, loss = self.grad_fn(param_dict(self.model), batch.inputs[j, 0], batch.targets[j, 0])
                packed[:-1], packed[-1] = self.layout.flatten(list(grad.values())), loss
            if self.comm.world_size > 1:
                self.comm.sum_(packed)
            self.server_step(packed[:-1])
            losses.append(packed[-1])
        return StepResult(torch.stack(losses).mean().item(), len(losses), alignment)


class LargeBatchSGD(Algorithm):
    """One step on the mean gradient ḡ of all clients' batches (one big batch)."""

    name = "large_batch_sgd"

    def step(self, batch: RoundBatch) -> StepResult:
        if batch.diagnose:
            grads, losses = self.client_grads(param_dict(self.model), batch.inputs[:, 0], batch.targets[:, 0])
            mean_grad, alignment, loss = self.reduce_moments(grads, losses, batch)
            self.server_step(mean_grad)
            return StepResult(loss, 1, alignment)
        # The plain fast path: one backward over the concatenated batch (equal client batches, so the mean over
        # examples is the mean over clients), scaled to this process's share, then one all-reduce.
        local = len(batch.client_ids)
        self.optimizer.zero_grad(set_to_none=False)
        if local:
            outputs = self.model(batch.inputs[:, 0].flatten(0, 1))
            loss = self.loss_fn(outputs, batch.targets[:, 0].flatten(0, 1)) * (local / batch.num_participants)
            loss.backward()
            loss_value = loss.detach()
        else:
            loss_value = torch.zeros((), dtype=self.dtype, device=self.device)
        if self.comm.world_size > 1:
            packed = torch.cat([self.layout.flatten([p.grad for p in self.model.parameters()]), loss_value.reshape(1)])
            self.comm.sum_(packed)
            write_flat_grads_(self.model, packed[:-1])
            loss_value = packed[-1]
        self.optimizer.step()
        return StepResult(loss_value.item(), 1, None)


class GradAlign(Algorithm):
    """x+ = x - lr * (1/m) sum_i grad f_i(x - beta (ḡ - g_i)): two gradient evaluations, two all-reduces."""

    name = "gradalign"

    def __init__(self, model, loss_fn, config, comm=None):
        refuse_batchnorm(model, config)
        super().__init__(model, loss_fn, config, comm)

    def step(self, batch: RoundBatch) -> StepResult:
        params = param_dict(self.model)
        inputs, targets = batch.inputs[:, 0], batch.targets[:, 0]
        grads, losses = self.client_grads(params, inputs, targets)
        mean_grad, alignment, loss = self.reduce_moments(grads, losses, batch)
        displaced = displaced_params(params, grads, self.layout.unflatten(mean_grad), self.config.beta)
        del grads
        aligned, _ = self.client_grads(displaced, inputs, targets, per_client=True)
        direction = self.comm.sum_(sum_clients(aligned)) / batch.num_participants
        self.server_step(direction)
        return StepResult(loss, 1, alignment)


ALGORITHM_CLASSES: dict[str, type[Algorithm]] = {cls.name: cls for cls in (SGD, LargeBatchSGD, GradAlign)}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHM_CLASSES[cls.name] = cls
    return cls


def build_algorithm(model: nn.Module, loss_fn: LossFn, config: TrainConfig, comm: LocalComm | None = None) -> Algorithm:
    from . import federated  # noqa: F401  (registers the federated algorithms)

    return ALGORITHM_CLASSES[config.algorithm](model, loss_fn, config, comm)
