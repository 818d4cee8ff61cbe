"""The math, as pure functions over flat parameter vectors.

Every algorithm works on a model's parameters flattened into one vector of length P. Per-client quantities are
stacked into [m, P] matrices, so that one `torch.func.vmap` evaluates all clients' gradients at once, each at its
own (e.g. displaced) parameters, and one all-reduce of a flat buffer communicates them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from . import fast_paths
from .fast_layers import FactoredGrads

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a model's parameters, to move between the module and a flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
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

    def stacked(self, buffer: Tensor, clients: int) -> dict[str, Tensor]:
        """Per-client tensors [clients, *shape] by name, each a contiguous block of the flat `buffer` (clients * P).

        One allocation for all per-client gradients, yet every parameter's [m, ...] block is contiguous, so that
        batched products can write into it directly.
        """
        out, offset = {}, 0
        for n, s, k in zip(self.names, self.shapes, self.numels):
            out[n] = buffer[offset : offset + clients * k].view(clients, *s)
            offset += clients * k
        return out


Params = dict[str, Tensor]
"""Parameters (or gradients) by name; per-client ones carry a leading client dimension [m, ...]."""


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def param_dict(model: nn.Module) -> Params:
    return {n: p.detach() for n, p in model.named_parameters()}


def flatten_rows(tree: Params) -> Tensor:
    """[m, ...] per-client tensors -> one [m, P] matrix (costs a copy; the algorithms avoid it)."""
    return torch.cat([t.flatten(1) for t in tree.values()], dim=1)


def sum_clients(tree: Mapping[str, Tensor | FactoredGrads]) -> Tensor:
    """Sum over the client dimension, flattened to [P] (cheap: one pass, small result)."""
    return torch.cat([(t.sum(0) if isinstance(t, Tensor) else t.weighted_sum()).reshape(-1) for t in tree.values()])


def write_flat_grads_(model: nn.Module, flat: Tensor) -> None:
    """Set each parameter's .grad to its slice of `flat` (what an optimizer then steps on)."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def make_grad_fn(model: nn.Module, loss_fn: LossFn) -> Callable[[Params, Tensor, Tensor], tuple[Params, Tensor]]:
    """(params, inputs, targets) -> (gradient by name, loss), evaluated functionally: the module is not changed."""
    buffers = dict(model.named_buffers())

    def loss_at(params: Params, inputs: Tensor, targets: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**params, **buffers}, (inputs,)), targets)

    return grad_and_value(loss_at)


def client_gradients(
    grad_fn: Callable[[Params, Tensor, Tensor], tuple[Params, Tensor]],
    params: Params,
    inputs: Sequence[Tensor] | Tensor,
    targets: Sequence[Tensor] | Tensor,
    per_client: bool = False,
    use_vmap: bool = True,
) -> tuple[Params, Tensor]:
    """Each client's gradient (by name, [m, ...]) and loss [m].

    `params` is shared by all clients, or, with `per_client`, holds one set per client along a leading dimension
    (e.g. displaced parameters). With `use_vmap` and equally sized client batches (stacked tensors) all clients
    are evaluated in one batched call; otherwise a per-client loop computes the same numbers.
    """
    if use_vmap and isinstance(inputs, Tensor):
        return vmap(grad_fn, in_dims=(0 if per_client else None, 0, 0))(params, inputs, targets)
    results = [
        grad_fn({n: t[i] for n, t in params.items()} if per_client else params, x, y)
        for i, (x, y) in enumerate(zip(inputs, targets))
    ]
    grads = {n: torch.stack([g[n] for g, _ in results]) for n in params}
    return grads, torch.stack([loss for _, loss in results])


def displaced_params(params: Params, client_grads: Params, mean_grad: Params, beta: float) -> Params:
    """GradAlign's displaced points x - beta (ḡ - g_i) = (x - beta ḡ) + beta g_i, one per client (one pass each)."""
    return {n: torch.add(params[n] - beta * mean_grad[n], client_grads[n], alpha=beta) for n in params}


def displace_(params: Params, client_grads: Params, mean_grad: Params, beta: float) -> Params:
    """`displaced_params` written over `client_grads` (one pass over [m, P], no new [m, P] memory); returns it."""
    for n, g in client_grads.items():
        torch.add(params[n] - beta * mean_grad[n], g, alpha=beta, out=g)
    return client_grads


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
            "grad_variance": self.grad_variance,
            "grad_cosine": self.grad_cosine,
            "grad_norm_sq": self.grad_norm_sq,
            "gns_trace": self.gns_trace,
            "gns_grad_sq": self.gns_grad_sq,
            "gns_simple": self.gns_simple,
        }


