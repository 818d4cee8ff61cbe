"""Before a study launches a trial: connect to Ray, say where the study runs, and refuse a cluster that lacks
what the study needs -- the `train_driver` resource (multi-worker trials), the project importable on every node,
and storage that every host sees. The cluster configs in `cluster/` provide all three."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ray

from ._common import DRIVER_RESOURCE
from .connection import RayConnection, connect_ray

PROJECT_MODULES = ("gradalign", "trainables")
"""What a trial imports on whichever node runs it."""
IMPORT_CHECK_TIMEOUT_S = 60.0
"""Bound on the per-node import check (a fresh worker process imports torch and Ray Tune: seconds)."""
STORAGE_FIX = "pass --storage s3://BUCKET/PATH (or gs://..., or a folder on NFS mounted on every node)"
SHARED_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "fuse.s3fs",
    "fuse.gcsfuse",
    "fuse.juicefs",
    "efs",
)


class ClusterNotReady(RuntimeError):
    """A joined cluster that cannot run this study; the message lists every problem and its fix."""


def join_or_start(address: str | None, local: bool, num_cpus: int | None = None) -> RayConnection:
    """Connect (a named cluster, else this machine's `ray start` cluster, else a new local Ray) and say which."""
    connection = connect_ray(address, local=local, num_cpus=num_cpus)
    if connection.note:
        print(f"note: {connection.note}", flush=True)
    if connection.joined and num_cpus:
        print(
            "note: --num-cpus applies only to a Ray started here (--local); the joined cluster keeps its own",
            flush=True,
        )
    print(connection.summary(), flush=True)
    return connection


def check_cluster(
    connection: RayConnection,
    multi_worker: bool,
    storage: str,
    storage_fix: str = STORAGE_FIX,
    import_timeout_s: float = IMPORT_CHECK_TIMEOUT_S,
) -> None:
    """Raise `ClusterNotReady` when the joined cluster cannot run the study (a Ray started here always can)."""
    if not connection.joined:
        return
    problems = []
    if multi_worker and connection.resources.get(DRIVER_RESOURCE, 0) < 1:
        problems.append(
            f"it offers no `{DRIVER_RESOURCE}` resource, which every trial with more than one worker holds (its Tune "
            f"trial drives a Ray Train run and holds one {DRIVER_RESOURCE} unit instead of a CPU): start its head "
            f"with `ray start --head --resources='{{\"{DRIVER_RESOURCE}\": 8}}'` (the configs in cluster/ do), "
            "or run with --workers 1"
        )
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    storage_note = storage_problem(hosts, storage, storage_fix)
    if storage_note:
        problems.append(f"storage {storage!r}: {storage_note}")
    missing = project_problems(timeout_s=import_timeout_s)
    if missing:
        problems.append(
            "the project is not importable on every node (" + "; ".join(missing) + "): install it on each node "
            "(`pip install -e .` in the setup_commands, as cluster/gpu.yaml and cluster/local.yaml do, or the image "
            "built from cluster/Dockerfile), or pass the code with a runtime_env"
        )
    if problems:
        raise ClusterNotReady(
            f"the Ray cluster at {connection.address} cannot run this study:\n  - " + "\n  - ".join(problems)
        )


def project_problems(modules: Sequence[str] = PROJECT_MODULES, timeout_s: float = IMPORT_CHECK_TIMEOUT_S) -> list[str]:
    """One 0-CPU task per alive node imports `modules`; returns 'node IP: what failed' for each node that could not."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_import_probe(tuple(modules)))
    pending = {}
    for node in (n for n in ray.nodes() if n.get("Alive")):
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        pending[probe.options(scheduling_strategy=strategy).remote()] = node["NodeManagerAddress"]
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    problems = []
    for ref in done:
        try:
            failure = ray.get(ref)
        except Exception as err:  # noqa: BLE001 -- the task itself could not run there (e.g. its worker failed to start)
            failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if failure:
            problems.append(f"node {pending[ref]}: {failure}")
    for ref in late:
        ray.cancel(ref, force=True)
        problems.append(f"node {pending[ref]}: no answer to an import check within {timeout_s:g} s")
    return sorted(problems)


def _import_probe(modules: tuple[str, ...]):
    # A nested function is pickled by value: the node needs none of the project to run it.
    def import_project() -> str:
        import importlib

        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as err:  # noqa: BLE001 -- any failure to import is the answer
                return f"import {name} failed ({type(err).__name__}: {err})"
        return ""

    return import_project


def storage_problem(hosts: set[str], storage: str, fix: str = STORAGE_FIX) -> str | None:
    """Why `storage` cannot serve a cluster on `hosts` (None when it can)."""
    if len(hosts) <= 1 or "://" in storage or _filesystem(storage) in SHARED_FILESYSTEMS:
        return None
    return f"the cluster spans {len(hosts)} hosts but this is a local folder that the other hosts cannot see; {fix}"


def _filesystem(path: str) -> str:
    """The filesystem type holding `path` (longest matching mount point in /proc/mounts)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    target = str(Path(path).resolve())
    best = max(
        (m for m in mounts if target.startswith(m[0].rstrip("/") + "/") or target == m[0]),
        key=lambda m: len(m[0]),
        default=("", "unknown"),
    )
    return best[1]
