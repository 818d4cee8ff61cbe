"""Connecting to Ray the way `ray.init()` does, but bounded and saying which: join a cluster or start one.

Where a study runs, in order: `address` (or `RAY_ADDRESS`) names a cluster to join; else the latest cluster that
`ray start` recorded on this machine (as `ray.init()` finds it: `ray_current_cluster` in Ray's temp folder), if it
still answers -- on a cluster's head node that is the cluster; else a private local Ray with the `train_driver`
resource. `local=True` always starts a private one. Joining gives up after about `JOIN_TIMEOUT_S` seconds with a
`ClusterUnreachable` that names the address as given (not what Ray resolves it to) and what to check (Ray's own
client retries for many minutes).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from ._common import DRIVER_RESOURCE

JOIN_TIMEOUT_S = 30.0
"""Upper bound on joining a cluster: a third for its GCS port to accept a connection, the rest for `ray.init`."""
PROBE_TIMEOUT_S = 2.0
"""How long a recorded `ray start` cluster may take to accept a connection before the record counts as stale."""


class ClusterUnreachable(ConnectionError):
    """A Ray cluster that cannot be joined in time; the message names the address and what to check."""


@dataclass(frozen=True)
class RayConnection:
    """The Ray this process uses, and whether it joined it or started it."""

    address: str
    """The cluster's GCS address (host:port)."""
    joined: bool
    """True: a cluster that ran before this process (named, or recorded by `ray start`); False: started here."""
    nodes: int
    """Alive nodes."""
    resources: dict[str, float] = field(default_factory=dict)
    """`ray.cluster_resources()` when connected."""
    note: str = ""
    """Something the user should know about the choice (a stale `ray start` record, an ignored RAY_ADDRESS)."""

    def summary(self) -> str:
        """'joined the Ray cluster at ADDRESS: N nodes, C CPUs, G GPUs' or 'started a local Ray with C CPUs'."""
        cpus, gpus = self.resources.get("CPU", 0), self.resources.get("GPU", 0)
        if self.joined:
            nodes = f"{self.nodes} node{'s' if self.nodes != 1 else ''}"
            return f"joined the Ray cluster at {self.address}: {nodes}, {cpus:g} CPUs, {gpus:g} GPUs"
        return f"started a local Ray with {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    driver_slots: int | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    include_dashboard: bool = True,
    local: bool = False,
) -> dict[str, float]:
    """`connect_ray(...)`, returning only the cluster's resources (what `plan_concurrency` needs)."""
    return connect_ray(
        address,
        local=local,
        num_cpus=num_cpus,
        driver_slots=driver_slots,
        runtime_env=runtime_env,
        include_dashboard=include_dashboard,
    ).resources


def connect_ray(
    address: str | None = None,
    *,
    local: bool = False,
    num_cpus: int | None = None,
    driver_slots: int | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    include_dashboard: bool = True,
    timeout_s: float = JOIN_TIMEOUT_S,
) -> RayConnection:
    """Join a running Ray cluster (see the module docstring for which) or start a local one; say which.

    A local Ray gets `num_cpus` (default: all) and `driver_slots` (default: its CPU count) units of `train_driver`;
    both are ignored when joining. Reuses an already initialised Ray (e.g. a test session's). Workers import
    `gradalign` from the installed package; on a cluster without it pass `runtime_env={"py_modules": [...]}`.

    The dashboard stays on (bound to localhost) because Ray Train's `PlacementGroupCleaner` needs its State API:
    without it the placement group of a trial that Tune stops (ASHA) outlives the trial and starves every later one
    (ray issue 54305). Every worker process also learns its cluster's address, so the cleaner still finds the right
    cluster when several Ray instances share the host.
    """
    if local and address not in (None, "local"):
        raise ValueError(f"address={address!r} and local=True contradict each other: pass one of them")
    local = local or address == "local"
    note = ""
    if not ray.is_initialized():
        env = dict(runtime_env or {})
        env.setdefault("worker_process_setup_hook", _address_pinning_hook())
        target, source = (None, "") if local else _named_address(address)
        if target is None and not local:
            target, note = recorded_cluster()
            source = "recorded by `ray start` on this machine"
        if target:
            # The head `ray start` runs on this machine chose its auth from this machine's token file, so follow
            # it; a named address gets the auth RAY_AUTH_MODE says (a token sent to a head without auth lets the
            # driver join, but its trial actors are then never scheduled).
            _join(target, source, env, timeout_s, token_auth=source.startswith("recorded"))
        else:
            if local and os.environ.pop("RAY_ADDRESS", None):
                note = "ignoring RAY_ADDRESS (--local)"  # and keeping it from this Ray's workers
            cpus = num_cpus or os.cpu_count() or 1
            ray.init(
                address="local",
                num_cpus=cpus,
                resources={DRIVER_RESOURCE: driver_slots or cpus},
                include_dashboard=include_dashboard,
                runtime_env=env,
                logging_level="WARNING",
            )
    return _describe(note)


def recorded_cluster(probe_timeout_s: float = PROBE_TIMEOUT_S) -> tuple[str | None, str]:
    """The latest cluster `ray start` recorded on this machine -- the one `ray.init()` joins -- if it answers.

    Returns (address, "") when its GCS port accepts a connection, (None, note) when the record is stale (Ray was
    killed without `ray stop`), (None, "") when nothing is recorded.
    """
    from ray._private.services import find_bootstrap_address

    recorded = find_bootstrap_address(None)
    if not recorded:
        return None, ""
    if _port_answers(recorded, probe_timeout_s):
        return recorded, ""
    return None, (
        f"{_address_file()} records a Ray at {recorded} (from `ray start`), but nothing answers there; "
        "starting a local Ray instead"
    )


