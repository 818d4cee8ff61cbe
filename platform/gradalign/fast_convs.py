"""Conv1d and Conv2d for the fast paths (see `fast_paths` and `fast_layers`): autograd Functions over all clients'
examples.

`_ConvClientGrads` convolves at the shared weights and its backward writes each client's weight gradient into the
evaluation's buffers (`Pass.store`); `_ConvAligned` convolves client i's examples with its own W_i and its backward
writes the weight gradient summed over clients. Both return the input gradient. Per-client convolutions run one per
client or as one grouped convolution (`CONV_LOOP_MIN_EXAMPLES`). The number of spatial dimensions (1 or 2) comes
from the weight's shape; `torch.ops.aten.convolution_backward` serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.nn.modules.utils import _ntuple

from .fast_layers import _sum

_CONVS = {1: F.conv1d, 2: F.conv2d}
"""The convolution by number of spatial dimensions."""


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, conf, groups: int) -> Tensor:
    return _CONVS[weight.dim() - 2](x, weight, bias, *conf, groups)


def _spatial(t: Tensor, first: int) -> tuple[int, ...]:
    """The dimensions of `t` from `first` on: the spatial ones of a [..., C, L] or [..., C, H, W] tensor."""
    return tuple(range(first, t.dim()))


def _to_grouped(t: Tensor, m: int) -> Tensor:
    """[m*b, C, ...] -> [b, m*C, ...]: the clients side by side along the channels (for a grouped convolution)."""
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
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups, mask
    )


CONV_LOOP_MIN_EXAMPLES = 8
"""On CPU, with at least this many examples per client, the 2-d convolutions of both evaluations run as one ordinary
convolution per client (contiguous slices of the batch, no copies; with oneDNN on one core also faster than one
convolution over all m*b examples). Otherwise (fewer examples, or an accelerator, where few big kernels win) the
per-client ones are grouped convolutions over all clients at once and the shared-weight ones plain convolutions.
1-d convolutions are always grouped: on the MNIST-1D CNN (one core) a loop over clients made a GradAlign step 1.2x
(4 x 128) to 2.1x (32 x 32) slower than the grouped kernels."""


def _loop(x: Tensor, m: int) -> bool:
    return x.device.type == "cpu" and x.dim() == 4 and m > 1 and x.shape[0] // m >= CONV_LOOP_MIN_EXAMPLES


def _client_rows(n: int, m: int) -> list[slice]:
    b = n // m
    return [slice(i * b, (i + 1) * b) for i in range(m)]


def _conv_forward_per_client(x, weight_of, bias_of, conf, groups, m):
    out = None
    for i, rows in enumerate(_client_rows(x.shape[0], m)):
        y = _conv(x[rows], weight_of(i), bias_of(i), conf, groups)
        if out is None:
            out = y.new_empty(x.shape[0], *y.shape[1:])
        out[rows] = y
    return out


def _conv_input_grad_per_client(grad, x, weight_of, conf, groups, m):
    gx = torch.empty_like(x)
    for i, rows in enumerate(_client_rows(x.shape[0], m)):
        gx[rows] = _conv_backward(grad[rows], x[rows], weight_of(i), conf, groups, (True, False, False))[0]
    return gx


class _ConvClientGrads(Function):
    """The convolution at the shared weights; backward: the weight gradient per client."""

    @staticmethod
    def forward(ctx, x, anchor, weight, bias, run, wn, bn, conf, groups):
        ctx.save_for_backward(x, weight)
        ctx.run, ctx.names, ctx.conf, ctx.groups = run, (wn, bn), conf, groups
        if _loop(x, run.m):
            return _conv_forward_per_client(x, lambda i: weight, lambda i: bias, conf, groups, run.m)
        return _conv(x, weight, bias, conf, groups)

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
            gw = _conv_backward(
                _to_grouped(grad, m),
                _to_grouped(x, m),
                weight.new_empty(1).expand(shape),
                conf,
                m * groups,
                (False, True, False),
            )[1]
            return gw.reshape(m, *weight.shape)

        run.store(wn, weight_grads)
        if bn is not None:
            per_client = grad.reshape(m, -1, *grad.shape[1:])
            run.store(bn, lambda out: _sum(per_client, (1, *_spatial(per_client, 3)), out))
        gx = None
        if ctx.needs_input_grad[0] and loop:
            gx = _conv_input_grad_per_client(grad, x, lambda i: weight, conf, groups, m)
        elif ctx.needs_input_grad[0]:
            gx = _conv_backward(grad, x, weight, conf, groups, (True, False, False))[0]
        return gx, None, None, None, None, None, None, None, None


class _ConvAligned(Function):
    """Client i's examples convolved with its own W_i; the weight gradient summed over clients."""

    @staticmethod
    def forward(ctx, x, anchor, weights, biases, run, wn, bn, conf, groups):
        ctx.save_for_backward(x, weights)
        ctx.run, ctx.names, ctx.conf, ctx.groups = run, (wn, bn), conf, groups
        m = run.m
        if _loop(x, m):
            return _conv_forward_per_client(
                x, lambda i: weights[i], lambda i: None if biases is None else biases[i], conf, groups, m
            )
        w = weights.reshape(-1, *weights.shape[2:])
        b = biases.reshape(-1) if biases is not None else None
        return _from_grouped(_conv(_to_grouped(x, m), w, b, conf, m * groups), m)

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
            run.store(bn, lambda out: _sum(grad, (0, *_spatial(grad, 2)), out))
        gx = None
        if ctx.needs_input_grad[0] and loop:
            gx = _conv_input_grad_per_client(grad, x, lambda i: weights[i], conf, groups, m)
        elif ctx.needs_input_grad[0]:
            shape = (x.shape[0] // m, m * x.shape[1], *x.shape[2:])
            gx = _conv_backward(
                _to_grouped(grad, m),
                x.new_empty(1).expand(shape),
                weights.reshape(-1, *weights.shape[2:]),
                conf,
                m * groups,
                (True, False, False),
            )[0]
            gx = _from_grouped(gx, m)
        return gx, None, None, None, None, None, None, None, None


def _conv_args(x: Tensor, weight: Tensor, stride, padding, dilation):
    """F.conv1d's / F.conv2d's arguments as int tuples; string padding made explicit (an asymmetric 'same' pads x)."""
    as_tuple = _ntuple(weight.dim() - 2)
    stride, dilation = as_tuple(stride), as_tuple(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # 'same': d*(k-1) in all per dimension, the odd one on the right/bottom (as torch does)
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            if any(t % 2 for t in totals):
                x = F.pad(x, [p for t in reversed(totals) for p in (t // 2, t - t // 2)])  # (last dimension first)
                padding = 0
            else:
                padding = tuple(t // 2 for t in totals)
    return x, (stride, as_tuple(padding), dilation)
