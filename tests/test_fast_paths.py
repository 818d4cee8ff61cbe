"""The fast paths (one forward/backward over all clients) give the vmap and loop numbers, and leave the model alone."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradalign import TrainConfig, fast_convs, fast_layers, fast_paths, gradalign_gradient
from gradalign.algorithms import ALGORITHM_CLASSES, RoundBatch
from gradalign.functional import (
    ParamLayout,
    client_gradients,
    flat_params,
    flatten_rows,
    make_grad_fn,
    param_dict,
)
from gradalign.models import ResNet18, build_model

BETAS = [0.0, 0.05, 0.7]
RTOL = 1e-10


def _model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A float64 model with every parameter perturbed (so that GroupNorm scales differ from 1, biases from 0).

    'mnist1d_mlp' and 'mnist1d_cnn' are mlp and cnn on MNIST-1D's signals (1, 40): the MNIST-1D paper's models.
    """
    torch.manual_seed(seed)
    if name == "resnet18":  # a narrow ResNet-18 (same blocks, GroupNorm, shortcuts), on images it keeps above 1x1
        model, shape = ResNet18(1, 10, width=8), (1, 16, 16)
    elif name.startswith("mnist1d_"):
        model, shape = build_model(name.removeprefix("mnist1d_"), (1, 40), 10), (1, 40)
    else:
        model, shape = build_model(name, (1, 8, 8), 10), (1, 8, 8)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, shape