def _named_address(address: str | None) -> tuple[str | None, str]:
    if address:
        return address, "--address"
    from_env = os.environ.get("RAY_ADDRESS") or None
    return from_env, "RAY_ADDRESS" if from_env else ""


def _join(address: str, source: str, runtime_env: dict, timeout_s: float, token_auth: bool = False) -> None:
    """`ray.init(address)`, refused with `ClusterUnreachable` after about `timeout_s` seconds."""
    if address.startswith("ray://"):  # Ray Client: its own connection timeout applies
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        return
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        gcs = canonicalize_bootstrap_address_or_die(address)  # 'auto' -> a running cluster; localhost -> node IP
    except (ConnectionError, ValueError) as err:
        raise ClusterUnreachable(_unreachable_message(address, source, str(err))) from None
    # The user's words first: Ray turns 127.0.0.1 / localhost into this host's own address, which they never typed.
    resolved = f" [Ray resolved it to {gcs}]" if gcs != address else ""
    if token_auth:
        _token_auth_if_token_exists()
    deadline = time.monotonic() + timeout_s
    if not _wait_for_port(gcs, timeout_s / 3):
        reason = f"nothing accepts connections at {address}{resolved} (waited {timeout_s / 3:.0f} s)"
        raise ClusterUnreachable(_unreachable_message(address, source, reason))
    try:
        with _bounded_gcs_connect(max(5.0, deadline - time.monotonic() - 10.0)):
            ray.init(address=gcs, runtime_env=runtime_env, logging_level="WARNING")
    except (ConnectionError, RuntimeError) as err:
        cause = str(err.__cause__ or err).strip().splitlines()[-1:] or [type(err).__name__]
        reason = (
            f"{address}{resolved} accepts connections, but joining failed within about {timeout_s:.0f} s "
            f"({cause[0][:300]})"
        )
        raise ClusterUnreachable(_unreachable_message(address, source, reason)) from None


def _token_auth_if_token_exists() -> None:
    """Token auth on when RAY_AUTH_MODE is unset and a token file exists, as `ray start --head` and `ray.init()`
    with no address do (`ray.init(address=...)` does not, and then cannot join such a head). Only for the head
    recorded on this machine: against a head without auth the driver joins but its actors never start."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _unreachable_message(address: str, source: str, reason: str) -> str:
    """What to tell the user; `address` is theirs, as typed (or as RAY_ADDRESS / the `ray start` record holds it)."""
    named = f" ({source})" if source else ""
    return (
        f"cannot join the Ray cluster at {address}{named}: {reason}. Check that "
        "Ray runs there (`ray status` on its head node); that this machine may reach that address and port "
        "(firewall, security group: a cluster made with `ray up` is used from its head, through `ray exec`, "
        "`ray attach` or `ray job submit`); that RAY_AUTH_MODE=token and ~/.ray/auth_token match the "
        "cluster's; or drop --address (and unset RAY_ADDRESS) to use Ray on this machine"
    )


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _port_answers(address: str, timeout_s: float) -> bool:
    try:
        with socket.create_connection(_split(address), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _wait_for_port(address: str, timeout_s: float) -> bool:
    """True once `address` accepts a TCP connection (a head that is still starting gets `timeout_s` seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if _port_answers(address, min(PROBE_TIMEOUT_S, max(0.1, deadline - time.monotonic()))):
            return True
        if time.monotonic() + 1.0 > deadline:
            return False
        time.sleep(1.0)


@contextlib.contextmanager
def _bounded_gcs_connect(timeout_s: float) -> Iterator[None]:
    """One GCS connection attempt of at most about `timeout_s` s (Ray's defaults: 20 attempts x 40 s).

    `RAY_gcs_server_port_wait_time_s` (read when the driver connects) sets the attempts; the per-attempt timeout
    `py_gcs_connect_timeout_s` is read from the environment when Ray is imported, so it is set on Ray's config
    object directly. A driver that joins re-reads that config with the cluster's system config (which
    `Config.initialize` would reset), so it is put back only when joining fails.
    """
    try:
        from ray._raylet import Config

        previous_timeout = Config.py_gcs_connect_timeout_s()
    except (ImportError, AttributeError):  # another Ray version: the port probe alone bounds the usual failures
        Config, previous_timeout = None, None
    previous_wait = os.environ.get("RAY_gcs_server_port_wait_time_s")
    os.environ["RAY_gcs_server_port_wait_time_s"] = "1"
    if Config is not None:
        Config.initialize(json.dumps({"py_gcs_connect_timeout_s": max(1, int(timeout_s))}))
    try:
        yield
    except BaseException:
        if Config is not None:
            Config.initialize(json.dumps({"py_gcs_connect_timeout_s": previous_timeout}))
        raise
    finally:
        if previous_wait is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
        else:
            os.environ["RAY_gcs_server_port_wait_time_s"] = previous_wait


def _describe(note: str) -> RayConnection:
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return RayConnection(
        address=ray.get_runtime_context().gcs_address,
        joined=not getattr(node, "head", False),
        nodes=sum(1 for n in ray.nodes() if n.get("Alive")),
        resources=dict(ray.cluster_resources()),
        note=note,
    )


def _address_file() -> str:
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:
        return "/tmp/ray/ray_current_cluster"
    return get_ray_address_file(None)


def _address_pinning_hook() -> Callable[[], None]:
    # A nested function is pickled by value, so worker processes need not import this (heavy) module.
    def pin_ray_address() -> None:
        import os

        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)

    return pin_ray_address
