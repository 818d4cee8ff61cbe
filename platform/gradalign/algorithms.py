"""GradAlign and its baselines, each a small class with one `step` over one round of client batches.

Every algorithm holds the clients of its own process (`RoundBatch`), computes local sums and turns them into
means over all participating clients with `comm.sum_` (one flat all-reduce per communication). The step on the
averaged direction is taken by a server optimizer (torch SGD with momentum and weight decay), so that β = 0,
K = 1 and m = 1 reduce exactly to the simpler algorithms.

This module holds the data-parallel ones (SGD, large-batch SGD, GradAlign) and the table of all algorithms
(`ALGORITHM_CLASSES`, `build_algorithm`); the federated ones are in `gradalign.federated`, their interface in
`gradalign.algorithm_base` (whose names are re-exported here).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import fast_paths
from .algorithm_base import Algorithm, RoundBatch, StepResult, Traffic, refuse_batchnorm
from .comm import LocalComm
from .config import TrainConfig
from .federated import FedAvg, FedGA, FedProx, Scaffold
from .functional import (
    Alignment,
    LossFn,
    ParamLayout,
    alignment_from_moments,
    displace_,
    gradient_moments,
    param_dict,
    sum_clients,
    write_flat_grads_,
)

__all__ = [
    "ALGORITHM_CLASSES",
    "Algorithm",
    "FedAvg",
    "FedGA",
    "FedProx",
    "GradAlign",
    "LargeBatchSGD",
    "RoundBatch",
    "SGD",
    "Scaffold",
    "StepResult",
    "Traffic",
    "build_algorithm",
    "communications_per_update",
    "refuse_batchnorm",
]


class SGD(Algorithm):
    """Small-batch SGD: the clients' batches visited one after another, one optimizer step each."""

    name = "sgd"

    def step(self, batch: RoundBatch) -> StepResult:
        alignment = None
        if batch.diagnose:
            grads, losses = self.client_grads(param_dict(self.model), batch.inputs[:, 0], batch.targets[:, 0])
            _, alignment, _ = self.reduce_moments(grads, losses, batch, counted=False)
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
        self._sent = []
        # One worker trains alone; m clients in turn pass the model on: one message of P + 1 values per step.
        n = len(losses) if self.config.clients > 1 else 0
        traffic = Traffic(n, n, n * (self.layout.size + 1))
        return StepResult(torch.stack(losses).mean().item(), len(losses), alignment, traffic)


class LargeBatchSGD(Algorithm):
    """One step on the mean gradient ḡ of all clients' batches (one big batch)."""

    name = "large_batch_sgd"

    def step(self, batch: RoundBatch) -> StepResult:
        if batch.diagnose:
            grads, losses = self.client_grads(param_dict(self.model), batch.inputs[:, 0], batch.targets[:, 0])
            # (the same P + 1 values as the plain path below are counted: the rest are diagnostics)
            mean_grad, alignment, loss = self.reduce_moments(grads, losses, batch, counted=self.layout.size + 1)
            self.server_step(mean_grad)
            return StepResult(loss, 1, alignment, self.take_traffic(batch))
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
            self.all_reduce(packed)
            write_flat_grads_(self.model, packed[:-1])
            loss_value = packed[-1]
        else:  # (one process: the sum over clients is the backward pass itself; the exchange is still counted)
            self._sent.append(self.layout.size + 1)
        self.optimizer.step()
        return StepResult(loss_value.item(), 1, None, self.take_traffic(batch))