def _data(shape, clients=3, batch=4, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(clients, batch, *shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (clients, batch), generator=g)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err <= rtol, f"relative error {err:.2e}"


def _loop_direction(model, loss_fn, batches, beta):
    """The definition, client by client: (1/m) sum_i grad f_i(x - beta (ḡ - g_i)) with separate backward passes."""

    def grad_at(flat, x, y):
        clone = copy.deepcopy(model)
        nn.utils.vector_to_parameters(flat, clone.parameters())
        return _flat(torch.autograd.grad(loss_fn(clone(x), y), list(clone.parameters())))

    x0 = flat_params(model)
    grads = torch.stack([grad_at(x0, x, y) for x, y in batches])
    mean = grads.mean(0)
    return torch.stack([grad_at(x0 - beta * (mean - g), x, y) for g, (x, y) in zip(grads, batches)]).mean(0)


@pytest.fixture(params=["default", "grouped-dense", "loop-factored"])
def kernels(request, monkeypatch):
    """The kernel choices (all exact): per-client convolutions grouped or one per client, Linear weights displaced
    as [m, out, in] matrices or through their factors; 'default' keeps the size-based choices."""
    if request.param != "default":
        dense = request.param == "grouped-dense"
        monkeypatch.setattr(fast_convs, "CONV_LOOP_MIN_EXAMPLES", 10**9 if dense else 1)
        monkeypatch.setattr(fast_layers, "FACTOR_RATIO", 0.0 if dense else 1e9)
    return request.param


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet", "resnet18", "mnist1d_mlp", "mnist1d_cnn"])
def test_direction_equals_vmap_and_loop_paths(name, kernels):
    model, shape = _model(name)
    assert fast_paths.unsupported_reason(model) is None
    x, y = _data(shape)
    batches = list(zip(x, y))
    for beta in BETAS:
        fast = _flat(gradalign_gradient(model, F.cross_entropy, batches, beta))
        vmapped = _flat(gradalign_gradient(model, F.cross_entropy, batches, beta, fast_path=False))
        _close(fast, vmapped)
        _close(fast, _loop_direction(model, F.cross_entropy, batches, beta))


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet", "resnet18", "mnist1d_mlp", "mnist1d_cnn"])
def test_per_client_gradients_equal_vmap(name, kernels):
    model, shape = _model(name)
    x, y = _data(shape)
    expected, losses = client_gradients(make_grad_fn(model, F.cross_entropy), param_dict(model), x, y)
    for mean_loss in (False, True, None):
        grads, loss_sum, matches = fast_paths.client_gradients(model, F.cross_entropy, x, y, mean_loss)
        _close(flatten_rows(grads), flatten_rows(expected))
        assert loss_sum.item() == pytest.approx(losses.sum().item(), rel=1e-12)
        assert matches in (None, True)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18", "mnist1d_cnn"])
def test_gradalign_paths_follow_the_same_trajectory(name, kernels):
    """GradAlign on the fast, vmap and loop paths: same parameters, losses and diagnostics after a few steps."""
    _, shape = _model(name)
    x, y = _data(shape, clients=4, batch=3)
    cfg = TrainConfig(algorithm="gradalign", batch_size=12, clients=4, lr=0.3, beta=0.2, momentum=0.5, dtype="float64")
    runs = {}
    for path, vmap, fast in (("fast", True, True), ("vmap", True, False), ("loop", False, True)):
        model, _ = _model(name)
        algo = ALGORITHM_CLASSES["gradalign"](model, F.cross_entropy, cfg.replace(vmap=vmap), fast_path=fast)
        results = [
            algo.step(RoundBatch(list(range(4)), x.unsqueeze(1) + 0.1 * k, y.unsqueeze(1), 4, True)) for k in range(3)
        ]
        assert algo.path == path
        runs[path] = (flat_params(model), results)
    params, results = runs["fast"]
    for path in ("vmap", "loop"):
        other_params, other_results = runs[path]
        _close(params, other_params)
        for r, o in zip(results, other_results):
            assert r.loss == pytest.approx(o.loss, rel=1e-10)
            for key, value in r.alignment.as_dict().items():
                assert value == pytest.approx(o.alignment.as_dict()[key], rel=1e-8, abs=1e-12), key


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_layer_variants_equal_vmap(kernels):
    """Strides, dilation, groups, string and reflect padding, no bias, a Linear on 3-d inputs, GroupNorm w/o affine."""
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, bias=False)
            self.b = nn.Conv2d(4, 4, 4, padding="same", groups=2)  # asymmetric 'same' (even kernel)
            self.c = nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect")
            self.n = nn.GroupNorm(3, 6)
            self.n0 = nn.GroupNorm(2, 6, affine=False)
            self.t = nn.Linear(6, 5)
            self.out = nn.Linear(5 * 16, 3, bias=False)

        def forward(self, x):
            h = self.n0(self.n(torch.tanh(self.c(torch.tanh(self.b(self.a(x)))))))
            h = self.t(h.flatten(2).transpose(1, 2))  # [N, 16, 6] -> [N, 16, 5]: a Linear over the positions
            return self.out(torch.tanh(h).flatten(1))

    model = Net().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert fast_paths.unsupported_reason(model) is None
    x, y = _data((2, 8, 8), classes=3)
    batches = list(zip(x, y))
    for beta in BETAS:
        fast = _flat(gradalign_gradient(model, F.cross_entropy, batches, beta))
        _close(fast, _flat(gradalign_gradient(model, F.cross_entropy, batches, beta, fast_path=False)))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv1d_variants_equal_vmap(kernels):
    """Conv1d with strides, dilation, groups, string ('same' with an even kernel: asymmetric) and circular padding,
    no bias, and a GroupNorm on its [N, C, L] output."""
    torch.manual_seed(7)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(2, 4, 5, stride=2, padding=1, bias=False)
            self.b = nn.Conv1d(4, 4, 4, padding="same", groups=2)
            self.c = nn.Conv1d(4, 6, 3, padding=2, dilation=2, padding_mode="circular")
            self.d = nn.Conv1d(6, 6, 3, padding="valid")
            self.n = nn.GroupNorm(3, 6)
            self.out = nn.Linear(6 * 6, 3)

        def forward(self, x):
            h = torch.tanh(self.c(torch.tanh(self.b(self.a(x)))))
            return self.out(torch.tanh(self.n(self.d(h))).flatten(1))

    model = Net().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert fast_paths.unsupported_reason(model) is None
    x, y = _data((2, 17), classes=3)
    batches = list(zip(x, y))
    for beta in BETAS:
        fast = _flat(gradalign_gradient(model, F.cross_entropy, batches, beta))
        _close(fast, _flat(gradalign_gradient(model, F.cross_entropy, batches, beta, fast_path=False)))
    grads, _, _ = fast_paths.client_gradients(model, F.cross_entropy, x, y)
    expected, _ = client_gradients(make_grad_fn(model, F.cross_entropy), param_dict(model), x, y)
    _close(flatten_rows(grads), flatten_rows(expected))


