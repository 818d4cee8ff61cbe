"""GradAlign: implicit gradient alignment for distributed and federated training (Dandi, Barba, Jaggi, AAAI 2022).

The core is pure PyTorch: `gradalign_gradient` (the update direction, on any module), the algorithms
(`algorithms`, `federated`), data and partitioners, models, and the `Trainer`. Ray lives only in `ray_adapter`.
"""

from .config import ALGORITHMS, DATASETS, MODELS, PARTITIONS, ConfigError, TrainConfig
from .functional import gradalign_gradient

__all__ = [
    "ALGORITHMS",
    "DATASETS",
    "MODELS",
    "PARTITIONS",
    "ConfigError",
    "TrainConfig",
    "Trainer",
    "gradalign_gradient",
]
__version__ = "0.1.0"


def __getattr__(name):
    # The Trainer pulls in data loading and models; import it on first use.
    if name == "Trainer":
        from .training import Trainer

        return Trainer
    raise AttributeError(f"module 'gradalign' has no attribute {name!r}")
