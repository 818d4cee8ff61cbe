"""One contract for every algorithm, and the exact reductions between them."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from gradalign import ALGORITHMS, ConfigError, TrainConfig
from gradalign.algorithms import RoundBatch, build_algorithm
from gradalign.functional import flat_params, flatten_rows, param_dict

CLIENTS, B, K = 4, 8, 3


def make_data(seed=0, clients=CLIENTS, n=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) + 0.5 * i for i in range(clients)]
    return [(x, (x @ w).argmax(1)) for x in xs]


def batches(data, rounds, k=1, b=B, participants=None, seed=0):
    """Deterministic RoundBatches: each client draws k batches of b per round."""
    g = torch.Generator().manual_seed(seed)
    clients = len(data)
    out = []
    for _ in range(rounds):
        ids = participants(g) if participants else list(range(clients))
        idx = [torch.randint(0, len(data[c][0]), (k, b), generator=g) for c in ids]
        xs = torch.stack([data[c][0][i] for c, i in zip(ids, idx)])
        ys = torch.stack([data[c][1][i] for c, i in zip(ids, idx)])
        out.append(RoundBatch(ids, xs, ys, len(ids), diagnose=True))
    return out


def config(algorithm, **kw):
    base = dict(algorithm=algorithm, batch_size=CLIENTS * B, clients=CLIENTS, lr=0.2, dtype="float64")
    if algorithm in ("fedavg", "fedprox", "scaffold", "fedga"):
        base.update(local_steps=K)
    if algorithm == "fedprox":
        base.update(mu=0.1)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg, rounds, seed=0, model_seed=0, k=None):
    model = tiny_model(model_seed)
    algo = build_algorithm(model, F.cross_entropy, cfg)
    results = [algo.step(b) for b in batches(make_data(), rounds, k=k or cfg.local_steps, seed=seed)]
    return model, algo, results


def full_loss(model):
    return sum(F.cross_entropy(model(x), y).item() for x, y in make_data()) / CLIENTS


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_loss_goes_down(algorithm):
    initial = full_loss(tiny_model(0))
    model, _, results = run(config(algorithm), rounds=30)
    assert all(r.alignment is None or r.alignment.grad_variance >= 0 for r in results)
    assert full_loss(model) < 0.8 * initial


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_state_round_trips(algorithm):
    cfg = config(algorithm, momentum=0.9)
    rounds = batches(make_data(), 6, k=cfg.local_steps)
    model = tiny_model()
    algo = build_algorithm(model, F.cross_entropy, cfg)
    for b in rounds[:3]:
        algo.step(b)
    saved_model, saved_algo = copy.deepcopy(model.state_dict()), copy.deepcopy(algo.state_dict())
    for b in rounds[3:]:
        algo.step(b)
    resumed = tiny_model(seed=42)  # different init: everything must come from the state
    resumed.load_state_dict(saved_model)
    algo2 = build_algorithm(resumed, F.cross_entropy, cfg)
    algo2.load_state_dict(saved_algo)
    for b in rounds[3:]:
        algo2.step(b)
    torch.testing.assert_close(flat_params(resumed), flat_params(model), rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "field,value",
    [("lr", -0.1), ("lr", 0.0), ("momentum", 1.0), ("momentum", -0.1), ("beta", -1e-3), ("weight_decay", -1.0)],
)
def test_bad_hyperparameters_raise(algorithm, field, value):
    with pytest.raises(ConfigError, match=field):
        config(algorithm, **{field: value})


def _same_trajectory(cfg_a, cfg_b, rounds=8, k=1):
    model_a, _, res_a = run(cfg_a, rounds, k=k)
    model_b, _, res_b = run(cfg_b, rounds, k=k)
    torch.testing.assert_close(flat_params(model_a), flat_params(model_b), rtol=1e-10, atol=1e-12)
    assert [r.loss for r in res_a] == pytest.approx([r.loss for r in res_b], rel=1e-10)


def test_gradalign_with_beta_zero_is_large_batch_sgd():
    _same_trajectory(config("gradalign", beta=0.0, momentum=0.9), config("large_batch_sgd", momentum=0.9))


def test_fedga_with_one_local_step_is_gradalign():
    _same_trajectory(
        config("fedga", local_steps=1, beta=0.3, momentum=0.5), config("gradalign", beta=0.3, momentum=0.5)
    )


def test_fedavg_with_one_local_step_and_full_participation_is_large_batch_sgd():
    _same_trajectory(config("fedavg", local_steps=1, momentum=0.5), config("large_batch_sgd", momentum=0.5))


def test_fedprox_with_mu_zero_is_fedavg():
    _same_trajectory(config("fedprox", mu=0.0), config("fedavg"), k=K)


@pytest.mark.parametrize("algorithm", ["gradalign", "large_batch_sgd", "sgd"])
def test_one_client_is_plain_sgd(algorithm):
    """With m = 1 every data-parallel algorithm is plain SGD on that client's batch."""
    one = dict(batch_size=B, clients=1, beta=0.5)
    data = make_data(clients=1)
    rounds = batches(data, 10, k=1)
    model = tiny_model()
    algo = build_algorithm(model, F.cross_entropy, config(algorithm, **one))
    reference = tiny_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.2)
    for b in rounds:
        algo.step(b)
        opt.zero_grad()
        F.cross_entropy(reference(b.inputs[0, 0]), b.targets[0, 0]).backward()
        opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-10, atol=1e-12)