def test_a_layer_called_twice_adds_its_gradients(kernels):
    """A module applied twice in one forward: its gradients sum over both calls (and it is never factored)."""
    torch.manual_seed(4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.mid, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.mid(torch.tanh(self.mid(torch.tanh(self.inp(x)))))))

    model = Twice().double()
    x, y = _data((5,), classes=3)
    batches = list(zip(x, y))
    assert fast_paths.unsupported_reason(model) is None
    grads, _, _ = fast_paths.client_gradients(model, F.cross_entropy, x, y, factored=True)
    assert isinstance(grads["mid.weight"], torch.Tensor)
    for beta in BETAS:
        _close(
            _flat(gradalign_gradient(model, F.cross_entropy, batches, beta)),
            _loop_direction(model, F.cross_entropy, batches, beta),
        )


class _WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4 * 5, 3)

    def forward(self, tokens):
        return self.fc(self.emb(tokens).flatten(1))


class _WithCustomParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.scale


class _TiedWeights(nn.Module):
    """Every parameter sits in a Linear (the static check passes), but the forward also uses one directly."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h) + h @ self.head.weight.t()


def _token_data(clients=3, batch=4):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 7, (clients, batch, 5), generator=g), torch.randint(0, 3, (clients, batch), generator=g)


@pytest.mark.parametrize("make", [_WithEmbedding, _WithCustomParameter, _TiedWeights])
def test_unsupported_models_fall_back_with_the_same_numbers(make):
    torch.manual_seed(0)
    model = make().double()
    x, y = _token_data() if make is _WithEmbedding else _data((5,), classes=3)
    if make is _TiedWeights:
        assert fast_paths.unsupported_reason(model) is None
        with pytest.raises(fast_paths.Unsupported, match="head.weight"):
            fast_paths.client_gradients(model, F.cross_entropy, x, y)
    else:
        assert fast_paths.unsupported_reason(model) is not None
    assert torch._C._len_torch_function_stack() == 0
    batches = list(zip(x, y))
    for beta in BETAS:
        direction = _flat(gradalign_gradient(model, F.cross_entropy, batches, beta))
        _close(direction, _loop_direction(model, F.cross_entropy, batches, beta))

    cfg = TrainConfig(algorithm="gradalign", batch_size=12, clients=3, lr=0.1, dtype="float64")
    models = [copy.deepcopy(model) for _ in range(2)]
    algos = [
        ALGORITHM_CLASSES["gradalign"](mod, F.cross_entropy, cfg, fast_path=fast)
        for mod, fast in zip(models, (True, False))
    ]
    for algo in algos:
        algo.step(RoundBatch([0, 1, 2], x.unsqueeze(1), y.unsqueeze(1), 3, True))
        assert algo.path == "vmap" and algo.fallback_reason
    _close(flat_params(models[0]), flat_params(models[1]))


def test_shared_weights_are_refused_statically():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    assert "shared" in fast_paths.unsupported_reason(model)
    assert "BatchNorm" in fast_paths.unsupported_reason(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))


def test_model_is_left_alone():
    """Parameters, .grad, hooks and torch-function modes are as before, also when the loss raises."""
    model, shape = _model("cnn")
    model.requires_grad_(True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    model[0].weight.grad = None
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data(shape)
    gradalign_gradient(model, F.cross_entropy, list(zip(x, y)), beta=0.5)

    def failing_loss(outputs, targets):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fast_paths.client_gradients(model, failing_loss, x, y, mean_loss=True)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert model[0].weight.grad is None
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in list(model.parameters())[1:])
    assert torch._C._len_torch_function_stack() == 0
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and "forward" not in vars(module)


def test_frozen_parameters_get_gradients_like_vmap():
    model, shape = _model("mlp")
    model[1].weight.requires_grad_(False)
    x, y = _data(shape)
    batches = list(zip(x, y))
    fast = _flat(gradalign_gradient(model, F.cross_entropy, batches, 0.3))
    _close(fast, _flat(gradalign_gradient(model, F.cross_entropy, batches, 0.3, fast_path=False)))


def test_a_loss_that_is_not_a_mean_is_evaluated_per_client():
    """The fast step trusts loss_fn(all examples) * m only after checking it against the per-client losses."""
    model, shape = _model("mlp")
    x, y = _data(shape)

    def summed(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="sum")

    _, _, matches = fast_paths.client_gradients(model, summed, x, y, mean_loss=None)
    assert matches is False
    cfg = TrainConfig(algorithm="gradalign", batch_size=12, clients=3, lr=0.01, beta=0.3, dtype="float64")
    models = [copy.deepcopy(model) for _ in range(2)]
    for mod, fast in zip(models, (True, False)):
        algo = ALGORITHM_CLASSES["gradalign"](mod, summed, cfg, fast_path=fast)
        for _ in range(2):
            algo.step(RoundBatch([0, 1, 2], x.unsqueeze(1), y.unsqueeze(1), 3, True))
    _close(flat_params(models[0]), flat_params(models[1]))


def test_one_client_and_the_gradient_of_one_batch():
    """m = 1: GradAlign's direction is the plain gradient of that batch, for any beta."""
    model, shape = _model("lenet")
    x, y = _data(shape, clients=1)
    expected = _flat(torch.autograd.grad(F.cross_entropy(model(x[0]), y[0]), list(model.parameters())))
    _close(_flat(gradalign_gradient(model, F.cross_entropy, [(x[0], y[0])], 0.4)), expected)
    layout = ParamLayout.of(model)
    assert layout.size == expected.numel()


