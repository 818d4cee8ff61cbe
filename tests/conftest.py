"""Shared fixtures. One local Ray instance serves every Ray test of the session (starting one costs seconds)."""

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray with the `train_driver` resource (as `studies/tune.py` starts it); yields its resources."""
    import ray

    from gradalign.ray_adapter import connect

    resources = connect(num_cpus=2, local=True)  # never a `ray start` cluster that happens to run on this machine
    yield resources
    ray.shutdown()
