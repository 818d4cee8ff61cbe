"""MNIST-1D: generated offline with the `mnist1d` package, cached on disk, and the paper's models on it.

The canonical set (5,000 examples) is generated once per test session into a temporary data_dir (a few seconds);
other tests use small sets (num_samples=200), which take a fraction of a second each.
"""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradalign import ConfigError, TrainConfig, Trainer, fast_paths, gradalign_gradient, mnist1d_data
from gradalign.algorithms import ALGORITHM_CLASSES, RoundBatch
from gradalign.data import clear_cache, load_dataset
from gradalign.models import MNIST1DCNN, MNIST1DMLP, build_model

SMALL = 200


@pytest.fixture(scope="module")
def canonical_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d-canonical")


@pytest.fixture(scope="module")
def canonical(canonical_dir):
    return load_dataset("mnist1d", data_dir=canonical_dir)


def _relative_error(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# -- the dataset ----------------------------------------------------------------------------------------------------
def test_canonical_split_shapes_and_types(canonical):
    ds = canonical
    assert ds.name == "mnist1d" and ds.num_classes == 10 and ds.input_shape == (1, 40)
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert ds.natural_partition is None
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10)
    assert counts.tolist() == [500] * 10  # 500 examples of each digit, shuffled before the split
    assert 0 < torch.bincount(ds.y_test, minlength=10).min() < 200


def test_the_generators_own_scaling_is_kept(canonical):
    """The generator centres and scales the whole set (one mean, one std); it is not standardised a second time."""
    everything = torch.cat([canonical.x_train, canonical.x_test]).double()
    assert everything.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert everything.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    train_std = canonical.x_train.double().std(unbiased=False).item()
    assert abs(train_std - 1.0) > 1e-4  # a re-standardisation with the training statistics would make it 1


def test_the_set_is_the_packages_dataset_with_its_default_arguments(tmp_path):
    """Our arrays are the package's make_dataset output (default arguments but num_samples), as float32 [N, 1, 40]."""
    from mnist1d.data import get_dataset_args, make_dataset

    ours = load_dataset("mnist1d", data_dir=tmp_path, num_samples=SMALL)
    args = get_dataset_args()
    args.num_samples = SMALL
    states = np.random.get_state(), random.getstate()
    try:
        reference = make_dataset(args)
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])
    for x, key in ((ours.x_train, "x"), (ours.x_test, "x_test")):
        assert torch.equal(x[:, 0], torch.from_numpy(reference[key]).float())
    assert torch.equal(ours.y_train, torch.from_numpy(reference["y"]))
    assert torch.equal(ours.y_test, torch.from_numpy(reference["y_test"]))


def test_loads_are_memoised_and_the_second_load_reads_the_file(canonical, canonical_dir, monkeypatch):
    assert load_dataset("mnist1d", data_dir=canonical_dir) is canonical
    path = mnist1d_data.cache_path(str(canonical_dir), 5000)
    assert path.startswith(str(canonical_dir / "mnist1d")) and path.endswith(".npz")

    def no_generation(num_samples):
        raise AssertionError("generated again although the file is cached")

    monkeypatch.setattr(mnist1d_data, "_generate", no_generation)
    clear_cache()
    again = load_dataset("mnist1d", data_dir=canonical_dir)
    assert again is not canonical
    assert torch.equal(again.x_train, canonical.x_train) and torch.equal(again.y_test, canonical.y_test)
    with pytest.raises(AssertionError, match="generated again"):  # another size: another file, generated
        load_dataset("mnist1d", data_dir=canonical_dir, num_samples=SMALL)


def test_another_size_is_another_file_and_generation_is_deterministic(tmp_path):
    small = load_dataset("mnist1d", data_dir=tmp_path / "a", num_samples=SMALL)
    larger = load_dataset("mnist1d", data_dir=tmp_path / "a", num_samples=2 * SMALL)
    assert (len(small.y_train), len(small.y_test)) == (160, 40)
    assert (len(larger.y_train), len(larger.y_test)) == (320, 80)
    files = sorted(p.name for p in (tmp_path / "a" / "mnist1d").iterdir())
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)  # no temporary files left behind
    assert mnist1d_data.cache_path(str(tmp_path / "a"), SMALL) != mnist1d_data.cache_path(str(tmp_path / "a"), 400)
    fresh = load_dataset("mnist1d", data_dir=tmp_path / "b", num_samples=SMALL)  # generated again elsewhere
    assert torch.equal(fresh.x_train, small.x_train) and torch.equal(fresh.y_test, small.y_test)
    with np.load(mnist1d_data.cache_path(str(tmp_path / "b"), SMALL)) as f:
        assert '"num_samples": 200' in str(f["generator_args"]) and '"seed": 42' in str(f["generator_args"])


def test_generation_leaves_the_global_random_states_alone(tmp_path):
    def draws():
        return np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist()

    np.random.seed(123), random.seed(123), torch.manual_seed(123)
    expected = draws()
    np.random.seed(123), random.seed(123), torch.manual_seed(123)
    load_dataset("mnist1d", data_dir=tmp_path, num_samples=SMALL)
    assert (tmp_path / "mnist1d").is_dir()  # it did generate (the generator seeds np.random and random with 42)
    assert draws() == expected