def test_sgd_visits_clients_one_after_another():
    """Small-batch SGD with m clients takes m sequential steps per update, each on one client's batch."""
    cfg = config("sgd")
    rounds = batches(make_data(), 3)
    model = tiny_model()
    algo = build_algorithm(model, F.cross_entropy, cfg)
    reference = tiny_model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.2)
    for b in rounds:
        assert algo.step(b).steps == CLIENTS
        for i in range(CLIENTS):
            opt.zero_grad()
            F.cross_entropy(reference(b.inputs[i, 0]), b.targets[i, 0]).backward()
            opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=1e-10, atol=1e-12)


def test_fedprox_term_enters_local_gradient():
    """With K = 2 the proximal term acts once: y2 gains -lr*mu*(y1 - x) = lr^2*mu*g_i(x), so the new server
    model is FedAvg's plus lr^2 * mu * ḡ(x)."""
    lr, mu = 0.1, 5.0
    rounds = batches(make_data(), 1, k=2)
    new = {}
    for name in ("fedavg", "fedprox"):
        model = tiny_model()
        algo = build_algorithm(
            model, F.cross_entropy, config(name, lr=lr, mu=mu if name == "fedprox" else 0.0, local_steps=2)
        )
        algo.step(rounds[0])
        new[name] = flat_params(model)
    model = tiny_model()
    grads, _ = build_algorithm(model, F.cross_entropy, config("fedavg")).client_grads(
        param_dict(model), rounds[0].inputs[:, 0], rounds[0].targets[:, 0]
    )
    expected = lr * lr * mu * flatten_rows(grads).mean(0)
    torch.testing.assert_close(new["fedprox"] - new["fedavg"], expected, rtol=1e-9, atol=1e-12)


def test_partial_participation_uses_only_sampled_clients():
    """Clients that are not sampled contribute nothing: the update equals FedAvg over the sampled ones alone."""
    data = make_data()
    pick = lambda g: [0, 2]  # noqa: E731
    rounds = batches(data, 1, k=K, participants=pick)
    cfg = config("fedavg", participation=0.5)
    model = tiny_model()
    build_algorithm(model, F.cross_entropy, cfg).step(rounds[0])
    sub = [data[0], data[2]]
    cfg2 = config("fedavg", clients=2, batch_size=2 * B)
    rounds2 = [RoundBatch([0, 1], rounds[0].inputs, rounds[0].targets, 2, True)]
    model2 = tiny_model()
    build_algorithm(model2, F.cross_entropy, cfg2).step(rounds2[0])
    assert sub  # same data, fewer clients
    torch.testing.assert_close(flat_params(model), flat_params(model2), rtol=1e-12, atol=1e-14)


def test_scaffold_control_variates_update():
    model, algo, _ = run(config("scaffold"), rounds=2)
    assert algo.server_control.abs().sum() > 0
    assert all(c.abs().sum() > 0 for c in algo.client_controls.values())
    # server control is the mean of the client controls when every client takes part every round
    torch.testing.assert_close(algo.server_control, torch.stack(list(algo.client_controls.values())).mean(0))


def test_batchnorm_models_are_refused_for_displaced_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).double()
    for name in ("gradalign", "fedga"):
        with pytest.raises(ValueError, match="BatchNorm"):
            build_algorithm(model, F.cross_entropy, config(name))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("diagnose", [True, False])
def test_communications_are_counted_per_update_whatever_the_diagnostics(algorithm, diagnose):
    """What a budget in communications divides by: GradAlign and FedGA exchange twice per round (ḡ, then the
    update), FedAvg, FedProx, SCAFFOLD and large-batch SGD once; a diagnostics-only exchange is never counted."""
    from gradalign.algorithms import communications_per_update

    cfg = config(algorithm)
    model = tiny_model(0)
    algo = build_algorithm(model, F.cross_entropy, cfg)
    size = sum(p.numel() for p in model.parameters())
    for batch in batches(make_data(), 3, k=cfg.local_steps):
        batch.diagnose = diagnose
        traffic = algo.step(batch).traffic
        assert traffic.communications == communications_per_update(cfg)
        assert traffic.messages == traffic.communications * (1 if algorithm == "sgd" else CLIENTS)
        per_client = traffic.values / max(traffic.messages, 1)
        # every exchange carries about P values per client; SCAFFOLD's one carries 2P (update and control variate)
        expected = {
            "sgd": size + 1,
            "large_batch_sgd": size + 1,
            "fedavg": size + 1,
            "fedprox": size + 1,
            "scaffold": 2 * size + 1,
            "gradalign": (2 * size + 2) / 2,
            "fedga": (2 * size + 3) / 2,
        }[algorithm]
        assert per_client == pytest.approx(expected)
    assert communications_per_update(config("fedga")) == 2 and communications_per_update(config("fedavg")) == 1
    assert communications_per_update(config("sgd", clients=1, batch_size=B)) == 0
