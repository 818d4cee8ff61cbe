"""Exact fast paths for GradAlign's two gradient evaluations: one ordinary forward/backward over all clients each.

GradAlign needs (1) every client's gradient g_i at the shared parameters x and (2) the sum over clients of the
gradients at the displaced points Z_i = x - beta (ḡ - g_i). The generic path evaluates both with
`vmap(grad(...))`; for (2) that materialises every client's gradient at Z_i ([m, P] values) only to sum them.

Here each is one forward and one backward pass of the module over the m*b examples of all clients, in which the
parameterised layers (`F.linear`, `F.conv1d`, `F.conv2d`, `F.group_norm` called with the model's parameters, i.e.
nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm) are evaluated per client (rows i*b .. (i+1)*b of a layer's input
belong to client i):

- per-client gradients (1): the forward and backward are the ordinary ones; from each layer's input and the gradient
  at its output the weight gradient is one product per client (what vmap computes), written straight into the
  caller's buffer; nothing else is per client.
- summed displaced gradients (2): client i's rows go through the layer with its own weights Z_i (batched matrix
  products; convolutions per client or grouped), but since dZ_i/dx = I the weight gradient is accumulated directly
  onto the shared x: one ordinary product over all m*b examples, as in large-batch SGD. No [m, P] gradient exists.
- a Linear weight whose per-client gradients g_i = delta_i^T x_i have few rows per client is never materialised
  as [m, out, in] matrices: in (1) it stays `FactoredGrads` (sum_i g_i is one product, |g_i|^2 comes from the
  small products (x_i x_i^T) delta_i), in (2) Z_i = shift + beta delta_i^T x_i is applied through the factors
  (`Factored`; at the first layer, whose input is the same in both passes, those products are reused).

The layers themselves are in `fast_layers` (Linear and GroupNorm as ordinary autograd ops whose output gradients the
backward pass hands back) and `fast_convs` (Conv1d and Conv2d as autograd Functions); this module holds the mode
that swaps them in and the public functions.

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

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from .fast_convs import _conv_args, _ConvAligned, _ConvClientGrads
from .fast_layers import (
    Factored,
    FactoredGrads,
    Pass,
    Unsupported,
    group_norm_affine,
    linear_at_shared,
    linear_displaced,
    linear_factored,
)

__all__ = [
    "SUPPORTED_MODULES",
    "Factored",
    "FactoredGrads",
    "Unsupported",
    "client_gradients",
    "displaced_gradient_sum",
    "displaced_points",
    "unsupported_reason",
]

SUPPORTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm)
"""Module types whose parameters the fast paths handle (subclasses only if they keep the original forward)."""


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast paths cannot evaluate `model` (None if they can), from its structure alone.

    Every parameter must be held directly by a Linear, Conv1d, Conv2d or GroupNorm (with its original forward), under
    its own name (weight, bias), by one module only (no weight sharing); no BatchNorm anywhere.
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
        if base is None or any(
            getattr(type(module), f) is not getattr(base, f) for f in ("forward", "_conv_forward") if hasattr(base, f)
        ):
            return (
                f"{name or 'model'} ({type(module).__name__}) holds parameters and is not one of "
                f"{', '.join(c.__name__ for c in SUPPORTED_MODULES)}"
            )
        extra = sorted(set(own) - {"weight", "bias"})
        if extra:
            return f"{name or 'model'} ({type(module).__name__}) holds extra parameters {extra}"
    named = list(model.named_parameters(remove_duplicate=False))
    if len({id(p) for _, p in named}) != len(named):
        return "a parameter is shared between modules"
    return None


# -- the mode that swaps them in --------------------------------------------------------------------------------

_METADATA = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "requires_grad",
        "is_leaf",
        "ndim",
        "layout",
        "names",
        "grad_fn",
        "is_cuda",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "is_nested",
        "itemsize",
        "nbytes",
        "size",
        "dim",
        "numel",
        "nelement",
        "ndimension",
        "stride",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "element_size",
        "__len__",
        "__hash__",
        "__repr__",
        "__format__",
    }
)
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

    def __init__(self, params: Mapping[str, Tensor], examples: int, aligned: Mapping[str, Tensor] | None, run: Pass):
        super().__init__()
        self.names = {id(p): n for n, p in params.items()}
        self.n, self.aligned, self.run = examples, aligned, run

    def _name(self, t) -> str | None:
        return self.names.get(id(t)) if isinstance(t, Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(self, *args, **kwargs)
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
            raise Unsupported(
                f"the input of a {what} has shape {tuple(input.shape)}, not the {self.n} examples along "
                "its first dimension"
            )
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
        if self.aligned is None:
            return linear_at_shared(self.run, input, *values, *names)
        fn = linear_factored if isinstance(values[0], Factored) else linear_displaced
        return fn(self.run, input, *values, *names)

    def _conv1d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return self._conv(F.conv1d, input, weight, bias, stride, padding, dilation, groups)

    def _conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return self._conv(F.conv2d, input, weight, bias, stride, padding, dilation, groups)

    def _conv(self, conv, input, weight, bias, stride, padding, dilation, groups):
        names = self._split(input, weight, bias, "convolution")
        if names is None:
            return conv(input, weight, bias, stride, padding, dilation, groups)
        if input.dim() != weight.dim():
            raise Unsupported(f"the fast path needs batched ({weight.dim()}-d) convolution inputs")
        input, conf = _conv_args(input, weight, stride, padding, dilation)
        fn = _ConvClientGrads if self.aligned is None else _ConvAligned
        values = self._values(names[0], weight, names[1], bias)
        return fn.apply(input, self.run.anchor(input), *values, self.run, *names, conf, groups)

    def _group_norm(self, input, num_groups, weight=None, bias=None, eps=1e-5):
        names = self._split(input, weight, bias, "group norm")
        if names is None:
            return F.group_norm(input, num_groups, weight, bias, eps)
        scale, shift = self._values(names[0], weight, names[1], bias)
        normalized = F.group_norm(input, num_groups, None, None, eps)
        return group_norm_affine(self.run, normalized, scale, shift, *names)


_HANDLERS = {
    F.linear: _PerClient._linear,
    F.conv1d: _PerClient._conv1d,
    F.conv2d: _PerClient._conv2d,
    F.group_norm: _PerClient._group_norm,
}
"""The layers `_PerClient` evaluates per client (unbound: a mode holding its own bound methods would be a reference
cycle, which keeps a step's graph and activations alive until Python's garbage collector runs)."""


def _evaluate(
    model: nn.Module,
    loss_fn,
    inputs: Tensor,
    targets: Tensor,
    aligned: Mapping[str, Tensor] | None,
    mean_loss: bool | None,
    out: Mapping[str, Tensor] | None,
    factored: bool = False,
    params: Mapping[str, Tensor] | None = None,
    grad_scale: float = 1.0,
) -> tuple[dict[str, Tensor | FactoredGrads], Tensor, bool | None]:
    params = dict(model.named_parameters()) if params is None else params
    if not params:
        raise Unsupported("the model has no parameters")
    m, b = inputs.shape[:2]
    out = out or {}
    dests = {
        n: out[n] if n in out else p.new_empty(p.shape if aligned is not None else (m, *p.shape))
        for n, p in params.items()
    }
    run = Pass(m, dests, {} if factored else None)
    try:
        with torch.enable_grad():
            with _PerClient(params, m * b, aligned, run):
                output = model(inputs.reshape(m * b, *inputs.shape[2:]))
            if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != m * b:
                raise Unsupported("the model's output does not have the examples along its first dimension")
            total, matches = _loss_sum(loss_fn, output, targets, m, b, mean_loss)
            grads = ()
            if total.requires_grad:  # the backward pass: the convolutions fill `dests`, the taps get their gradients
                anchors = [run.anchored] if run.anchored is not None else []
                seed = None if grad_scale == 1 else torch.full_like(total, grad_scale)
                grads = torch.autograd.grad(total, [*anchors, *(edge for edge, _ in run.taps)], seed, allow_unused=True)
                grads = grads[len(anchors) :]
        with torch.no_grad():  # (the saved layer inputs are nodes of the graph)
            for (_, finish), grad in zip(run.taps, grads):
                if grad is not None:  # (None: the layer's output did not reach the loss; its gradients stay 0)
                    finish(grad)
    finally:  # the taps' closures refer to `run`: without this the cycle keeps the graph alive until gc
        run.taps.clear()
    for n, dest in dests.items():
        if n not in run.written:  # a parameter the forward did not use
            dest.zero_()
    if run.factored:
        dests = {n: run.factored.get(n, dest) for n, dest in dests.items()}
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


def client_gradients(
    model: nn.Module,
    loss_fn,
    inputs: Tensor,
    targets: Tensor,
    mean_loss: bool | None = False,
    out: Mapping[str, Tensor] | None = None,
    factored: bool = False,
    params: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor | FactoredGrads], Tensor, bool | None]:
    """Each client's gradient at the model's parameters (by name, [m, ...]) and the sum of the client losses.

    `inputs` [m, b, ...], `targets` [m, b, ...]: the same numbers as `functional.client_gradients` with vmap. With
    `mean_loss`, `loss_fn` is trusted to be a mean over examples (true for the usual losses, e.g. cross-entropy)
    and evaluated once on all m*b examples; None checks that (third result: whether it holds; the gradients are
    then computed per client). `out` ([m, ...] by name, e.g. views of one [m, P] buffer) receives the gradients.
    With `factored`, the Linear weights for which that is cheaper (`fast_layers.FACTOR_RATIO`) get `FactoredGrads`
    instead of [m, out, in] gradients (their `out` buffers are left as they were): `functional.gradient_moments`,
    `functional.sum_clients` and `displaced_points` take them as they are; `.materialize()` gives the tensor.
    `params` may pass `dict(model.named_parameters())` in, to save looking them up on every call.
    Raises `Unsupported` when the model uses a parameter otherwise than through the supported layers.
    """
    return _evaluate(model, loss_fn, inputs, targets, None, mean_loss, out, factored, params)


def displaced_points(
    params: Mapping[str, Tensor],
    client_grads: Mapping[str, Tensor | FactoredGrads],
    mean_grad: Mapping[str, Tensor],
    beta: float,
    overwrite: bool = False,
    mean_scale: float = 1.0,
) -> dict[str, Tensor | Factored]:
    """Each client's Z_i = (x - beta ḡ) + beta g_i by name: written over `client_grads` ([m, ...], one pass), or
    `Factored` for `FactoredGrads` (kept as factors: never [m, out, in] values). With `overwrite`, the shared part
    x - beta ḡ is also written over `mean_grad` (no new parameter-sized tensors at all). ḡ is `mean_scale *
    mean_grad` (e.g. the sum over m clients with 1/m: no separate pass to divide it)."""
    points: dict[str, Tensor | Factored] = {}
    for n, g in client_grads.items():
        mean = mean_grad[n]
        shift = torch.add(params[n], mean, alpha=-beta * mean_scale, out=mean if overwrite else None)
        points[n] = Factored(shift, beta, g) if isinstance(g, FactoredGrads) else torch.add(shift, g, alpha=beta, out=g)
    return points


def displaced_gradient_sum(
    model: nn.Module,
    loss_fn,
    displaced: Mapping[str, Tensor | Factored],
    inputs: Tensor,
    targets: Tensor,
    mean_loss: bool | None = False,
    out: Mapping[str, Tensor] | None = None,
    params: Mapping[str, Tensor] | None = None,
    grad_scale: float = 1.0,
) -> tuple[dict[str, Tensor], Tensor, bool | None]:
    """grad_scale * sum_i grad f_i(Z_i) by name (shaped like the parameters) and sum_i f_i(Z_i).

    `displaced` holds the per-client points Z_i by parameter name ([m, ...] or `Factored`); the model's own
    parameter values are not used. `grad_scale` (e.g. 1/m for the mean) seeds the backward pass: it costs nothing,
    where dividing the result is one more pass over P values. `mean_loss`, `out`, `params` and `Unsupported` as
    for `client_gradients`.
    """
    return _evaluate(model, loss_fn, inputs, targets, displaced, mean_loss, out, params=params, grad_scale=grad_scale)