class GradAlign(Algorithm):
    """x+ = x - lr * (1/m) sum_i grad f_i(x - beta (ḡ - g_i)): two gradient evaluations, two all-reduces.

    The alignment diagnostics V, |ḡ|^2 and B_simple come free with every step; the mean pairwise cosine, which
    needs a second P-sized moment in the first all-reduce, only on steps with `batch.diagnose`.

    Paths (`self.path`, the same numbers): 'fast' (models of Linear/Conv1d/Conv2d/GroupNorm layers, see
    `fast_paths`: each evaluation is one forward/backward over all local examples and the displaced gradients are
    summed in the backward pass), 'vmap' (per-client `torch.func.vmap`, any vmap-compatible model), 'loop'
    (config.vmap=False).
    `fast_path=False` rules out the fast one; a model that turns out to use a parameter outside the supported
    layers falls back to 'vmap' (`self.fallback_reason` says why).
    """

    name = "gradalign"
    communications_per_update = 2

    def __init__(self, model, loss_fn, config, comm=None, fast_path: bool = True):
        refuse_batchnorm(model, config)
        super().__init__(model, loss_fn, config, comm)
        if not config.vmap:
            self.path, self.fallback_reason = "loop", "config.vmap is False"
        elif not fast_path:
            self.path, self.fallback_reason = "vmap", "fast_path=False"
        else:
            self.fallback_reason = fast_paths.unsupported_reason(model)
            self.path = "vmap" if self.fallback_reason else "fast"
        self._mean_loss: bool | None = None  # whether loss_fn is a mean over examples (checked on the first step)
        self._buffers: _FastBuffers | None = None

    def step(self, batch: RoundBatch) -> StepResult:
        inputs, targets = batch.inputs[:, 0], batch.targets[:, 0]
        if self.path == "fast" and inputs.shape[0]:
            try:
                return self._fast_step(batch, inputs, targets)
            except fast_paths.Unsupported as err:  # raised before any communication: fall back for good
                self.path, self.fallback_reason = "vmap", str(err)
        params = param_dict(self.model)
        grads, losses = self.client_grads(params, inputs, targets)
        mean_grad, alignment, loss = self.reduce_moments(grads, losses, batch, cosine=batch.diagnose)
        displaced = displace_(params, grads, self.layout.unflatten(mean_grad), self.config.beta)
        aligned, _ = self.client_grads(displaced, inputs, targets, per_client=True)
        return self._finish(sum_clients(aligned), batch, loss, alignment)

    def _fast_step(self, batch: RoundBatch, inputs: Tensor, targets: Tensor) -> StepResult:
        beta, cosine, m = self.config.beta, batch.diagnose, inputs.shape[0]
        # All P-sized memory is kept from step to step (`_FastBuffers`): the per-client gradients go straight from
        # the backward pass into their buffer, where they become the displaced points in place; ḡ and then
        # x - beta ḡ are computed in place in the all-reduced moments; the direction's views are the .grad. Linear
        # weights with few rows per client stay factors (fast_paths.FactoredGrads) and never fill their part.
        buffers = self._fast_buffers(m)
        params = buffers.params
        grads, loss_sum, mean_ok = fast_paths.client_gradients(
            self.model, self.loss_fn, inputs, targets, self._mean_loss, out=buffers.rows, factored=True, params=params
        )
        if self._mean_loss is None:
            self._mean_loss = mean_ok
        size = self.layout.size
        moments = (2 if cosine else 1) * size + 1
        packed = buffers.moments[: moments + 1]
        gradient_moments(grads, out=packed[:-1], cosine=cosine)
        packed[-1] = loss_sum
        self.all_reduce(packed, size + 2)  # (ḡ, Σ|g_i|^2 and the loss; a cosine's moment is a diagnostic)
        participants = batch.num_participants
        _, alignment = alignment_from_moments(
            packed[:-1], participants, self.config.client_batch_size, cosine=cosine, divide=False
        )  # (1/m folded into the next two uses: no P-sized pass)
        loss = packed[-1].item() / participants
        values = {n: p.detach() for n, p in params.items()}  # (taken now: `p.data = ...` may have swapped storage)
        points = fast_paths.displaced_points(
            values, grads, buffers.mean, beta, overwrite=True, mean_scale=1 / participants
        )
        try:
            fast_paths.displaced_gradient_sum(
                self.model,
                self.loss_fn,
                points,
                inputs,
                targets,
                self._mean_loss,
                out=buffers.direction_views,
                params=params,
                grad_scale=1 / participants,
            )
        except fast_paths.Unsupported as err:  # (the first evaluation passed: hardly ever) finish this step with vmap
            self.path, self.fallback_reason = "vmap", str(err)
            rows = buffers.rows
            for n, point in points.items():
                if isinstance(point, fast_paths.Factored):  # Z_i = shift + beta g_i, as [m, out, in] values
                    torch.add(point.shift, point.grads.materialize(rows[n]), alpha=beta, out=rows[n])
            return self._finish(
                sum_clients(self.client_grads(rows, inputs, targets, per_client=True)[0]), batch, loss, alignment
            )
        return self._finish(buffers.direction, batch, loss, alignment, scaled=True)

    def _fast_buffers(self, clients: int) -> _FastBuffers:
        buffers = self._buffers
        if (
            buffers is None
            or buffers.clients != clients
            or buffers.first.dtype != buffers.dtype
            or buffers.first.device != buffers.device
        ):
            self._buffers = None  # (let the old ones go first)
            self._buffers = buffers = _FastBuffers(self.model, self.layout, clients)
        return buffers

    def _finish(
        self, local_sum: Tensor, batch: RoundBatch, loss: float, alignment: Alignment, scaled: bool = False
    ) -> StepResult:
        # local_sum is this step's own tensor: all-reduce and scale it in place (unless `scaled`: already divided by
        # the number of participants), and hand the optimizer views of it
        direction = self.all_reduce(local_sum)
        if not scaled:
            direction.div_(batch.num_participants)
        buffers = self._buffers
        if buffers is not None and direction is buffers.direction:
            for p, g in buffers.grads:
                if p.grad is not g:
                    p.grad = g
        else:
            for p, g in zip(self.model.parameters(), self.layout.to_list(direction)):
                p.grad = g
        self.optimizer.step()
        return StepResult(loss, 1, alignment, self.take_traffic(batch))


