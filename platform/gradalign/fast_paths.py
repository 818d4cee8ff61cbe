"""Exact fast paths for GradAlign's two gradient evaluations: one ordinary forward/backward over all clients each.

GradAlign needs (1) every client's gradient g_i at the shared parameters x and (2) the sum over clients of the
gradients at the displaced points Z_i = x - beta (ḡ - g_i). The generic path evaluates both with
`vmap(grad(...))`; for (2) that materialises every client's gradient at Z_i ([m, P] values) only to sum them.

Here each is one forward and one backward pass of the module over the m*b examples of all clients, in which the
parameterised layers (`F.linear`, `F.conv2d`, `F.group_norm` called with the model's parameters, i.e. nn.Linear,
nn.Conv2d, nn.GroupNorm) are evaluated per client (rows i*b .. (i+1)*b of a layer's input belong to client i):

- per-client gradients (1): the forward is the ordinary one; in the backward the weight gradient of each layer is
  one product per client (what vmap computes), written straight into the caller's buffer; nothing else is per
  client.
- summed displaced gradients (2): client i's rows go through the layer with its own weights Z_i (batched matrix
  products; convolutions per client or grouped), but since dZ_i/dx = I the weight gradient is accumulated directly
  onto the shared x: one ordinary product over all m*b examples, as in large-batch SGD. No [m, P] gradient exists.
  A Linear weight whose per-client gradients g_i = delta_i^T x_i have few rows is not even displaced as [m, out,
  in] matrices: Z_i = shift + beta delta_i^T x_i is applied through the factors (`Factored`), and |g_i|^2 comes
  from two small Gram matrices.

All of it is exact (the same sums in another order). The layers are swapped in by a `TorchFunctionMode` active
only during the forward pass, in this thread: the module, its parameters, their .grad and its hooks are not
touched, so nothing needs undoing, also after an error. Any other use of a parameter (e.g. `h @
self.fc.weight.t()` in a forward) is detected and refused (`Unsupported`); callers then fall back to the vmap path.

Assumptions, as for large-batch SGD: the model keeps the examples along the leading dimension of every layer input
and treats examples independently (no BatchNorm: `unsupported_reason` refuses such models, and every model whose
parameters are not all held by the supported layers). The loss is summed per client with `vmap(loss_fn)` over the
[m, b, ...] outputs (any reduction works), or, with `mean_loss`, as m times `loss_fn` over all examples (a mean over
examples, as cross-entropy: cheaper; `mean_loss=None` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.func import vmap
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

SUPPORTED_MODULES = (nn.Linear, nn.Conv2d, nn.GroupNorm)
"""Module types whose parameters the fast paths handle (subclasses only if they keep the original forward)."""


class Unsupported(RuntimeError):
    """The model uses its parameters in a way the fast paths do not handle; use the vmap path instead."""


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast paths cannot evaluate `model` (None if they can), from its structure alone.

    Every parameter must be held directly by a Linear, Conv2d or GroupNorm (with its original forward), under its
    own name (weight, bias), by one module only (no weight sharing); no BatchNorm anywhere.
    """
    if not any(True for _ in model.parameters()):
        return "the model has no parameters"
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module).__name__ == "OptimizedModule":  # torch.compile: its graph would bypass the layer swap
            return f"{name or 'model'} is compiled (torch.compile)"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"{name or 'model'} is a BatchNorm"
        own = [k for k, p in module._parameters.items() if p is not None]
        if not own:
            continue
        base = next((cls for cls in SUPPORTED_MODULES if isinstance(module, cls)), None)
        if base is None or any(getattr(type(module), f) is not getattr(base, f)
                               for f in ("forward", "_conv_forward") if hasattr(base, f)):
            return f"{name or 'model'} ({type(module).__name__}) holds parameters and is not one of " \
                   f"{', '.join(c.__name__ for c in SUPPORTED_MODULES)}"
        extra = sorted(set(own) - {"weight", "bias"})
        if extra:
            return f"{name or 'model'} ({type(module).__name__}) holds extra parameters {extra}"
    named = list(model.named_parameters(remove_duplicate=False))
    if len({id(p) for _, p in named}) != len(named):
        return "a parameter is shared between modules"
    return None


# -- per-client layers ------------------------------------------------------------------------------------------
# Each layer is an autograd Function whose backward returns the input gradient as usual and writes its parameters'
# gradients (per client, or summed over clients) straight into the evaluation's buffers (`_Pass.store`). A scalar
# `anchor` leaf, the one tensor the gradient is taken with respect to, ties every layer into the backward pass.

