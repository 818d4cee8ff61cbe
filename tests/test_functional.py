"""The GradAlign direction itself: exactness, the implicit regulariser, and that the model is left alone."""

import pytest
import torch
import torch.nn.functional as F
from helpers import client_batches, tiny_model

from gradalign import gradalign_gradient
from gradalign.functional import (
    ParamLayout,
    alignment_from_moments,
    client_gradients,
    flat_params,
    flatten_rows,
    gradient_moments,
    make_grad_fn,
    param_dict,
)


def _per_client_grads(model, batches):
    grads = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        model.zero_grad()
    return torch.stack(grads)


def test_beta_zero_is_mean_of_client_gradients():
    model, batches = tiny_model(), client_batches()
    direction = torch.cat([d.reshape(-1) for d in gradalign_gradient(model, F.cross_entropy, batches, beta=0.0)])
    expected = _per_client_grads(model, batches).mean(0)
    torch.testing.assert_close(direction, expected, rtol=1e-12, atol=1e-14)


def test_matches_direct_definition_at_finite_beta():
    model, batches, beta = tiny_model(), client_batches(), 0.7
    grads = _per_client_grads(model, batches)
    mean = grads.mean(0)
    x = flat_params(model)
    expected = []
    for i, (xb, yb) in enumerate(batches):
        displaced = tiny_model()
        torch.nn.utils.vector_to_parameters(x - beta * (mean - grads[i]), displaced.parameters())
        expected.append(_per_client_grads(displaced, [(xb, yb)])[0])
    direction = torch.cat([d.reshape(-1) for d in gradalign_gradient(model, F.cross_entropy, batches, beta)])
    torch.testing.assert_close(direction, torch.stack(expected).mean(0), rtol=1e-10, atol=1e-12)


def test_leaves_parameters_and_grads_unchanged():
    model, batches = tiny_model(), client_batches()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = [p.detach().clone() for p in model.parameters()]
    out = gradalign_gradient(model, F.cross_entropy, batches, beta=0.5)
    assert [o.shape for o in out] == [p.shape for p in model.parameters()]
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
        assert torch.equal(p.grad, torch.full_like(p, 3.0))


def test_implicit_regulariser_is_gradient_variance():
    """(d(beta) - ḡ) / beta -> grad of R(x) = (1/2m) sum_i ||g_i - ḡ||^2 as beta -> 0 (double backward)."""
    model, batches, beta = tiny_model(), client_batches(clients=5), 1e-4
    params = list(model.parameters())
    grads = []
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    grads = torch.stack(grads)
    reg = 0.5 * ((grads - grads.mean(0)) ** 2).sum(1).mean()
    grad_reg = torch.cat([t.reshape(-1) for t in torch.autograd.grad(reg, params)])
    mean = grads.detach().mean(0)
    direction = torch.cat([d.reshape(-1) for d in gradalign_gradient(model, F.cross_entropy, batches, beta)])
    estimate = (direction - mean) / beta
    rel = (estimate - grad_reg).norm() / grad_reg.norm()
    assert rel < 1e-3, f"relative error {rel:.2e}"


def test_vmap_and_loop_give_the_same_numbers():
    model, batches = tiny_model(), client_batches(clients=6)
    layout = ParamLayout.of(model)
    fn = make_grad_fn(model, F.cross_entropy)
    xs, ys = torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])
    shared = param_dict(model)
    noise = 0.01 * torch.randn(6, layout.size, dtype=torch.float64)
    per_client = layout.unflatten(flat_params(model).unsqueeze(0) + noise)
    for params, flag in ((shared, False), (per_client, True)):
        gv, lv = client_gradients(fn, params, xs, ys, per_client=flag, use_vmap=True)
        gl, ll = client_gradients(fn, params, xs, ys, per_client=flag, use_vmap=False)
        torch.testing.assert_close(flatten_rows(gv), flatten_rows(gl), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(lv, ll, rtol=1e-12, atol=1e-14)


def test_unequal_client_batches_use_the_loop():
    model = tiny_model()
    batches = client_batches(clients=2, batch=4) + client_batches(clients=1, batch=9, seed=5)
    out = gradalign_gradient(model, F.cross_entropy, batches, beta=0.1)
    assert all(torch.isfinite(o).all() for o in out)


def test_alignment_diagnostics_match_definitions():
    g = torch.randn(4, 10, dtype=torch.float64)
    tree = {"w": g[:, :6].reshape(4, 2, 3), "b": g[:, 6:]}
    mean, al = alignment_from_moments(gradient_moments(tree), num_clients=4, client_batch_size=8)
    torch.testing.assert_close(mean, g.mean(0))
    assert al.grad_variance == pytest.approx(((g - g.mean(0)) ** 2).sum(1).mean().item(), rel=1e-9)
    u = g / g.norm(dim=1, keepdim=True)
    cos = [(u[i] @ u[j]).item() for i in range(4) for j in range(4) if i != j]
    assert al.grad_cosine == pytest.approx(sum(cos) / len(cos), rel=1e-9)
    assert al.grad_norm_sq == pytest.approx((g.mean(0) ** 2).sum().item())
    # identical client gradients: no variance, cosine 1, zero noise
    same = {"w": g[:1].expand(4, -1)}
    _, al = alignment_from_moments(gradient_moments(same), 4, 8)
    assert al.grad_variance == pytest.approx(0, abs=1e-9) and al.grad_cosine == pytest.approx(1.0)
    assert al.gns_simple == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("beta", [-0.1, float("nan")])
def test_bad_beta_raises(beta):
    with pytest.raises(ValueError, match="beta"):
        gradalign_gradient(tiny_model(), F.cross_entropy, client_batches(), beta)


def test_moments_without_cosine_are_half_the_size_and_give_the_rest():
    g = torch.randn(5, 12, dtype=torch.float64)
    tree = {"w": g[:, :8].reshape(5, 2, 4), "b": g[:, 8:]}
    full = gradient_moments(tree)
    short = gradient_moments(tree, cosine=False)
    assert full.numel() == 2 * 12 + 1 and short.numel() == 12 + 1
    mean_full, al_full = alignment_from_moments(full, 5, 4)
    mean_short, al_short = alignment_from_moments(short, 5, 4, cosine=False)
    torch.testing.assert_close(mean_short, mean_full)
    assert al_short.grad_cosine != al_short.grad_cosine  # NaN: not computed
    for key in ("grad_variance", "grad_norm_sq", "gns_trace", "gns_grad_sq"):
        assert getattr(al_short, key) == pytest.approx(getattr(al_full, key), rel=1e-12), key
    grad_sum, al_sum = alignment_from_moments(short.clone(), 5, 4, cosine=False, in_place=True, divide=False)
    torch.testing.assert_close(grad_sum, g.sum(0))  # left as the sum, for a caller that folds in 1/m
    for key in ("grad_variance", "grad_norm_sq", "gns_trace", "gns_grad_sq"):
        assert getattr(al_sum, key) == pytest.approx(getattr(al_full, key), rel=1e-12), key
