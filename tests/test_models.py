"""Models: shapes, parameter counts, float64, no BatchNorm, and per-client vmap over parameter sets."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from gradalign.config import MODELS
from gradalign.models import ResNet18, build_model, has_batchnorm

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_forward_shape_on_every_image_size(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    assert not has_batchnorm(model)


def test_mlp_takes_vectors_and_images():
    assert build_model("mlp", (60,), 10)(torch.randn(4, 60)).shape == (4, 10)
    mlp = build_model("mlp", (1, 8, 8), 10)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [200, 200, 10]


@pytest.mark.parametrize("name", ["cnn", "lenet", "resnet18"])
def test_image_models_refuse_vector_inputs(name):
    with pytest.raises(ValueError, match="input_shape"):
        build_model(name, (60,), 10)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        build_model("vgg", (3, 32, 32), 10)
    for name in MODELS:
        assert name in str(info.value)


def test_parameter_counts():
    # CNN on 28x28 MNIST, as in the FedAvg paper: 1,663,370 parameters.
    assert _n_params(build_model("cnn", (1, 28, 28), 10)) == 1_663_370
    # Classic LeNet-5 on CIFAR-10: 62,006 parameters.
    assert _n_params(build_model("lenet", (3, 32, 32), 10)) == 62_006
    # ResNet-18 (CIFAR stem) on CIFAR-10: 11,173,962 parameters with BatchNorm; GroupNorm has the same affine ones.
    assert _n_params(build_model("resnet18", (3, 32, 32), 10)) == 11_173_962
    # MLP 64-200-200-10.
    assert _n_params(build_model("mlp", (1, 8, 8), 10)) == 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10


def test_resnet_uses_groupnorm_with_capped_groups():
    model = build_model("resnet18", (3, 32, 32), 100)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == min(32, m.num_channels) for m in norms)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_has_batchnorm_detects_it():
    assert has_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    assert has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2))))
    assert not has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2), nn.LayerNorm(2)))


@pytest.mark.parametrize("name", MODELS)
def test_float64(name):
    model = build_model(name, (1, 8, 8), 10).double()
    out = model(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (2, 10)


def _stack(models):
    names = [k for k, _ in models[0].named_parameters()]
    return {k: torch.stack([dict(mod.named_parameters())[k].detach() for mod in models]) for k in names}


@pytest.mark.parametrize("name", MODELS)
def test_vmap_over_parameter_sets_matches_a_loop(name):
    """The per-client evaluation of the algorithms: m parameter sets, each applied to its own batch."""
    torch.manual_seed(0)
    shape, m, b = (1, 8, 8), 2, 2
    models = [build_model(name, shape, 10) for _ in range(m)]
    x = torch.randn(m, b, *shape)
    batched = vmap(lambda p, xb: functional_call(models[0], p, (xb,)), in_dims=(0, 0))(_stack(models), x)
    looped = torch.stack([models[i](x[i]) for i in range(m)])
    assert batched.shape == (m, b, 10)
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_vmap_per_client_gradients_match_separate_backward_passes(name):
    """vmap(grad) over parameter sets and batches gives each client's own gradient.

    In float64, so that the comparison is tight (float32 rounding differs between the batched and the plain kernels).
    ResNet-18 is checked at a quarter of its width (same blocks, GroupNorm and shortcuts): the full one takes
    seconds per backward pass on a small CPU.
    """
    torch.manual_seed(0)
    shape, m, b = (1, 8, 8), 2, 3
    if name == "resnet18":
        models = [ResNet18(1, 10, width=16).double() for _ in range(m)]
    else:
        models = [build_model(name, shape, 10).double() for _ in range(m)]
    x, y = torch.randn(m, b, *shape, dtype=torch.float64), torch.randint(0, 10, (m, b))

    def loss(p, xb, yb):
        return nn.functional.cross_entropy(functional_call(models[0], p, (xb,)), yb)

    grads = vmap(torch.func.grad(loss), in_dims=(0, 0, 0))(_stack(models), x, y)
    for i, mod in enumerate(models):
        mod.zero_grad()
        nn.functional.cross_entropy(mod(x[i]), y[i]).backward()
        for k, p in mod.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, rtol=1e-9, atol=1e-12)
