"""The per-client layers of the fast paths (see `fast_paths`): autograd Functions for Linear, Conv2d and GroupNorm.

Each layer is evaluated over the m*b examples of all clients (rows i*b .. (i+1)*b of a layer's input belong to
client i), either at the shared parameters x with each client's weight gradient wanted separately (`...ClientGrads`),
or with each client's own parameters Z_i and the weight gradients wanted summed over clients (`...Aligned`). The
backward of every Function returns the input gradient as usual and writes its parameters' gradients straight into
the evaluation's buffers (`Pass.store`). A scalar `anchor` leaf, the one tensor the gradient is taken with respect
to, ties every layer into the backward pass.

A Linear weight whose per-client gradients g_i = delta_i^T x_i have few rows per client (`FACTOR_RATIO`) is never
materialised as [m, out, in] matrices: it stays `FactoredGrads` (its sum, weighted sums and squared norms are small
products), and its displaced points Z_i = shift + beta g_i (`Factored`) are applied through the factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.nn.modules.utils import _pair


class Pass:
    """One evaluation: the number of clients and, by parameter name, where its gradient goes.

    `factored` (a dict, or None for no factoring) receives the `FactoredGrads` of the Linear weights in `once`
    (used by one layer call only) that are cheaper kept as factors; their buffers in `dests` are left unwritten.
    """

    def __init__(self, clients: int, dests: dict[str, Tensor], factored: dict | None = None):
        self.m, self.dests, self.written = clients, dests, set()
        self.factored = factored
        self.uses: dict[str, int] = {}
        self.once: frozenset[str] = frozenset()

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
    input_gram: Tensor
    """inputs_i inputs_i^T per client, [m, r, r]."""
    squared_norms: Tensor
    """|g_i|^2 = sum((inputs_i inputs_i^T) * (grads_i grads_i^T)), [m]."""
    input_version: int
    """The input's version counter when it was saved (a later pass may reuse `input_gram` for the same input)."""

    @property
    def clients(self) -> int:
        return self.squared_norms.shape[0]

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

    def gram_with(self, h: Tensor) -> Tensor:
        """h_i inputs_i^T per client ([m, r, r]); the saved Gram matrix when h is the very input it was made of."""
        x = self.inputs
        if (h.data_ptr() == x.data_ptr() and h.shape == x.shape and h.stride() == x.stride()
                and h.dtype == x.dtype and h.device == x.device and h._version == self.input_version):
            return self.input_gram
        m = self.clients
        return torch.bmm(_clients(h, m), _clients(x, m).transpose(1, 2))


def _factor(x: Tensor, grad: Tensor, m: int) -> FactoredGrads:
    xr, gr = _rows(x).detach(), _rows(grad).detach()  # (saved activations still require grad)
    xm, gm = _clients(xr, m), _clients(gr, m)
    gram = torch.bmm(xm, xm.transpose(1, 2))
    squared_norms = (gram * torch.bmm(gm, gm.transpose(1, 2))).sum((1, 2))
    return FactoredGrads(xr, gr, gram, squared_norms, x._version)


class _LinearClientGrads(Function):
    """y = x W^T + bias at the shared W; backward: the input gradient as usual, the weight gradient per client."""

    @staticmethod
    def forward(ctx, x, anchor, weight, bias, run, wn, bn):
        ctx.save_for_backward(x, weight)
        ctx.run, ctx.names = run, (wn, bn)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        run, (wn, bn) = ctx.run, ctx.names
        gm = _clients(grad, run.m)
        if run.factored is not None and wn in run.once and _factorable(gm.shape[1], *weight.shape):
            run.factored[wn] = _factor(x, grad, run.m)  # all the displaced evaluation and the moments need
            run.written.add(wn)
        else:
            run.store(wn, lambda out: _per_client_products(gm.transpose(1, 2), _clients(x, run.m), out))
        if bn is not None:
            run.store(bn, lambda out: _sum(gm, 1, out))
        gx = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None, None