def gradient_moments(
    client_grads: Mapping[str, Tensor | FactoredGrads], out: Tensor | None = None, cosine: bool = True
) -> Tensor:
    """Local sums that, summed over all processes, give ḡ and the alignment diagnostics.

    Returns [sum_i g_i, sum_i g_i/|g_i| (only with `cosine`), sum_i |g_i|^2] packed in one flat vector of length
    2P + 1 (P + 1 without `cosine`), so that one all-reduce communicates them (written into `out` when given).
    Reads each per-client gradient twice (norms, then one [k, m] @ [m, n] product). `FactoredGrads` values (Linear
    weights kept as factors by the fast path) give their norms and weighted sums as small products instead.
    """
    first = next(iter(client_grads.values()))
    m = first.shape[0]
    size = sum(math.prod(t.shape[1:]) for t in client_grads.values())
    rows_wanted = 2 if cosine else 1
    if out is None:
        out = (first if isinstance(first, Tensor) else first.grads).new_empty(rows_wanted * size + 1)
    weights = out.new_ones(1, m)
    if cosine:  # the per-client squared norms, for the weights 1/|g_i|
        norms = (
            [torch.linalg.vector_norm(t.reshape(m, -1), dim=1) for t in client_grads.values() if isinstance(t, Tensor)]
            if m
            else []
        )
        sq = torch.stack(norms).square_().sum(0) if norms else out.new_zeros(m)
        for t in client_grads.values():
            if not isinstance(t, Tensor):
                sq += t.squared_norms
        weights = torch.cat([weights, sq.sqrt().clamp_min(torch.finfo(sq.dtype).tiny).reciprocal().unsqueeze(0)])
        sq_sum = sq.sum()
    else:  # only their sum: one dot product per parameter
        sq_sum = out.new_zeros(())
        for t in client_grads.values():
            sq_sum += torch.dot(flat := t.reshape(-1), flat) if isinstance(t, Tensor) else t.squared_norm_sum()
    rows, offset = out[: rows_wanted * size].view(rows_wanted, size), 0  # [sum_i g_i; sum_i g_i/|g_i|], in place
    for t in client_grads.values():
        n = math.prod(t.shape[1:])
        if isinstance(t, Tensor):
            torch.mm(weights, t.reshape(m, n), out=rows[:, offset : offset + n])
        else:
            for j in range(rows_wanted):
                t.weighted_sum(weights[j] if j else None, out=rows[j, offset : offset + n].view(t.shape[1:]))
        offset += n
    out[-1] = sq_sum
    return out


def alignment_from_moments(
    moments: Tensor,
    num_clients: int,
    client_batch_size: int,
    cosine: bool = True,
    in_place: bool = False,
    divide: bool = True,
) -> tuple[Tensor, Alignment]:
    """(ḡ, diagnostics) from the all-reduced `gradient_moments` of `num_clients` clients of batch b each.

    Without `cosine` (moments of length P + 1) the mean pairwise cosine is NaN; the rest is the same. With
    `in_place`, ḡ is the first P values of `moments`, divided in place (no new P-sized tensor). Without `divide`,
    the first result is those values as they are, sum_i g_i = m ḡ (for a caller that folds 1/m into its next use).
    """
    size = (moments.numel() - 1) // 2 if cosine else moments.numel() - 1
    m, b = num_clients, client_batch_size
    grad_sum = moments[:size]
    small_sq = moments[-1].item() / m  # mean_i |g_i|^2, batch size b
    big_sq = grad_sum.dot(grad_sum).item() / (m * m)  # |ḡ|^2, batch size m*b
    if not divide:
        mean_grad = grad_sum
    else:
        mean_grad = grad_sum.div_(m) if in_place else grad_sum / m
    variance = max(small_sq - big_sq, 0.0)
    nan = float("nan")
    cos = nan
    if m > 1:
        if cosine:
            unit_sum = moments[size : 2 * size]
            cos = (unit_sum.dot(unit_sum).item() - m) / (m * (m - 1))
        big = m * b
        grad_sq = (big * big_sq - b * small_sq) / (big - b)
        trace = (small_sq - big_sq) / (1.0 / b - 1.0 / big)
    else:
        grad_sq, trace = nan, nan
    return mean_grad, Alignment(variance, cos, big_sq, trace, grad_sq)


def gradalign_gradient(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Tensor, Tensor]], beta: float, fast_path: bool = True
) -> list[Tensor]:
    """GradAlign's update direction d = (1/m) sum_i grad f_i(x - beta (ḡ - g_i)) for any module.

    `batches` holds one (inputs, targets) pair per client; `loss_fn(outputs, targets)` returns the mean loss.
    Returns one tensor per `model.parameters()` entry. beta=0 gives the mean of the per-client gradients.
    The model's parameters and .grad are left as they were.

    With equally sized client batches and a model that `fast_paths` handles (Linear, Conv1d, Conv2d and GroupNorm
    layers) both gradient evaluations are one forward/backward pass each over all clients' examples (the same
    numbers); otherwise, or with `fast_path=False`, per-client `vmap` (or a loop for unequal batches).
    """
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"invalid beta={beta!r}: must be a finite number >= 0")
    if len(batches) == 0:
        raise ValueError("batches is empty: need one (inputs, targets) pair per client")
    layout = ParamLayout.of(model)
    grad_fn = make_grad_fn(model, loss_fn)
    params = param_dict(model)
    inputs = [x for x, _ in batches]
    targets = [y for _, y in batches]
    if len({tuple(x.shape) for x in inputs}) == 1 and len({tuple(y.shape) for y in targets}) == 1:
        inputs, targets = torch.stack(inputs), torch.stack(targets)
    m = len(batches)
    if fast_path and isinstance(inputs, Tensor) and fast_paths.unsupported_reason(model) is None:
        try:
            grads, _, _ = fast_paths.client_gradients(model, loss_fn, inputs, targets, factored=True)
            displaced = fast_paths.displaced_points(
                params, grads, layout.unflatten(sum_clients(grads)), beta, mean_scale=1 / m
            )
            aligned, _, _ = fast_paths.displaced_gradient_sum(
                model, loss_fn, displaced, inputs, targets, grad_scale=1 / m
            )
            return [aligned[n] for n in layout.names]
        except fast_paths.Unsupported:
            pass  # the model uses a parameter outside the supported layers: the generic path below
    grads, _ = client_gradients(grad_fn, params, inputs, targets)
    mean_grad = layout.unflatten(sum_clients(grads) / m)
    displaced = displace_(params, grads, mean_grad, beta)
    aligned, _ = client_gradients(grad_fn, displaced, inputs, targets, per_client=True)
    return layout.to_list(sum_clients(aligned) / m)