class _Pass:
    """One evaluation: the number of clients and, by parameter name, where its gradient goes."""

    def __init__(self, clients: int, dests: dict[str, Tensor], factors: dict | None = None):
        self.m, self.dests, self.written = clients, dests, set()
        self.factors = factors  # Linear weight name -> (layer input, output gradient, |g_i|^2), when asked for
        self.uses: dict[str, int] = {}

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
        run.store(wn, lambda out: _per_client_products(gm.transpose(1, 2), _clients(x, run.m), out))
        if bn is not None:
            run.store(bn, lambda out: _sum(gm, 1, out))
        if run.factors is not None and _factorable(gm.shape[1], *weight.shape):
            # g_i = grad_i^T x_i: all the displaced evaluation needs of this weight; and |g_i|^2 from the two small
            # Gram matrices, <g_i, g_i> = sum((x_i x_i^T) * (grad_i grad_i^T)), without reading g_i
            xm = _clients(x, run.m)
            sq = (torch.bmm(xm, xm.transpose(1, 2)) * torch.bmm(gm, gm.transpose(1, 2))).sum((1, 2))
            run.factors[wn] = (x, grad, sq)
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
        g2 = grad.reshape(-1, grad.shape[-1])
        run.store(wn, lambda out: _mm(g2.t(), x.reshape(-1, x.shape[-1]), out))
        if bn is not None:
            run.store(bn, lambda out: _sum(g2, 0, out))
        gx = torch.bmm(_clients(grad, run.m), weights).reshape(x.shape) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None, None, None


FACTOR_RATIO = 0.5
"""A Linear weight's per-client gradients g_i = delta_i^T x_i (rows r per client, [out, in]) are used in factored
form at the displaced points when the factors are this much cheaper: 2 r (in + out) <= FACTOR_RATIO * in * out."""


def _factorable(rows: int, out_features: int, in_features: int) -> bool:
    return 2 * rows * (in_features + out_features) <= FACTOR_RATIO * in_features * out_features


@dataclass(frozen=True)
class Factored:
    """Displaced Linear weights Z_i = shift + beta * delta_i^T x_i, never materialised ([m, out, in] values)."""

    shift: Tensor
    """x - beta ḡ: the part shared by all clients, [out, in]."""
    beta: float
    inputs: Tensor
    """The layer's input at x (all clients' rows, [m*r..., in])."""
    grads: Tensor
    """The gradient of the summed loss at the layer's output at x ([m*r..., out])."""