def test_factored_gradients_equal_the_dense_ones(monkeypatch):
    """A Linear weight kept as factors: its materialised, summed, weighted and squared-norm values are the dense
    ones."""
    monkeypatch.setattr(fast_layers, "FACTOR_RATIO", 1e9)
    model, shape = _model("mlp")
    x, y = _data(shape, clients=4, batch=3)
    dense, _, _ = fast_paths.client_gradients(model, F.cross_entropy, x, y)
    factored, _, _ = fast_paths.client_gradients(model, F.cross_entropy, x, y, factored=True)
    weights = [n for n, g in factored.items() if isinstance(g, fast_paths.FactoredGrads)]
    assert weights == [n for n in dense if n.endswith("weight")]  # every Linear weight, no bias
    w = torch.rand(4, dtype=torch.float64)
    for n in weights:
        f, d = factored[n], dense[n]
        assert f.shape == d.shape
        _close(f.materialize(), d)
        _close(f.weighted_sum(), d.sum(0))
        _close(f.weighted_sum(w), (d * w.reshape(-1, 1, 1)).sum(0))
        _close(f.squared_norms, d.flatten(1).pow(2).sum(1))
        _close(f.squared_norm_sum(), d.pow(2).sum())


def test_scales_folded_into_the_evaluations_give_the_divided_results():
    """mean_scale (ḡ given as a sum) and grad_scale (the seed of the backward pass) equal dividing afterwards."""
    model, shape = _model("mlp")
    x, y = _data(shape, clients=4, batch=3)
    params = param_dict(model)
    grads, _, _ = fast_paths.client_gradients(model, F.cross_entropy, x, y, factored=True)
    grad_sum = {n: g.sum(0) if isinstance(g, torch.Tensor) else g.weighted_sum() for n, g in grads.items()}
    divided = fast_paths.displaced_points(params, grads, {n: s / 4 for n, s in grad_sum.items()}, 0.3)
    folded = fast_paths.displaced_points(params, grads, grad_sum, 0.3, mean_scale=0.25)
    want, want_loss, _ = fast_paths.displaced_gradient_sum(model, F.cross_entropy, divided, x, y)
    got, got_loss, _ = fast_paths.displaced_gradient_sum(model, F.cross_entropy, folded, x, y, grad_scale=0.25)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-12)  # the loss itself is not scaled
    for n in want:
        _close(got[n], want[n] / 4)


