"""Federated algorithms: K local steps per participating client, then the server steps on the averaged update.

All clients of a process run their local steps together: their parameters are rows of one [clients, P] matrix and
each local step is one vmapped gradient evaluation. The server optimizer (SGD with `server_lr` and momentum) steps
on the pseudo-gradient Δ = (1/|S|) Σ_i (start_i - y_i^K), so with K = 1, server_lr = 1 and full participation
FedAvg is large-batch SGD and FedGA is GradAlign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .algorithm_base import Algorithm, RoundBatch, StepResult, refuse_batchnorm
from .functional import Alignment, Params, displaced_params, flatten_rows, param_dict, sum_clients


class FederatedAlgorithm(Algorithm):
    """FedAvg's round; subclasses change the local direction or the starting points."""

    federated = True

    def make_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay acts in the local steps; the server applies the averaged update.
        c = self.config
        return torch.optim.SGD(self.model.parameters(), lr=c.server_lr, momentum=c.momentum)

    def set_lr_scale(self, scale: float) -> None:
        """The schedule scales the clients' local step size; the server step size stays."""
        self.lr_scale = scale

    def starts(self, params: Params, batch: RoundBatch) -> tuple[Params | None, float | None, Alignment | None]:
        """Each local client's starting point (None: all start at x), plus the loss and diagnostics if computed."""
        return None, None, None

    def local_direction(self, grads: Params, local: Params, params: Params, batch: RoundBatch) -> Params:
        return grads

    def extra_sums(self, params: Params, final: Params, batch: RoundBatch) -> Tensor:
        """Further local sums to all-reduce with the update (SCAFFOLD's control-variate change)."""
        return next(iter(params.values())).new_zeros(0)

    def apply_extra(self, summed: Tensor, batch: RoundBatch) -> None:
        """Use the all-reduced `extra_sums` (SCAFFOLD: update the server control variate)."""

    def step(self, batch: RoundBatch) -> StepResult:
        c = self.config
        params = param_dict(self.model)
        start, loss, alignment = self.starts(params, batch)
        local = start if start is not None else params
        first_losses = None
        for k in range(c.local_steps):
            shared = k == 0 and start is None  # every client at x: one shared-parameter evaluation
            grads, losses = self.client_grads(local, batch.inputs[:, k], batch.targets[:, k], per_client=not shared)
            if shared:
                first_losses = losses
                if batch.diagnose:  # these are the g_i(x) of the diagnostics
                    _, alignment, _ = self.reduce_moments(grads, losses, batch, counted=False)
            direction = self.local_direction(grads, local, params, batch)
            decay = c.weight_decay
            lr = c.lr * self.lr_scale
            local = {n: local[n] - lr * (direction[n] + decay * local[n] if decay else direction[n]) for n in grads}
        origin = start if start is not None else params
        update = sum_clients({n: origin[n] - local[n] for n in local})
        extra = self.extra_sums(params, local, batch)
        loss_sum = first_losses.sum().reshape(1) if first_losses is not None else update.new_zeros(1)
        packed = self.all_reduce(torch.cat([update, extra, loss_sum]))
        size = self.layout.size
        self.server_step(packed[:size] / batch.num_participants)
        self.apply_extra(packed[size:-1], batch)
        if loss is None:
            loss = packed[-1].item() / batch.num_participants
        return StepResult(loss, c.local_steps, alignment, self.take_traffic(batch))


class FedAvg(FederatedAlgorithm):
    name = "fedavg"


class FedProx(FederatedAlgorithm):
    """FedAvg whose local objective adds mu/2 ||y - x||^2, so each local gradient gains mu (y - x)."""

    name = "fedprox"

    def local_direction(self, grads, local, params, batch):
        mu = self.config.mu
        return {n: grads[n] + mu * (local[n] - params[n]) for n in grads} if mu else grads


class Scaffold(FederatedAlgorithm):
    """SCAFFOLD (Karimireddy et al. 2020, option II): local steps corrected by control variates c - c_i."""

    name = "scaffold"

    def __init__(self, model, loss_fn, config, comm=None):
        super().__init__(model, loss_fn, config, comm)
        reference = next(model.parameters())
        size = self.layout.size
        self.server_control = reference.new_zeros(size)
        self.client_controls = {cid: reference.new_zeros(size) for cid in self.comm.local_clients(config.clients)}

    def _controls(self, batch: RoundBatch) -> Tensor:
        rows = [self.client_controls[cid] for cid in batch.client_ids]
        return torch.stack(rows) if rows else self.server_control.new_zeros(0, self.layout.size)

    def local_direction(self, grads, local, params, batch):
        correction = self.layout.unflatten(self.server_control.unsqueeze(0) - self._controls(batch))
        return {n: grads[n] + correction[n] for n in grads}

    def extra_sums(self, params, final, batch):
        c = self.config
        old = self._controls(batch)
        x = torch.cat([p.reshape(-1) for p in params.values()])
        new = old - self.server_control + (x - flatten_rows(final)) / (c.local_steps * c.lr * self.lr_scale)
        for row, cid in enumerate(batch.client_ids):
            self.client_controls[cid] = new[row].clone()
        return (new - old).sum(0)

    def apply_extra(self, summed, batch):
        # c <- c + (|S| / N) * mean_S Δc_i = c + (1/N) * sum_S Δc_i
        self.server_control += summed / self.config.clients

    def state_dict(self):
        return {
            **super().state_dict(),
            "server_control": self.server_control.clone(),
            "client_controls": {cid: v.clone() for cid, v in self.client_controls.items()},
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.server_control = state["server_control"].clone()
        self.client_controls = {int(cid): v.clone() for cid, v in state["client_controls"].items()}


class FedGA(FederatedAlgorithm):
    """FedGA: each client starts its K local steps from GradAlign's displaced point x - beta (ḡ - g_i)."""

    name = "fedga"
    communications_per_update = 2

    def __init__(self, model, loss_fn, config, comm=None):
        refuse_batchnorm(model, config)
        super().__init__(model, loss_fn, config, comm)

    def starts(self, params, batch):
        grads, losses = self.client_grads(params, batch.inputs[:, 0], batch.targets[:, 0])
        mean_grad, alignment, loss = self.reduce_moments(grads, losses, batch, cosine=batch.diagnose)
        return displaced_params(params, grads, self.layout.unflatten(mean_grad), self.config.beta), loss, alignment