@pytest.mark.parametrize("value", [0, -10, 15, 5, True, 100.0])
def test_bad_num_samples_is_refused_naming_it(value):
    with pytest.raises(ConfigError, match="num_samples") as info:
        TrainConfig(dataset="mnist1d", num_samples=value)
    assert info.value.field == "num_samples" and repr(value) in str(info.value)
    with pytest.raises(ValueError, match=f"num_samples={value!r}"):
        load_dataset("mnist1d", data_dir="unused", num_samples=value)


def test_num_samples_only_for_generated_datasets():
    assert TrainConfig(dataset="mnist1d", num_samples=10_000).num_samples == 10_000
    assert TrainConfig(dataset="mnist1d").num_samples is None
    with pytest.raises(ConfigError, match="only generated datasets.*dataset='digits'"):
        TrainConfig(dataset="digits", num_samples=1000)
    with pytest.raises(ValueError, match="only mnist1d"):
        load_dataset("digits", num_samples=1000)


# -- the paper's models ---------------------------------------------------------------------------------------------
def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_outputs_and_parameter_counts():
    torch.manual_seed(0)
    x = torch.randn(7, 1, 40)
    counts = {
        "logistic": 40 * 10 + 10,
        "mlp": 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10,
        "cnn": (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + 25 * 5 * 10 + 10,
    }
    assert counts == {"logistic": 410, "mlp": 15_210, "cnn": 5_210}
    for name, count in counts.items():
        model = build_model(name, (1, 40), 10)
        assert _n_params(model) == count, name
        assert model(x).shape == (7, 10)
    assert isinstance(build_model("mlp", (1, 40), 10), MNIST1DMLP)
    assert isinstance(build_model("cnn", (1, 40), 10), MNIST1DCNN)


def test_cnn_layers_are_the_papers_convbase():
    model = build_model("cnn", (1, 40), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 25, (5,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
    ]
    h = torch.randn(2, 1, 40)
    lengths = []
    for conv in convs:
        h = conv(h)
        lengths.append(h.shape[-1])
    assert lengths == [19, 10, 5] and model.linear.in_features == 125


def test_mlp_has_the_papers_residual_second_layer():
    torch.manual_seed(1)
    model = build_model("mlp", (1, 40), 10)
    assert [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)] == [
        (40, 100),
        (100, 100),
        (100, 10),
    ]
    x = torch.randn(3, 1, 40)
    h = torch.relu(model.linear1(x.flatten(1)))
    expected = model.linear3(h + torch.relu(model.linear2(h)))
    torch.testing.assert_close(model(x), expected)


# -- GradAlign's fast path on the CNN, and a short run --------------------------------------------------------------
def test_fast_path_on_the_cnn_matches_vmap_on_real_batches(canonical):
    """GradAlign's direction on MNIST-1D batches, fast path against vmap: float32 (~1e-7) and float64 (~1e-15)."""
    torch.manual_seed(2)
    model = build_model("cnn", canonical.input_shape, 10)
    assert fast_paths.unsupported_reason(model) is None
    x, y = canonical.x_train[:48].reshape(4, 12, 1, 40), canonical.y_train[:48].reshape(4, 12)
    for dtype, limit in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = model.to(dtype)
        batches = list(zip(x.to(dtype), y))
        for beta in (0.0, 0.1, 1.0):
            fast = torch.cat([g.reshape(-1) for g in gradalign_gradient(model, F.cross_entropy, batches, beta)])
            ref = torch.cat(
                [g.reshape(-1) for g in gradalign_gradient(model, F.cross_entropy, batches, beta, fast_path=False)]
            )
            assert _relative_error(fast.double(), ref.double()) < limit, (dtype, beta)
    cfg = TrainConfig(
        dataset="mnist1d", model="cnn", algorithm="gradalign", batch_size=48, clients=4, lr=0.05, dtype="float64"
    )
    algo = ALGORITHM_CLASSES["gradalign"](model, F.cross_entropy, cfg)
    algo.step(RoundBatch(list(range(4)), x.double().unsqueeze(1), y.unsqueeze(1), 4, True))
    assert algo.path == "fast"


def test_trainer_runs_gradalign_on_mnist1d_with_the_cnn(tmp_path):
    config = TrainConfig(
        dataset="mnist1d",
        num_samples=SMALL,
        data_dir=str(tmp_path),
        model="cnn",
        algorithm="gradalign",
        batch_size=32,
        clients=4,
        lr=0.05,
        epochs=2,
        eval_points=2,
    )
    trainer = Trainer(config)
    assert isinstance(trainer.model, MNIST1DCNN) and trainer.x_train.shape[1:] == (1, 40)
    assert len(trainer.x_train) + len(trainer.x_val) == 160 and len(trainer.x_test) == 40
    history = trainer.fit()
    assert trainer.algorithm.path == "fast"
    assert [h["evaluation"] for h in history] == [1, 2] and history[-1]["status"] == "completed"
    assert history[-1]["steps"] == -(-2 * len(trainer.x_train) // 32)
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["test_accuracy"] <= 1 for h in history)