def test_the_first_layer_reuses_its_input_gram_product(monkeypatch):
    """The displaced pass sees the very input of the first pass at the first Linear: the per-client product
    h_i g_i^T = (x_i x_i^T) delta_i made in the first pass is reused, and it is the dense one."""
    monkeypatch.setattr(fast_layers, "FACTOR_RATIO", 1e9)
    model, shape = _model("mlp")
    x, y = _data(shape)
    grads, _, _ = fast_paths.client_gradients(model, F.cross_entropy, x, y, factored=True)
    first = grads["1.weight"]  # (model[0] is the Flatten)
    same_input = x.reshape(x.shape[0] * x.shape[1], -1)
    dense = torch.bmm(x.reshape(x.shape[0], x.shape[1], -1), first.materialize().transpose(1, 2))
    _close(first.gram_grads, dense.reshape(first.gram_grads.shape))
    assert first.gram_grads_with(same_input) is first.gram_grads
    other = first.gram_grads_with(same_input.clone())  # other memory: computed afresh
    assert other is not first.gram_grads
    _close(other, first.gram_grads)
    x.mul_(1.0)  # written in place: the saved product may be stale, so it is not reused
    assert first.gram_grads_with(x.reshape(same_input.shape)) is not first.gram_grads


def test_steps_without_diagnostics_take_the_same_step():
    """batch.diagnose only adds the cosine (a second moment in the first all-reduce): same parameters, same V."""
    _, shape = _model("mlp")
    x, y = _data(shape, clients=4, batch=3)
    cfg = TrainConfig(algorithm="gradalign", batch_size=12, clients=4, lr=0.3, beta=0.2, dtype="float64")
    runs = {}
    for diagnose in (True, False):
        for fast in (True, False):
            model, _ = _model("mlp")
            algo = ALGORITHM_CLASSES["gradalign"](model, F.cross_entropy, cfg, fast_path=fast)
            results = [
                algo.step(RoundBatch(list(range(4)), x.unsqueeze(1) + 0.1 * k, y.unsqueeze(1), 4, diagnose))
                for k in range(2)
            ]
            runs[diagnose, fast] = flat_params(model), results
    reference, with_cosine = runs[True, True]
    for key, (params, results) in runs.items():
        _close(params, reference)
        for r, o in zip(results, with_cosine):
            got, want = r.alignment.as_dict(), o.alignment.as_dict()
            assert (got["grad_cosine"] == got["grad_cosine"]) is key[0]  # NaN exactly when not diagnosing
            for name in ("grad_variance", "grad_norm_sq", "gns_simple"):
                assert got[name] == pytest.approx(want[name], rel=1e-9), (key, name)


class _InPlaceOutputs(nn.Module):
    """ReLU(inplace=True) straight on Linear and GroupNorm outputs: the gradient wanted is at the layer's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.out = nn.Linear(6, 10)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.act(self.norm(self.conv(x)))
        return self.out(self.act(self.fc(h.flatten(1))))


def test_layer_outputs_changed_in_place_keep_the_exact_numbers(kernels):
    torch.manual_seed(5)
    model = _InPlaceOutputs().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = _data((1, 8, 8))
    batches = list(zip(x, y))
    for beta in BETAS:
        _close(
            _flat(gradalign_gradient(model, F.cross_entropy, batches, beta)),
            _loop_direction(model, F.cross_entropy, batches, beta),
        )
    grads, _, _ = fast_paths.client_gradients(model, F.cross_entropy, x, y)
    expected, _ = client_gradients(make_grad_fn(model, F.cross_entropy), param_dict(model), x, y)
    _close(flatten_rows(grads), flatten_rows(expected))


class _InputChangedAfterUse(nn.Module):
    """A Linear's input is changed in place after the layer read it (its saved input would be stale)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x) * 1.0
        y = self.out(h)
        h.add_(1.0)
        return y + h.sum(1, keepdim=True)


