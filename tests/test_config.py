"""Configs validate at construction and name the field and the value."""

import subprocess
import sys
from pathlib import Path

import pytest

from gradalign import ConfigError, TrainConfig
from gradalign.config import field_docs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("lr", 0.0, "positive"),
        ("lr", -1.0, "positive"),
        ("lr", float("nan"), "positive"),
        ("beta", -0.5, ">= 0"),
        ("momentum", 1.0, "[0, 1)"),
        ("momentum", -0.2, "[0, 1)"),
        ("participation", 0.0, "(0, 1]"),
        ("participation", 1.5, "(0, 1]"),
        ("alpha", 0.0, "> 0"),
        ("alpha", -1.0, "> 0"),
        ("batch_size", 0, "positive"),
        ("clients", 0, "positive"),
        ("epochs", 0, "positive"),
        ("server_lr", 0.0, "positive"),
        ("iid_fraction", 1.5, "[0, 1]"),
        ("mu", -1.0, ">= 0"),
    ],
)
def test_bad_values_name_field_and_value(field, value, words):
    kw = {field: value}
    if field in ("participation",):
        kw["algorithm"] = "fedavg"
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kw)
    assert err.value.field == field
    assert f"{field}={value!r}" in str(err.value) and words in str(err.value)


def test_local_steps_below_one():
    with pytest.raises(ConfigError, match=r"local_steps=0.*K"):
        TrainConfig(algorithm="fedavg", local_steps=0)


def test_batch_size_not_divisible_by_clients():
    with pytest.raises(ConfigError, match=r"batch_size=100.*divisible by clients=8"):
        TrainConfig(batch_size=100, clients=8)


@pytest.mark.parametrize(
    "field,value,valid",
    [
        ("dataset", "imagenet", "digits, synthetic"),
        ("model", "vgg", "mlp, cnn"),
        ("algorithm", "adam", "gradalign"),
        ("partition", "random", "dirichlet"),
    ],
)
def test_unknown_names_list_the_valid_ones(field, value, valid):
    with pytest.raises(ConfigError, match=valid):
        TrainConfig(**{field: value})


def test_federated_only_fields_are_refused_elsewhere():
    with pytest.raises(ConfigError, match="local_steps"):
        TrainConfig(algorithm="gradalign", local_steps=3)
    with pytest.raises(ConfigError, match="participation"):
        TrainConfig(algorithm="large_batch_sgd", participation=0.5)


def test_beta_defaults_to_half_the_step_size_and_dicts_round_trip():
    cfg = TrainConfig(lr=0.3)
    assert cfg.beta == pytest.approx(0.15)
    assert TrainConfig.from_dict({**cfg.to_dict(), "cell": "x"}) == cfg
    assert TrainConfig.from_dict({"cell": "x"}).extras == {"cell": "x"}
    assert cfg.client_batch_size == cfg.batch_size // cfg.clients


def test_numpy_scalars_from_searchers_are_accepted():
    np = pytest.importorskip("numpy")
    cfg = TrainConfig.from_dict({"batch_size": np.int64(64), "clients": np.int64(4), "lr": np.float64(0.1)})
    assert type(cfg.batch_size) is int and cfg.client_batch_size == 16


def test_every_field_is_documented():
    docs = field_docs()
    missing = [f for f in TrainConfig.__dataclass_fields__ if f not in docs]
    assert not missing


def test_stdlib_platform_is_not_shadowed():
    """platform/ is a source root, not a package: `import platform` from the repository root is the stdlib's."""
    assert not (ROOT / "platform" / "__init__.py").exists()
    code = "import platform, torch; print(platform.system())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("Linux", "Darwin", "Windows")
