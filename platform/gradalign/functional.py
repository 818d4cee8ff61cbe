"""The math, as pure functions over flat parameter vectors.

Every algorithm works on a model's parameters flattened into one vector of length P. Per-client quantities are
stacked into [m, P] matrices, so that one `torch.func.vmap` evaluates all clients' gradients at once, each at its
own (e.g. displaced) parameters, and one all-reduce of a flat buffer communicates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a model's parameters, to move between the module and a flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ParamLayout":
        named = list(model.named_parameters())
        return cls(
            names=tuple(n for n, _ in named),
            shapes=tuple(p.shape for _, p in named),
            numels=tuple(p.numel() for _, p in named),
        )

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of `flat` shaped like the parameters (works under vmap)."""
        pieces = torch.split(flat, self.numels, dim=-1)
        return {n: p.reshape(*flat.shape[:-1], *s) for n, p, s in zip(self.names, pieces, self.shapes)}

    def to_list(self, flat: Tensor) -> list[Tensor]:
        return list(self.unflatten(flat).values())


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def write_flat_params_(model: nn.Module, flat: Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n


def write_flat_grads_(model: nn.Module, flat: Tensor) -> None:
    """Set each parameter's .grad to its slice of `flat` (what an optimizer then steps on)."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def make_grad_fn(model: nn.Module, loss_fn: LossFn, layout: ParamLayout) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(flat_params, inputs, targets) -> (flat gradient, loss), evaluated functionally: the module is not changed."""
    buffers = dict(model.named_buffers())

    def loss_at(flat: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        params = layout.unflatten(flat)
        outputs = functional_call(model, {**params, **buffers}, (inputs,))
        return loss_fn(outputs, targets)

    return grad_and_value(loss_at)


def client_gradients(
    grad_fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    params: Tensor,
    inputs: Sequence[Tensor] | Tensor,
    targets: Sequence[Tensor] | Tensor,
    use_vmap: bool = True,
) -> tuple[Tensor, Tensor]:
    """Each client's gradient and loss: ([m, P], [m]).

    `params` is one flat vector [P] shared by all clients, or one per client [m, P] (e.g. displaced parameters).
    With `use_vmap` and equally sized client batches (stacked tensors) all clients are evaluated in one batched
    call; otherwise a per-client loop computes the same numbers.
    """
    per_client = params.dim() == 2
    stacked = isinstance(inputs, Tensor)
    if use_vmap and stacked:
        grads, losses = vmap(grad_fn, in_dims=(0 if per_client else None, 0, 0))(params, inputs, targets)
        return grads, losses
    results = [grad_fn(params[i] if per_client else params, x, y) for i, (x, y) in enumerate(zip(inputs, targets))]
    return torch.stack([g for g, _ in results]), torch.stack([l for _, l in results])


def displaced_params(params: Tensor, client_grads: Tensor, mean_grad: Tensor, beta: float) -> Tensor:
    """GradAlign's displaced points x - beta (ḡ - g_i), one row per client."""
    return params.unsqueeze(0) - beta * (mean_grad.unsqueeze(0) - client_grads)


@dataclass(frozen=True)
class Alignment:
    """Alignment diagnostics of one step, from the per-client gradients."""

    grad_variance: float
    """V = (1/m) sum_i ||g_i - ḡ||^2."""
    grad_cosine: float
    """Mean pairwise cosine similarity of the client gradients (NaN for one client)."""
    grad_norm_sq: float
    """||ḡ||^2."""
    gns_trace: float
    """McCandlish et al.'s unbiased estimate of tr(Sigma) from the batch sizes b and m*b (NaN for one client)."""
    gns_grad_sq: float
    """... and of |G|^2."""

    @property
    def gns_simple(self) -> float:
        """B_simple = tr(Sigma) / |G|^2, the gradient noise scale."""
        if not math.isfinite(self.gns_trace) or not math.isfinite(self.gns_grad_sq) or self.gns_grad_sq == 0:
            return float("nan")
        return self.gns_trace / self.gns_grad_sq

    def as_dict(self) -> dict[str, float]:
        return {
            "grad_variance": self.grad_variance, "grad_cosine": self.grad_cosine, "grad_norm_sq": self.grad_norm_sq,
            "gns_trace": self.gns_trace, "gns_grad_sq": self.gns_grad_sq, "gns_simple": self.gns_simple,
        }


def gradient_moments(client_grads: Tensor) -> Tensor:
    """Local sums that, summed over all processes, give the alignment diagnostics: [sum g_i, sum g_i/|g_i|, sum |g_i|^2].

    Packed into one flat vector of length 2P + 1 so one all-reduce communicates them.
    """
    norms = client_grads.norm(dim=1, keepdim=True)
    units = client_grads / norms.clamp_min(torch.finfo(client_grads.dtype).tiny)
    sq = (norms.squeeze(1) ** 2).sum().reshape(1)
    return torch.cat([client_grads.sum(0), units.sum(0), sq])


def alignment_from_moments(moments: Tensor, num_clients: int, client_batch_size: int) -> tuple[Tensor, Alignment]:
    """(ḡ, diagnostics) from the all-reduced `gradient_moments` of `num_clients` clients of batch b each."""
    size = (moments.numel() - 1) // 2
    m, b = num_clients, client_batch_size
    mean_grad = moments[:size] / m
    unit_sum = moments[size:2 * size]
    small_sq = moments[-1].item() / m          # mean_i |g_i|^2, batch size b
    big_sq = mean_grad.dot(mean_grad).item()    # |ḡ|^2, batch size m*b
    variance = max(small_sq - big_sq, 0.0)
    nan = float("nan")
    if m > 1:
        cosine = (unit_sum.dot(unit_sum).item() - m) / (m * (m - 1))
        big = m * b
        grad_sq = (big * big_sq - b * small_sq) / (big - b)
        trace = (small_sq - big_sq) / (1.0 / b - 1.0 / big)
    else:
        cosine, grad_sq, trace = nan, nan, nan
    return mean_grad, Alignment(variance, cosine, big_sq, trace, grad_sq)


def gradalign_gradient(model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Tensor, Tensor]], beta: float) -> list[Tensor]:
    """GradAlign's update direction d = (1/m) sum_i grad f_i(x - beta (ḡ - g_i)) for any module.

    `batches` holds one (inputs, targets) pair per client; `loss_fn(outputs, targets)` returns the mean loss.
    Returns one tensor per `model.parameters()` entry. beta=0 gives the mean of the per-client gradients.
    The model's parameters and .grad are left as they were.
    """
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"invalid beta={beta!r}: must be a finite number >= 0")
    if len(batches) == 0:
        raise ValueError("batches is empty: need one (inputs, targets) pair per client")
    layout = ParamLayout.of(model)
    grad_fn = make_grad_fn(model, loss_fn, layout)
    params = flat_params(model)
    inputs = [x for x, _ in batches]
    targets = [y for _, y in batches]
    if len({tuple(x.shape) for x in inputs}) == 1 and len({tuple(y.shape) for y in targets}) == 1:
        inputs, targets = torch.stack(inputs), torch.stack(targets)
    grads, _ = client_gradients(grad_fn, params, inputs, targets)
    mean_grad = grads.mean(0)
    aligned, _ = client_gradients(grad_fn, displaced_params(params, grads, mean_grad, beta), inputs, targets)
    return layout.to_list(aligned.mean(0))