def test_an_input_changed_after_the_layer_read_it_is_refused():
    """Plain autograd refuses such a model too (the weight gradient needs the old input); the fast path says why."""
    torch.manual_seed(6)
    model = _InputChangedAfterUse().double()
    x, y = _data((5,), classes=3)
    with pytest.raises(fast_paths.Unsupported, match="out.weight"):
        fast_paths.client_gradients(model, F.cross_entropy, x, y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        F.cross_entropy(model(x[0]), y[0]).backward()


def test_parameters_swapped_between_steps_are_seen():
    """`p.data = ...` (e.g. nn.utils.vector_to_parameters) between steps: the fast step uses the new values."""
    _, shape = _model("mlp")
    x, y = _data(shape, clients=4, batch=3)
    cfg = TrainConfig(algorithm="gradalign", batch_size=12, clients=4, lr=0.3, beta=0.2, dtype="float64")
    models = []
    for fast in (True, False):
        model, _ = _model("mlp")
        algo = ALGORITHM_CLASSES["gradalign"](model, F.cross_entropy, cfg, fast_path=fast)
        batch = RoundBatch(list(range(4)), x.unsqueeze(1), y.unsqueeze(1), 4, False)
        algo.step(batch)
        nn.utils.vector_to_parameters(0.5 * flat_params(model), model.parameters())
        algo.step(batch)
        models.append(model)
    _close(flat_params(models[0]), flat_params(models[1]))


@pytest.mark.parametrize("name", ["mlp", "cnn", "mnist1d_cnn"])
def test_a_step_frees_its_tensors_when_it_returns(name, kernels):
    """No reference cycle holds a fast step's graph, activations or gradients: with the garbage collector off, nothing
    of the step is left for it to find (a cycle would keep them alive, several MB a step, until gc runs)."""
    _, shape = _model(name)
    x, y = _data(shape, clients=4, batch=3)
    cfg = TrainConfig(algorithm="gradalign", batch_size=12, clients=4, lr=0.3, beta=0.2, dtype="float64")
    model, _ = _model(name)
    algo = ALGORITHM_CLASSES["gradalign"](model, F.cross_entropy, cfg)
    batch = RoundBatch(list(range(4)), x.unsqueeze(1), y.unsqueeze(1), 4, True)
    algo.step(batch)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable goes to gc.garbage instead of being freed
    try:
        algo.step(batch)
        gradalign_gradient(model, F.cross_entropy, list(zip(x, y)), 0.2)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, (torch.Tensor, torch.autograd.graph.Node))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert algo.path == "fast"
    assert left == []


def test_a_model_converted_between_steps_gets_new_buffers():
    """model.double() between steps changes the parameters' dtype in place: the fast step's kept buffers follow."""
    _, shape = _model("mlp")
    x, y = _data(shape, clients=4, batch=3)
    cfg = TrainConfig(algorithm="gradalign", batch_size=12, clients=4, lr=0.3, beta=0.2)
    results = []
    for fast in (True, False):
        model, _ = _model("mlp")
        model.float()
        algo = ALGORITHM_CLASSES["gradalign"](model, F.cross_entropy, cfg, fast_path=fast)
        algo.step(RoundBatch(list(range(4)), x.float().unsqueeze(1), y.unsqueeze(1), 4, False))
        model.double()
        algo.step(RoundBatch(list(range(4)), x.unsqueeze(1), y.unsqueeze(1), 4, False))
        assert algo.path == ("fast" if fast else "vmap")
        results.append(flat_params(model))
    assert results[0].dtype == torch.float64
    _close(results[0], results[1], rtol=1e-6)  # (the first step ran in float32)