class _LinearAligned(Function):
    """Client i's rows through its own W_i; the weight gradient, summed over clients, is one product over all rows."""

    @staticmethod
    def forward(ctx, x, anchor, weights, biases, run, wn, bn):
        ctx.save_for_backward(x, weights)
        ctx.run, ctx.names = run, (wn, bn)
        xm, wt = _clients(x, run.m), weights.transpose(1, 2)
        out = torch.baddbmm(biases.unsqueeze(1), xm, wt) if biases is not None else torch.bmm(xm, wt)
        return out.reshape(*x.shape[:-1], weights.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weights = ctx.saved_tensors
        run, (wn, bn) = ctx.run, ctx.names
        g2 = _rows(grad)
        run.store(wn, lambda out: _mm(g2.t(), _rows(x), out))
        if bn is not None:
            run.store(bn, lambda out: _sum(g2, 0, out))
        gx = torch.bmm(_clients(grad, run.m), weights).reshape(x.shape) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None, None


@dataclass(frozen=True)
class Factored:
    """Displaced Linear weights Z_i = shift + beta * g_i with g_i kept as factors, never materialised."""

    shift: Tensor
    """x - beta ḡ: the part shared by all clients, [out, in]."""
    beta: float
    grads: FactoredGrads


class _LinearFactoredAligned(Function):
    """Client i's rows through Z_i = shift + beta delta_i^T x_i: y_i = h_i shift^T + beta (h_i x_i^T) delta_i.

    One product over all rows with the shared shift plus small per-client [r, r] products, instead of the [m, out,
    in] matrices; backward: input gradient likewise, weight gradient summed over clients as for `_LinearAligned`.
    """

    @staticmethod
    def forward(ctx, h, anchor, z, biases, run, wn, bn):
        ctx.save_for_backward(h)
        ctx.run, ctx.names, ctx.z = run, (wn, bn), z
        m, out_features, g = run.m, z.shift.shape[0], z.grads
        y = torch.mm(_rows(h), z.shift.t()).reshape(m, -1, out_features)
        if z.beta:
            y.baddbmm_(g.gram_with(_rows(h)), _clients(g.grads, m), alpha=z.beta)
        if biases is not None:
            y += biases.unsqueeze(1)
        return y.reshape(*h.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        run, (wn, bn), z = ctx.run, ctx.names, ctx.z
        g2 = _rows(grad)
        run.store(wn, lambda out: _mm(g2.t(), _rows(h), out))
        if bn is not None:
            run.store(bn, lambda out: _sum(g2, 0, out))
        gh = None
        if ctx.needs_input_grad[0]:
            m, g = run.m, z.grads
            gh = torch.mm(g2, z.shift).reshape(m, -1, z.shift.shape[1])
            if z.beta:
                gram = torch.bmm(_clients(grad, m), _clients(g.grads, m).transpose(1, 2))
                gh.baddbmm_(gram, _clients(g.inputs, m), alpha=z.beta)
            gh = gh.reshape(h.shape)
        return gh, None, None, None, None, None, None


def _to_grouped(t: Tensor, m: int) -> Tensor:
    """[m*b, C, H, W] -> [b, m*C, H, W]: the clients side by side along the channels (for a grouped convolution)."""
    if m == 1:
        return t
    n, c = t.shape[:2]
    return t.reshape(m, n // m, c, *t.shape[2:]).transpose(0, 1).reshape(n // m, m * c, *t.shape[2:])


def _from_grouped(t: Tensor, m: int) -> Tensor:
    if m == 1:
        return t
    b, mc = t.shape[:2]
    return t.reshape(b, m, mc // m, *t.shape[2:]).transpose(0, 1).reshape(m * b, mc // m, *t.shape[2:])


def _conv_backward(grad, x, weight, conf, groups, mask):
    stride, padding, dilation = conf
    return torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0],
                                               groups, mask)


CONV_LOOP_MIN_EXAMPLES = 8
"""On CPU, with at least this many examples per client, the convolutions of both evaluations run as one ordinary
convolution per client (contiguous slices of the batch, no copies; with oneDNN on one core also faster than one
convolution over all m*b examples). Otherwise (fewer examples, or an accelerator, where few big kernels win) the
per-client ones are grouped convolutions over all clients at once and the shared-weight ones plain convolutions."""


def _loop(x: Tensor, m: int) -> bool:
    return x.device.type == "cpu" and m > 1 and x.shape[0] // m >= CONV_LOOP_MIN_EXAMPLES


def _client_rows(n: int, m: int) -> list[slice]:
    b = n // m
    return [slice(i * b, (i + 1) * b) for i in range(m)]


def _conv_forward_per_client(x, weight_of, bias_of, conf, groups, m):
    out = None
    for i, rows in enumerate(_client_rows(x.shape[0], m)):
        y = F.conv2d(x[rows], weight_of(i), bias_of(i), *conf, groups)
        if out is None:
            out = y.new_empty(x.shape[0], *y.shape[1:])
        out[rows] = y
    return out


def _conv_input_grad_per_client(grad, x, weight_of, conf, groups, m):
    gx = torch.empty_like(x)
    for i, rows in enumerate(_client_rows(x.shape[0], m)):
        gx[rows] = _conv_backward(grad[rows], x[rows], weight_of(i), conf, groups, (True, False, False))[0]
    return gx


class _Conv2dClientGrads(Function):
    """The convolution at the shared weights; backward: the weight gradient per client."""

    @staticmethod
    def forward(ctx, x, anchor, weight, bias, run, wn, bn, conf, groups):
        ctx.save_for_backward(x, weight)
        ctx.run, ctx.names, ctx.conf, ctx.groups = run, (wn, bn), conf, groups
        if _loop(x, run.m):
            return _conv_forward_per_client(x, lambda i: weight, lambda i: bias, conf, groups, run.m)
        return F.conv2d(x, weight, bias, *conf, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        run, (wn, bn), conf, groups = ctx.run, ctx.names, ctx.conf, ctx.groups
        m, loop = run.m, _loop(x, run.m)

        def weight_grads(out):
            if loop:  # one weight gradient per client, each from its own rows
                out = out if out is not None else weight.new_empty(m, *weight.shape)
                for i, rows in enumerate(_client_rows(x.shape[0], m)):
                    out[i] = _conv_backward(grad[rows], x[rows], weight, conf, groups, (False, True, False))[1]
                return out
            # one grouped convolution backward, group i = client i (as vmap's batching rule)
            shape = (m * weight.shape[0], *weight.shape[1:])
            gw = _conv_backward(_to_grouped(grad, m), _to_grouped(x, m), weight.new_empty(1).expand(shape), conf,
                                m * groups, (False, True, False))[1]
            return gw.reshape(m, *weight.shape)

        run.store(wn, weight_grads)
        if bn is not None:
            run.store(bn, lambda out: _sum(grad.reshape(m, -1, *grad.shape[1:]), (1, 3, 4), out))
        gx = None
        if ctx.needs_input_grad[0] and loop:
            gx = _conv_input_grad_per_client(grad, x, lambda i: weight, conf, groups, m)
        elif ctx.needs_input_grad[0]:
            gx = _conv_backward(grad, x, weight, conf, groups, (True, False, False))[0]
        return gx, None, None, None, None, None, None, None, None


class _Conv2dAligned(Function):
    """Client i's examples convolved with its own W_i; the weight gradient summed over clients."""

    @staticmethod
    def forward(ctx, x, anchor, weights, biases, run, wn, bn, conf, groups):
        ctx.save_for_backward(x, weights)
        ctx.run, ctx.names, ctx.conf, ctx.groups = run, (wn, bn), conf, groups
        m = run.m
        if _loop(x, m):
            return _conv_forward_per_client(x, lambda i: weights[i], lambda i: None if biases is None else biases[i],
                                            conf, groups, m)
        w = weights.reshape(-1, *weights.shape[2:])
        b = biases.reshape(-1) if biases is not None else None
        return _from_grouped(F.conv2d(_to_grouped(x, m), w, b, *conf, m * groups), m)

    @staticmethod
    def backward(ctx, grad):
        x, weights = ctx.saved_tensors
        run, (wn, bn), conf, groups = ctx.run, ctx.names, ctx.conf, ctx.groups
        m, loop = run.m, _loop(x, run.m)
        shape_only = x.new_empty(1).expand(weights.shape[1:])

        def weight_grad(out):
            if not loop:
                return _conv_backward(grad, x, shape_only, conf, groups, (False, True, False))[1]
            total = None
            for rows in _client_rows(x.shape[0], m):
                g = _conv_backward(grad[rows], x[rows], shape_only, conf, groups, (False, True, False))[1]
                total = g if total is None else total.add_(g)
            return total

        run.store(wn, weight_grad)
        if bn is not None:
            run.store(bn, lambda out: _sum(grad, (0, 2, 3), out))
        gx = None
        if ctx.needs_input_grad[0] and loop:
            gx = _conv_input_grad_per_client(grad, x, lambda i: weights[i], conf, groups, m)
        elif ctx.needs_input_grad[0]:
            shape = (x.shape[0] // m, m * x.shape[1], *x.shape[2:])
            gx = _conv_backward(_to_grouped(grad, m), x.new_empty(1).expand(shape),
                                weights.reshape(-1, *weights.shape[2:]), conf, m * groups, (True, False, False))[0]
            gx = _from_grouped(gx, m)
        return gx, None, None, None, None, None, None, None, None


class _GroupNormAffine(Function):
    """out = normalized * scale + shift, per client ([m, C] scales: the Z_i) or shared ([C]: at x).

    Backward: the input gradient, and the scale/shift gradients per client (shared values) or summed (per client).
    """

    @staticmethod
    def forward(ctx, normalized, anchor, scale, shift, run, wn, bn):
        m, c = run.m, normalized.shape[1]
        ctx.save_for_backward(normalized, scale)
        ctx.run, ctx.names = run, (wn, bn)
        view = normalized.reshape(m, -1, c, normalized[0, 0].numel())
        out = view * scale.reshape(-1, 1, c, 1)
        if shift is not None:
            out += shift.reshape(-1, 1, c, 1)
        return out.reshape(normalized.shape)

    @staticmethod
    def backward(ctx, grad):
        normalized, scale = ctx.saved_tensors
        run, (wn, bn) = ctx.run, ctx.names
        m, c = run.m, normalized.shape[1]
        per_client = scale.dim() == 1  # shared values: gradients wanted per client, else summed
        g = grad.reshape(m, -1, c, normalized[0, 0].numel())
        dims = (1, 3) if per_client else (0, 1, 3)
        run.store(wn, lambda out: _sum(g * normalized.reshape(g.shape), dims, out))
        if bn is not None:
            run.store(bn, lambda out: _sum(g, dims, out))
        gx = (g * scale.reshape(-1, 1, c, 1)).reshape(grad.shape) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None, None


def _conv_args(x: Tensor, weight: Tensor, stride, padding, dilation):
    """F.conv2d's arguments as int pairs; string padding made explicit (an asymmetric 'same' pads x itself)."""
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # 'same': d*(k-1) in all per dimension, the odd one on the right/bottom (as torch does)
            th, tw = (d * (k - 1) for d, k in zip(dilation, weight.shape[2:]))
            if th % 2 or tw % 2:
                x = F.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2])
                padding = (0, 0)
            else:
                padding = (th // 2, tw // 2)
    return x, (stride, _pair(padding), dilation)


