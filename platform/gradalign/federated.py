"""Federated algorithms: K local steps per participating client, then the server steps on the averaged update.

All clients of a process run their local steps together: their parameters are rows of one [clients, P] matrix and
each local step is one vmapped gradient evaluation. The server optimizer (SGD with `server_lr` and momentum) steps
on the pseudo-gradient Δ = (1/|S|) Σ_i (start_i - y_i^K), so with K = 1, server_lr = 1 and full participation
FedAvg is large-batch SGD and FedGA is GradAlign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .algorithms import Algorithm, RoundBatch, StepResult, refuse_batchnorm, register
from .functional import Alignment, displaced_params, flat_params


class FederatedAlgorithm(Algorithm):
    """FedAvg's round; subclasses change the local direction or the starting points."""

    federated = True

    def make_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay acts in the local steps; the server applies the averaged update.
        c = self.config
        return torch.optim.SGD(self.model.parameters(), lr=c.server_lr, momentum=c.momentum)

    def starts(self, params: Tensor, batch: RoundBatch) -> tuple[Tensor, float | None, Alignment | None]:
        """Each local client's starting point, plus the loss and diagnostics if computing them was needed."""
        return params.expand(len(batch.client_ids), -1), None, None

    def local_direction(self, grads: Tensor, local: Tensor, params: Tensor, batch: RoundBatch) -> Tensor:
        return grads

    def extra_sums(self, params: Tensor, final: Tensor, batch: RoundBatch) -> Tensor:
        """Further local sums to all-reduce with the update (SCAFFOLD's control-variate change)."""
        return params.new_zeros(0)

    def apply_extra(self, summed: Tensor, batch: RoundBatch) -> None:
        pass

    def step(self, batch: RoundBatch) -> StepResult:
        c = self.config
        params = flat_params(self.model)
        start, loss, alignment = self.starts(params, batch)
        local = start
        first_losses = None
        for k in range(c.local_steps):
            grads, losses = self.client_grads(local, batch.inputs[:, k], batch.targets[:, k])
            if k == 0 and loss is None:
                first_losses = losses
                if batch.diagnose:  # at k = 0 every client sits at x: these are the g_i of the diagnostics
                    _, alignment, _ = self.reduce_moments(grads, losses, batch)
            direction = self.local_direction(grads, local, params, batch)
            if c.weight_decay:
                direction = direction + c.weight_decay * local
            local = local - c.lr * direction
        extra = self.extra_sums(params, local, batch)
        loss_sum = first_losses.sum().reshape(1) if first_losses is not None else params.new_zeros(1)
        packed = self.comm.sum_(torch.cat([(start - local).sum(0), extra, loss_sum]))
        size = self.layout.size
        self.server_step(packed[:size] / batch.num_participants)
        self.apply_extra(packed[size:-1], batch)
        if loss is None:
            loss = packed[-1].item() / batch.num_participants
        return StepResult(loss, c.local_steps, alignment)


@register
class FedAvg(FederatedAlgorithm):
    name = "fedavg"


@register
class FedProx(FederatedAlgorithm):
    """FedAvg whose local objective adds mu/2 ||y - x||^2, so each local gradient gains mu (y - x)."""

    name = "fedprox"

    def local_direction(self, grads, local, params, batch):
        return grads + self.config.mu * (local - params)


@register
class Scaffold(FederatedAlgorithm):
    """SCAFFOLD (Karimireddy et al. 2020, option II): local steps corrected by control variates c - c_i."""

    name = "scaffold"

    def __init__(self, model, loss_fn, config, comm=None):
        super().__init__(model, loss_fn, config, comm)
        size = self.layout.size
        reference = flat_params(model)
        self.server_control = reference.new_zeros(size)
        self.client_controls = {cid: reference.new_zeros(size) for cid in self.comm.local_clients(config.clients)}

    def _controls(self, batch: RoundBatch) -> Tensor:
        if not batch.client_ids:
            return self.server_control.new_zeros(0, self.layout.size)
        return torch.stack([self.client_controls[cid] for cid in batch.client_ids])

    def local_direction(self, grads, local, params, batch):
        return grads - self._controls(batch) + self.server_control

    def extra_sums(self, params, final, batch):
        c = self.config
        old = self._controls(batch)
        new = old - self.server_control + (params - final) / (c.local_steps * c.lr)
        for row, cid in enumerate(batch.client_ids):
            self.client_controls[cid] = new[row].clone()
        return (new - old).sum(0)

    def apply_extra(self, summed, batch):
        # c <- c + (|S| / N) * mean_S Δc_i = c + (1/N) * sum_S Δc_i
        self.server_control += summed / self.config.clients

    def state_dict(self):
        return {**super().state_dict(), "server_control": self.server_control.clone(),
                "client_controls": {cid: v.clone() for cid, v in self.client_controls.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.server_control = state["server_control"].clone()
        self.client_controls = {int(cid): v.clone() for cid, v in state["client_controls"].items()}


@register
class FedGA(FederatedAlgorithm):
    """FedGA: each client starts its K local steps from GradAlign's displaced point x - beta (ḡ - g_i)."""

    name = "fedga"

    def __init__(self, model, loss_fn, config, comm=None):
        refuse_batchnorm(model, config)
        super().__init__(model, loss_fn, config, comm)

    def starts(self, params, batch):
        grads, losses = self.client_grads(params, batch.inputs[:, 0], batch.targets[:, 0])
        mean_grad, alignment, loss = self.reduce_moments(grads, losses, batch)
        return displaced_params(params, grads, mean_grad, self.config.beta), loss, alignment