class _FastBuffers:
    """The fast step's memory, kept from step to step (no P-sized allocation per step).

    `rows`: per-client gradients ([clients, ...] by name, each a contiguous block of one clients x P buffer), then
    the displaced points; `moments`: room for the all-reduced moments (2P + 2 values), whose first P values become
    ḡ and then x - beta ḡ (`mean`, by name); `direction`: the update direction, whose views (`grads`) are the
    parameters' .grad. `params`: the model's parameters by name, as the optimizer holds them.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, clients: int):
        self.params = dict(model.named_parameters())
        self.first = first = next(iter(self.params.values()))  # (model.to(...) changes its dtype/device in place)
        self.clients, self.dtype, self.device = clients, first.dtype, first.device
        size = layout.size
        self.rows = layout.stacked(first.new_empty(clients * size), clients)
        self.moments = first.new_empty(2 * size + 2)
        self.mean = layout.unflatten(self.moments[:size])
        self.direction = first.new_empty(size)
        self.direction_views = layout.unflatten(self.direction)
        self.grads = [(p, self.direction_views[n]) for n, p in self.params.items()]


ALGORITHM_CLASSES: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (SGD, LargeBatchSGD, GradAlign, FedAvg, FedProx, Scaffold, FedGA)
}
"""Every algorithm by its `config.algorithm` name."""


def communications_per_update(config: TrainConfig) -> int:
    """Collective exchanges per update of `config`'s algorithm (small-batch SGD: one per micro-step when several
    clients take turns, none for one worker alone)."""
    if config.algorithm == "sgd":
        return config.clients if config.clients > 1 else 0
    return ALGORITHM_CLASSES[config.algorithm].communications_per_update


def build_algorithm(model: nn.Module, loss_fn: LossFn, config: TrainConfig, comm: LocalComm | None = None) -> Algorithm:
    return ALGORITHM_CLASSES[config.algorithm](model, loss_fn, config, comm)
