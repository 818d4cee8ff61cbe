"""The per-client layers of the fast paths (see `fast_paths`): Linear and GroupNorm (Conv1d/Conv2d: `fast_convs`).

Each layer is evaluated over the m*b examples of all clients (rows i*b .. (i+1)*b of a layer's input belong to
client i), either at the shared parameters x with each client's weight gradient wanted separately (pass 1), or
with each client's own parameters Z_i and the weight gradients wanted summed over clients (pass 2).

- Linear and GroupNorm run as ordinary autograd ops on detached parameter values (`linear_at_shared`,
  `linear_displaced`, `linear_factored`, `group_norm_affine`), so the backward pass runs entirely in torch's engine.
  Each call is a tap (`Pass.tap`): the backward pass is asked for the gradient at the layer's output, from which
  the parameters' gradients are computed afterwards (per client, or summed) into the evaluation's buffers.
- Conv1d and Conv2d run as autograd Functions (`fast_convs`), whose backward writes the weight gradients into the
  buffers (`Pass.store`) and returns the input gradient; a scalar `anchor` leaf, which the backward pass is also
  asked for, ties them into it.

A Linear weight whose per-client gradients g_i = delta_i^T x_i have few rows per client (`FACTOR_RATIO`) is never
materialised as [m, out, in] matrices: it stays `FactoredGrads` (its sum, weighted sums and squared norms are small
products), and its displaced points Z_i = shift + beta g_i (`Factored`) are applied through the factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge


class Unsupported(RuntimeError):
    """The model uses its parameters in a way the fast paths do not handle; use the vmap path instead."""


class Pass:
    """One evaluation: the number of clients and, by parameter name, where its gradient goes.

    `factored` (a dict, or None for no factoring) receives the `FactoredGrads` of the Linear weights used by one
    layer call only that are cheaper kept as factors; their buffers in `dests` are left unwritten. `taps` holds,
    per Linear/GroupNorm call, where the backward pass leaves the gradient at its output and what turns that into
    the parameters' gradients.
    """

    def __init__(self, clients: int, dests: dict[str, Tensor], factored: dict | None = None):
        self.m, self.dests, self.written = clients, dests, set()
        self.factored = factored
        self.uses: dict[str, int] = {}
        self.taps: list[tuple[GradientEdge, Callable[[Tensor], None]]] = []
        self.anchored: Tensor | None = None

    def anchor(self, like: Tensor) -> Tensor:
        """The scalar leaf that ties the autograd Functions (the convolutions) into the backward pass."""
        if self.anchored is None:
            self.anchored = like.new_zeros(()).requires_grad_()
        return self.anchored

    def tap(self, output: Tensor, finish: Callable[[Tensor], None]) -> None:
        """Call `finish` with the gradient at `output` (any shape holding its values in order).

        The edge is taken now, at the tensor that holds the values (`output` may be a view of it: an in-place op on
        a view replaces the view's own node), so that in-place ops of the model on the output don't matter.
        """
        holder = output if output._base is None else output._base
        self.taps.append((get_gradient_edge(holder), finish))

    def store(self, name: str, compute) -> None:
        """dest = compute(dest) the first time (`compute(out)` may write into out), dest += compute(None) after."""
        dest = self.dests[name]
        if name in self.written:  # a parameter used by several calls: the gradients add up
            dest.add_(compute(None))
            return
        self.written.add(name)
        result = compute(dest)
        if result is not dest:
            dest.copy_(result)


def _clients(t: Tensor, m: int) -> Tensor:
    """[m*b, ..., k] -> [m, b*..., k]: each client's rows as one matrix."""
    return t.reshape(m, -1, t.shape[-1])


def _rows(t: Tensor) -> Tensor:
    """[n, ..., k] -> [n*..., k]."""
    return t.reshape(-1, t.shape[-1])


def _per_client_products(a: Tensor, b: Tensor, out: Tensor | None) -> Tensor:
    """a_i @ b_i for each client i ([m, p, q] @ [m, q, r]), into `out` when given."""
    if out is None:
        return torch.bmm(a, b)
    if out.is_contiguous():
        return torch.bmm(a, b, out=out)
    if out[0].is_contiguous():  # one product per client straight into its block of the buffer
        for i in range(a.shape[0]):
            torch.mm(a[i], b[i], out=out[i])
        return out
    return torch.bmm(a, b)


def _mm(a: Tensor, b: Tensor, out: Tensor | None) -> Tensor:
    return torch.mm(a, b, out=out) if out is not None and out.is_contiguous() else torch.mm(a, b)


def _sum(t: Tensor, dims, out: Tensor | None) -> Tensor:
    return torch.sum(t, dims, out=out) if out is not None and out.is_contiguous() else t.sum(dims)


FACTOR_RATIO = 0.5
"""A Linear weight [out, in] whose per-client gradients g_i = delta_i^T x_i have r rows per client is kept as
factors (`FactoredGrads`, `Factored`) when r (in + out) <= FACTOR_RATIO * in * out: then the [r, r] Gram products
of the factors cost less than writing, reading and multiplying with m [out, in] matrices."""


def _factorable(rows: int, out_features: int, in_features: int) -> bool:
    return rows * (in_features + out_features) <= FACTOR_RATIO * in_features * out_features


@dataclass(frozen=True)
class FactoredGrads:
    """Per-client gradients of a Linear weight kept as their factors: g_i = grads_i^T inputs_i ([out, in])."""

    inputs: Tensor
    """The layer's input at x, all clients' rows [m*r, in] (client i's rows are the i-th block of r)."""
    grads: Tensor
    """The gradient of the summed loss at the layer's output, [m*r, out]."""
    gram_grads: Tensor
    """(inputs_i inputs_i^T) grads_i per client, rows [m*r, out]: the per-client part of the displaced layer's
    output at this very input (`Factored`), and what the squared norms are made of."""
    clients: int
    input_version: int
    """The input's version counter when it was saved (a later pass may reuse `gram_grads` for the same input)."""

    @property
    def squared_norms(self) -> Tensor:
        """|g_i|^2 = <grads_i, (inputs_i inputs_i^T) grads_i>, [m]."""
        m = self.clients  # (vecdot: a [1, n] @ [n, 1] bmm per client is 5x slower)
        return torch.linalg.vecdot(self.gram_grads.view(m, -1), self.grads.view(m, -1))

    def squared_norm_sum(self) -> Tensor:
        """sum_i |g_i|^2 as one dot product over all rows (cheaper than summing `squared_norms`)."""
        return torch.dot(self.gram_grads.view(-1), self.grads.view(-1))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.clients, self.grads.shape[1], self.inputs.shape[1]))

    def weighted_sum(self, weights: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """sum_i w_i g_i ([out, in]; all w_i = 1 for None): one product over all rows."""
        grads = self.grads
        if weights is not None:
            grads = (_clients(grads, self.clients) * weights.reshape(-1, 1, 1)).reshape(grads.shape)
        return _mm(grads.t(), self.inputs, out)

    def materialize(self, out: Tensor | None = None) -> Tensor:
        """The per-client gradients [m, out, in] (into `out` when given)."""
        m = self.clients
        return _per_client_products(_clients(self.grads, m).transpose(1, 2), _clients(self.inputs, m), out)

    def gram_grads_with(self, h: Tensor) -> Tensor:
        """h_i g_i^T = (h_i inputs_i^T) grads_i per client (rows [m*r, out]): the saved `gram_grads` when h is the
        very input they were made of (same memory, unmodified), else computed (differentiably in h)."""
        x = self.inputs
        if (
            h.data_ptr() == x.data_ptr()
            and h.shape == x.shape
            and h.stride() == x.stride()
            and h.dtype == x.dtype
            and h.device == x.device
            and h._version == self.input_version
        ):
            return self.gram_grads
        m = self.clients
        gram = torch.bmm(_clients(h, m), _clients(x, m).transpose(1, 2))
        return torch.bmm(gram, _clients(self.grads, m)).view(self.grads.shape)


def _factor(x: Tensor, grad: Tensor, m: int) -> FactoredGrads:
    """The factors and the product (x_i x_i^T) delta_i that the displaced pass needs (its Gram matrix costs r^2 in
    per client, far less than g_i itself); |g_i|^2 = <delta_i, (x_i x_i^T) delta_i> comes from it when asked."""
    xr, gr = _rows(x).detach(), _rows(grad).detach()  # (saved activations still require grad)
    xm, gm = _clients(xr, m), _clients(gr, m)
    gram_grads = torch.bmm(torch.bmm(xm, xm.transpose(1, 2)), gm)
    return FactoredGrads(xr, gr.contiguous(), gram_grads.view(gr.shape), m, x._version)


@dataclass(frozen=True)
class Factored:
    """Displaced Linear weights Z_i = shift + beta * g_i with g_i kept as factors, never materialised."""

    shift: Tensor
    """x - beta ḡ: the part shared by all clients, [out, in]."""
    beta: float
    grads: FactoredGrads


# -- Linear and GroupNorm: ordinary autograd ops; weight gradients from the gradient at the layer's output ---------


def _unchanged(saved: Tensor, version: int, name: str) -> None:
    if saved._version != version:
        raise Unsupported(f"a tensor the layer holding {name!r} read was modified in place afterwards")


def _graph_leaf(t: Tensor, other: Tensor) -> Tensor:
    """`t` (detached parameter values) as a leaf that requires grad when `other` (the layer's input) does not, so
    that the layer's output is a node of the graph (its gradient is never computed: only the output's is asked)."""
    return t if other.requires_grad else t.detach().requires_grad_()


def linear_at_shared(run: Pass, x: Tensor, weight: Tensor, bias: Tensor | None, wn: str, bn: str | None) -> Tensor:
    """y = x W^T + bias at the shared W; the weight gradient per client, from x and the gradient at y."""
    y = F.linear(x, _graph_leaf(weight, x), bias)
    version = x._version

    def finish(grad: Tensor) -> None:
        _unchanged(x, version, wn)
        m = run.m
        gm = _clients(grad, m)
        if run.factored is not None and run.uses[wn] == 1 and _factorable(gm.shape[1], *weight.shape):
            run.factored[wn] = _factor(x, grad, m)  # all the displaced evaluation and the moments need
            run.written.add(wn)
        else:
            run.store(wn, lambda out: _per_client_products(gm.transpose(1, 2), _clients(x, m), out))
        if bn is not None:
            run.store(bn, lambda out: _sum(gm, 1, out))

    run.tap(y, finish)
    return y


def _summed_linear_grads(run: Pass, x: Tensor, version: int, wn: str, bn: str | None):
    """The finish of a displaced Linear: sum_i delta_i^T x_i is one product over all rows, as in large-batch SGD."""

    def finish(grad: Tensor) -> None:
        _unchanged(x, version, wn)
        g2 = _rows(grad)
        run.store(wn, lambda out: _mm(g2.t(), _rows(x), out))
        if bn is not None:
            run.store(bn, lambda out: _sum(g2, 0, out))

    return finish


def linear_displaced(run: Pass, x: Tensor, weights: Tensor, biases: Tensor | None, wn: str, bn: str | None) -> Tensor:
    """Client i's rows through its own W_i ([m, out, in]): batched products."""
    xm, wt = _clients(x, run.m), _graph_leaf(weights, x).transpose(1, 2)
    y = torch.baddbmm(biases.unsqueeze(1), xm, wt) if biases is not None else torch.bmm(xm, wt)
    y = y.reshape(*x.shape[:-1], weights.shape[1])
    run.tap(y, _summed_linear_grads(run, x, x._version, wn, bn))
    return y


def linear_factored(run: Pass, h: Tensor, z: Factored, biases: Tensor | None, wn: str, bn: str | None) -> Tensor:
    """Client i's rows through Z_i = shift + beta delta_i^T x_i: y_i = h_i shift^T + beta (h_i x_i^T) delta_i.

    One product over all rows with the shared shift plus small per-client [r, r] products, instead of the [m, out,
    in] matrices (the backward pass differentiates both through h as ordinary ops).
    """
    m, out_features, g = run.m, z.shift.shape[0], z.grads
    rows, shift = _rows(h), _graph_leaf(z.shift, h)
    if z.beta:  # the small per-client part first (with the biases), then the big product added onto it
        per_client = g.gram_grads_with(rows)  # [m*r, out], saved by pass 1 when h is the very input x
        if per_client.requires_grad:  # (a layer inside the network: its input is differentiated through it too)
            small = per_client * z.beta
            if biases is not None:
                small = (small.view(m, -1, out_features) + biases.unsqueeze(1)).view(small.shape)
            y = torch.addmm(small, rows, shift.t())
        else:  # the per-client part written into a 2-d tensor whose own (not a view's) in-place product autograd
            y = rows.new_empty(rows.shape[0], out_features)  # records: no copy forward, none backward
            if biases is not None:
                torch.add(
                    biases.unsqueeze(1),
                    per_client.view(m, -1, out_features),
                    alpha=z.beta,
                    out=y.view(m, -1, out_features),
                )
            else:
                torch.mul(per_client, z.beta, out=y)
            y.addmm_(rows, shift.t())
    else:
        y = torch.mm(rows, shift.t())
        if biases is not None:
            y = (y.view(m, -1, out_features) + biases.unsqueeze(1)).view(-1, out_features)
    y = y.reshape(*h.shape[:-1], out_features)
    run.tap(y, _summed_linear_grads(run, h, h._version, wn, bn))
    return y


def group_norm_affine(
    run: Pass, normalized: Tensor, scale: Tensor, shift: Tensor | None, wn: str, bn: str | None
) -> Tensor:
    """out = normalized * scale + shift, per client ([m, C] scales: the Z_i) or shared ([C]: at x).

    The scale and shift gradients: per client for shared values, summed over clients for per-client ones.
    """
    m, c = run.m, normalized.shape[1]
    per_client = scale.dim() == 1  # shared values: gradients wanted per client, else summed
    view = normalized.reshape(m, -1, c, normalized[0, 0].numel())
    scale = _graph_leaf(scale, normalized).reshape(-1, 1, c, 1)
    out = view * scale if shift is None else torch.addcmul(shift.reshape(-1, 1, c, 1), view, scale)
    out = out.reshape(normalized.shape)
    version = normalized._version

    def finish(grad: Tensor) -> None:
        _unchanged(normalized, version, wn)
        g = grad.reshape(view.shape)
        dims = (1, 3) if per_client else (0, 1, 3)
        run.store(wn, lambda out: _sum(g * view, dims, out))
        if bn is not None:
            run.store(bn, lambda out: _sum(g, dims, out))

    run.tap(out, finish)
    return out