class _LinearFactoredAligned(Function):
    """Client i's rows through Z_i = shift + beta delta_i^T x_i: y_i = h_i shift^T + beta (h_i x_i^T) delta_i.

    One product over all rows with the shared shift plus small per-client [r, r] products, instead of the [m, out,
    in] matrices; backward: input gradient likewise, weight gradient summed over clients as for `_LinearAligned`.
    """

    @staticmethod
    def forward(ctx, h, anchor, z, biases, run, wn, bn):
        ctx.save_for_backward(h)
        ctx.run, ctx.names, ctx.z = run, (wn, bn), z
        m, out_features = run.m, z.shift.shape[0]
        y = torch.mm(h.reshape(-1, h.shape[-1]), z.shift.t()).reshape(m, -1, out_features)
        if z.beta:
            gram = torch.bmm(_clients(h, m), _clients(z.inputs, m).transpose(1, 2))
            y = torch.baddbmm(y, gram, _clients(z.grads, m), alpha=z.beta)
        if biases is not None:
            y += biases.unsqueeze(1)
        return y.reshape(*h.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        run, (wn, bn), z = ctx.run, ctx.names, ctx.z
        g2 = grad.reshape(-1, grad.shape[-1])
        run.store(wn, lambda out: _mm(g2.t(), h.reshape(-1, h.shape[-1]), out))
        if bn is not None:
            run.store(bn, lambda out: _sum(g2, 0, out))
        gh = None
        if ctx.needs_input_grad[0]:
            m = run.m
            gh = torch.mm(g2, z.shift).reshape(m, -1, z.shift.shape[1])
            if z.beta:
                gram = torch.bmm(_clients(grad, m), _clients(z.grads, m).transpose(1, 2))
                gh = torch.baddbmm(gh, gram, _clients(z.inputs, m), alpha=z.beta)
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


# -- the mode that swaps them in --------------------------------------------------------------------------------

_METADATA = frozenset({
    "shape", "dtype", "device", "requires_grad", "is_leaf", "ndim", "layout", "names", "grad_fn", "is_cuda",
    "is_sparse", "is_quantized", "is_meta", "is_nested", "itemsize", "nbytes", "size", "dim", "numel", "nelement",
    "ndimension", "stride", "is_contiguous", "is_floating_point", "is_complex", "element_size", "__len__", "__hash__",
    "__repr__", "__format__",
})
"""What a forward may ask of a parameter without using its values (anything else on a parameter is refused)."""


def _func_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    return getattr(getattr(func, "__self__", None), "__name__", name) if name == "__get__" else name


def _is_metadata(func) -> bool:
    return _func_name(func) in _METADATA


class _PerClient(TorchFunctionMode):
    """Evaluates the layers that use the model's parameters per client; refuses any other use of them.

    `aligned` None: the parameters are shared and the gradients are wanted per client. Otherwise it holds each
    client's parameters Z_i ([m, ...] by name) and the gradient wanted is the sum over clients.
    """

    def __init__(self, params: Mapping[str, Tensor], examples: int, aligned: Mapping[str, Tensor] | None, run: _Pass,
                 anchor: Tensor):
        super().__init__()
        self.names = {id(p): n for n, p in params.items()}
        self.n, self.aligned, self.run, self.anchor = examples, aligned, run, anchor
        self.handlers = {F.linear: self._linear, F.conv2d: self._conv2d, F.group_norm: self._group_norm}

    def _name(self, t) -> str | None:
        return self.names.get(id(t)) if isinstance(t, Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        handler = self.handlers.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        names = self.names  # (ids of live objects are unique: only the parameters themselves match)
        for a in (*args, *kwargs.values()) if kwargs else args:
            if id(a) in names or (type(a) in (list, tuple) and any(id(t) in names for t in a)):
                self._refuse(func, a)
        return func(*args, **kwargs)

    def _refuse(self, func, argument) -> None:
        if _is_metadata(func):
            return
        name = self._name(argument) or next(self._name(t) for t in argument if self._name(t))
        raise Unsupported(f"parameter {name!r} is used by {_func_name(func)}, which the fast path does not handle")

    def _split(self, input, weight, bias, what):
        """Names of a layer's (weight, bias) parameters; None if it uses none (then it is an ordinary call)."""
        if self._name(input) is not None:
            raise Unsupported(f"parameter {self._name(input)!r} is the input of a {what}")
        wn, bn = self._name(weight), self._name(bias)
        if wn is None and bn is None:
            return None
        if wn is None:
            raise Unsupported(f"parameter {bn!r} is the bias of a {what} whose weight is not a parameter")
        if input.dim() == 0 or input.shape[0] != self.n:
            raise Unsupported(f"the input of a {what} has shape {tuple(input.shape)}, not the {self.n} examples along "
                              "its first dimension")
        self.run.uses[wn] = self.run.uses.get(wn, 0) + 1
        return wn, bn

    def _values(self, wn, weight, bn, bias):
        """The weight and bias a layer runs with: at x (shared), or each client's Z_i ([m, ...])."""
        if self.aligned is None:
            return weight.detach(), bias.detach() if isinstance(bias, Tensor) else None
        if bn is not None:
            biases = self.aligned[bn]
        else:  # no bias, or a constant one (the same for every client)
            biases = bias.detach().expand(self.run.m, *bias.shape) if isinstance(bias, Tensor) else None
        return self.aligned[wn], biases

    def _linear(self, input, weight, bias=None):
        names = self._split(input, weight, bias, "linear layer")
        if names is None:
            return F.linear(input, weight, bias)
        values = self._values(names[0], weight, names[1], bias)
        if isinstance(values[0], Factored):
            return _LinearFactoredAligned.apply(input, self.anchor, *values, self.run, *names)
        fn = _LinearClientGrads if self.aligned is None else _LinearAligned
        return fn.apply(input, self.anchor, *values, self.run, *names)

    def _conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        names = self._split(input, weight, bias, "convolution")
        if names is None:
            return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        if input.dim() != 4:
            raise Unsupported("the fast path needs batched (4-d) convolution inputs")
        input, conf = _conv_args(input, weight, stride, padding, dilation)
        fn = _Conv2dClientGrads if self.aligned is None else _Conv2dAligned
        return fn.apply(input, self.anchor, *self._values(names[0], weight, names[1], bias), self.run, *names, conf,
                        groups)

    def _group_norm(self, input, num_groups, weight=None, bias=None, eps=1e-5):
        names = self._split(input, weight, bias, "group norm")
        if names is None:
            return F.group_norm(input, num_groups, weight, bias, eps)
        scale, shift = self._values(names[0], weight, names[1], bias)
        normalized = F.group_norm(input, num_groups, None, None, eps)
        return _GroupNormAffine.apply(normalized, self.anchor, scale, shift, self.run, *names)


def _evaluate(model: nn.Module, loss_fn, inputs: Tensor, targets: Tensor, aligned: Mapping[str, Tensor] | None,
              mean_loss: bool | None, out: Mapping[str, Tensor] | None, factors: dict | None = None
              ) -> tuple[dict[str, Tensor], Tensor, bool | None]:
    params = dict(model.named_parameters())
    if not params:
        raise Unsupported("the model has no parameters")
    m, b = inputs.shape[:2]
    out = out or {}
    dests = {n: out[n] if n in out else p.new_empty(p.shape if aligned is not None else (m, *p.shape))
             for n, p in params.items()}
    run = _Pass(m, dests, factors)
    anchor = inputs.new_zeros((), dtype=next(iter(params.values())).dtype).requires_grad_()
    mode = _PerClient(params, m * b, aligned, run, anchor)
    with torch.enable_grad():
        with mode:
            output = model(inputs.reshape(m * b, *inputs.shape[2:]))
        if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != m * b:
            raise Unsupported("the model's output does not have the examples along its first dimension")
        total, matches = _loss_sum(loss_fn, output, targets, m, b, mean_loss)
        if total.requires_grad:  # the backward pass fills `dests`
            torch.autograd.grad(total, anchor, allow_unused=True)
    for n, dest in dests.items():
        if n not in run.written:  # a parameter the forward did not use
            dest.zero_()
    if factors is not None:
        for n in [n for n in factors if run.uses.get(n) != 1]:  # used twice: g_i is no longer one product
            del factors[n]
    return dests, total.detach(), matches


def _loss_sum(loss_fn, output: Tensor, targets: Tensor, m: int, b: int, mean_loss: bool | None):
    """sum_i f_i: per client with vmap (any loss), or m * loss over all examples (a mean over examples: cheaper).

    mean_loss None computes both, differentiates the per-client one and says whether the two agree.
    """
    if mean_loss:
        return loss_fn(output, targets.reshape(m * b, *targets.shape[2:])) * m, True
    total = vmap(loss_fn)(output.reshape(m, b, *output.shape[1:]), targets).sum()
    if mean_loss is None:
        with torch.no_grad():
            pooled = loss_fn(output, targets.reshape(m * b, *targets.shape[2:])) * m
        tol = 1e-10 if output.dtype == torch.float64 else 1e-4
        return total, bool(torch.isclose(pooled, total, rtol=tol, atol=tol * 1e-3).item())
    return total, None


def client_gradients(model: nn.Module, loss_fn, inputs: Tensor, targets: Tensor, mean_loss: bool | None = False,
                     out: Mapping[str, Tensor] | None = None, factors: dict | None = None
                     ) -> tuple[dict[str, Tensor], Tensor, bool | None]:
    """Each client's gradient at the model's parameters (by name, [m, ...]) and the sum of the client losses.

    `inputs` [m, b, ...], `targets` [m, b, ...]: the same numbers as `functional.client_gradients` with vmap. With
    `mean_loss`, `loss_fn` is trusted to be a mean over examples (true for the usual losses, e.g. cross-entropy)
    and evaluated once on all m*b examples; None checks that (third result: whether it holds; the gradients are
    then computed per client). `out` ([m, ...] by name, e.g. views of one [m, P] buffer) receives the gradients.
    A `factors` dict receives, for the Linear weights where that is cheaper (`FACTOR_RATIO`), the factors of their
    per-client gradients (for `displaced_points`) and their squared norms [m] (name -> (input, output gradient,
    squared norms)). Raises `Unsupported` when the model uses a parameter otherwise than through the supported
    layers.
    """
    return _evaluate(model, loss_fn, inputs, targets, None, mean_loss, out, factors)


def displaced_points(params: Mapping[str, Tensor], client_grads: dict[str, Tensor], mean_grad: Mapping[str, Tensor],
                     beta: float, factors: Mapping | None = None) -> dict[str, Tensor | Factored]:
    """Each client's Z_i = (x - beta ḡ) + beta g_i by name: written over `client_grads` ([m, ...], one pass), or
    `Factored` for the weights in `factors` (whose per-client gradients are then left as they are)."""
    points: dict[str, Tensor | Factored] = {}
    for n, g in client_grads.items():
        shift = torch.add(params[n], mean_grad[n], alpha=-beta)
        if factors and n in factors:
            points[n] = Factored(shift, beta, *factors[n][:2])
        else:
            points[n] = torch.add(shift, g, alpha=beta, out=g)
    return points


def displaced_gradient_sum(model: nn.Module, loss_fn, displaced: Mapping[str, Tensor], inputs: Tensor, targets: Tensor,
                           mean_loss: bool | None = False, out: Mapping[str, Tensor] | None = None
                           ) -> tuple[dict[str, Tensor], Tensor, bool | None]:
    """sum_i grad f_i(Z_i) by name (shaped like the parameters) and sum_i f_i(Z_i).

    `displaced` holds the per-client points Z_i by parameter name ([m, ...]); the model's own parameter values
    are not used. `mean_loss`, `out` and `Unsupported` as for `client_gradients`.
    """
    return _evaluate(model, loss_fn, inputs, targets, displaced, mean_loss, out)
