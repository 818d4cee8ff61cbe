"""A real two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a second raylet): a small
study joins it by address, its trials land on both nodes, and its state lives in a shared storage folder."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in its own process, so this cluster never meets the test session's local Ray.
DRIVER = textwrap.dedent("""
    import json, socket, subprocess, sys
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    study, out, storage = sys.argv[1], sys.argv[2], sys.argv[3]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"train_driver": 2}, "include_dashboard": True, "dashboard_port": free_port()})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        rc = subprocess.run([sys.executable, study, "--address", cluster.address, "--dataset", "digits", "--model",
                             "mlp", "--batch-sizes", "32", "--algorithms", "gradalign", "--epochs", "1",
                             "--eval-points", "4", "--trials-per-cell", "2", "--seeds", "2",
                             "--confirm-top", "0", "--max-extensions", "0",
                             "--max-concurrent", "2", "--target", "0.3", "--out", out, "--storage", storage,
                             "--name", "two-nodes"], timeout=900).returncode
        ray.init(address=cluster.address, logging_level="ERROR")
        trials = list_actors(filters=[("class_name", "=", "ImplicitFunc")], detail=True, limit=10000)
        print("RESULT " + json.dumps({"rc": rc, "nodes": len(ray.nodes()),
                                      "trial_nodes": sorted({a.node_id for a in trials})}), flush=True)
        ray.shutdown()
    finally:
        cluster.shutdown()
""")


@pytest.mark.slow
def test_study_joins_a_two_node_cluster_and_uses_both_nodes(tmp_path):
    out, storage = tmp_path / "study", tmp_path / "shared"
    # A Ray temp folder of its own (short: socket paths are limited), so that no other study on this machine finds
    # this cluster as "the latest `ray start`" while it runs.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ROOT / "studies" / "batch_scaling.py"), str(out), str(storage)],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["rc"] == 0 and result["nodes"] == 2
    assert len(result["trial_nodes"]) == 2, "trials ran on one node only"
    history = pd.read_parquet(out / "history.parquet")
    assert history.groupby("phase")["trial_id"].nunique().to_dict() == {"seed": 2, "tune": 2}
    experiments = sorted(p.name for p in storage.iterdir())  # Tune's state went to the shared storage
    assert any(n.startswith("tune-") for n in experiments) and any(n.startswith("seed-") for n in experiments)


def test_local_storage_is_refused_on_several_hosts(tmp_path):
    from gradalign.ray_adapter.cluster_checks import storage_problem

    assert storage_problem({"10.0.0.1"}, str(tmp_path)) is None  # one host: any folder works
    assert storage_problem({"10.0.0.1", "10.0.0.2"}, "s3://bucket/gradalign") is None  # object storage is shared
    message = storage_problem({"10.0.0.1", "10.0.0.2"}, str(tmp_path))
    assert message and "2 hosts" in message and "--storage" in message
