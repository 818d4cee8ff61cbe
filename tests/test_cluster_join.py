"""Where a study runs: with no --address it joins the Ray that `ray start` runs on this machine (as `ray.init()`
does), --local starts a private one, a cluster that lacks what the study needs is refused before any trial starts,
and an address where no cluster answers is refused in bounded time.

The cluster is a real `ray start --head --block` in its own process group, with its own temp folder; the studies
run in subprocesses whose RAY_TMPDIR points there, so they find this head (and never another developer's Ray)."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_STUDY = [
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--batch-sizes",
    "32",
    "--algorithms",
    "gradalign",
    "--micro-batch",
    "16",
    "--epochs",
    "1",
    "--trials-per-cell",
    "1",
    "--seeds",
    "1",
    "--confirm-top",  # one tuning trial and one seed run: no confirmation runs, no range extensions
    "0",
    "--max-extensions",
    "0",
    "--target",
    "0.3",
    "--name",
    "join",
]
# Trial actors (Tune's function trainables) the head's GCS has seen, printed by a driver that joins it with Ray's own
# `ray.init()` (no address: the latest `ray start` under RAY_TMPDIR, with the auth `ray start` chose).
TRIAL_ACTORS = (
    "import ray; ray.init(logging_level='ERROR'); "
    "print('ACTORS', ray.get_runtime_context().gcs_address, "
    "sum(a['ActorClassName'].endswith('ImplicitFunc') for a in ray._private.state.actors().values()))"
)


@dataclass(frozen=True)
class Head:
    address: str
    temp_root: Path
    """RAY_TMPDIR for processes that should find this head as 'the Ray on this machine'."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(temp_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT)]),
        OMP_NUM_THREADS="1",
        RAY_TMPDIR=str(temp_root),
        RAY_DEDUP_LOGS="1",
    )
    return env


@contextlib.contextmanager
def ray_head():
    """A 2-CPU head (no `train_driver`) started with `ray start --head --block`; stopped by signalling exactly that
    process group."""
    root = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths must stay < 108 characters
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [
        ray_cli,
        "start",
        "--head",
        "--block",
        f"--port={_free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={root / 'ray'}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(cmd, env=_env(root), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        record, deadline = root / "ray" / "ray_current_cluster", time.monotonic() + 120
        while not (record.exists() and record.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, (root / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield Head(record.read_text().strip(), root)
    finally:
        proc.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its own process group outlived it
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    """One-worker studies run on it; multi-worker ones must be refused (no `train_driver`)."""
    with ray_head() as started:
        yield started


def run_script(script: str, args: list[str], head: Head, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "studies" / script), *args],
        cwd=ROOT,
        env=_env(head.temp_root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trial_actors(head: Head) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", TRIAL_ACTORS], env=_env(head.temp_root), capture_output=True, text=True, timeout=120
    )
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("ACTORS ")]
    assert lines and lines[-1][1] == head.address, proc.stdout[-2000:] + proc.stderr[-2000:]
    return int(lines[-1][2])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_study_without_address_joins_the_running_cluster(head, tmp_path):
    before = trial_actors(head)
    run = run_script("batch_scaling.py", [*TINY_STUDY, "--out", str(tmp_path / "out")], head)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    opening = run.stdout.splitlines()[:3]
    assert f"joined the Ray cluster at {head.address}: 1 node, 2 CPUs, 0 GPUs" in opening, opening
    assert trial_actors(head) - before == 2, "the tuning trial and the seed run did not run on the cluster"
    assert (tmp_path / "out" / "history.parquet").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_option_starts_a_private_ray_beside_the_cluster(head, tmp_path):
    before = trial_actors(head)
    run = run_script("batch_scaling.py", [*TINY_STUDY, "--local", "--out", str(tmp_path / "out")], head)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert any(line.startswith("started a local Ray with") for line in run.stdout.splitlines()[:3]), run.stdout[:2000]
    assert "joined" not in run.stdout
    assert trial_actors(head) == before, "a --local study ran trials on the cluster"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "script, args",
    [
        ("batch_scaling.py", [*TINY_STUDY, "--workers", "2"]),
        (
            "tune.py",
            [
                "--dataset",
                "digits",
                "--model",
                "mlp",
                "--workers",
                "2",
                "--trials",
                "1",
                "--epochs",
                "1",
                "--name",
                "join",
            ],
        ),
    ],
)
def test_multi_worker_study_on_a_cluster_without_train_driver_is_refused_before_any_trial(head, tmp_path, script, args):
    before = trial_actors(head)
    out = tmp_path / "out"
    run = run_script(script, [*args, "--out", str(out)], head)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"joined the Ray cluster at {head.address}" in run.stdout
    assert f"the Ray cluster at {head.address} cannot run this study" in run.stderr
    assert "no `train_driver` resource" in run.stderr and "ray start --head --resources=" in run.stderr
    assert "Traceback" not in run.stderr
    assert trial_actors(head) == before
    assert not (out / "cells").exists() and not (out / "join" / "tune").exists()


@pytest.mark.timeout(120)
def test_an_address_where_no_cluster_answers_is_refused(tmp_path):
    port = _free_port()  # nothing listens there
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "studies" / "batch_scaling.py"),
            *TINY_STUDY,
            "--address",
            f"127.0.0.1:{port}",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"cannot join the Ray cluster at 127.0.0.1:{port} (--address)" in run.stderr
    assert "Check that Ray runs there" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "cells").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_an_unreachable_address_is_named_as_typed(tmp_path, host):
    """Ray turns 127.0.0.1 and localhost into this host's own address (192.0.2.2:1 said a message for
    `--address 127.0.0.1:1`); the message names what the user typed, Ray's version only in brackets. In a fresh
    process: `connect_ray` reuses a Ray this test session may have started."""
    address = f"{host}:{_free_port()}"  # nothing listens there
    code = (
        "from gradalign.ray_adapter import ClusterUnreachable, connect_ray\n"
        "try:\n"
        f"    connect_ray({address!r}, timeout_s=3)\n"
        "except ClusterUnreachable as err:\n"
        "    print(err)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=110)
    message = run.stdout.strip()
    said = re.sub(r"\[Ray resolved it to [^\]]*\]", "", message.split(". Check that")[0])
    assert re.findall(r"[\w.-]+:\d+", said) == [address, address], message + run.stderr[-3000:]  # (cluster; port)
    assert message.startswith(f"cannot join the Ray cluster at {address} (--address): nothing accepts connections")
    assert "(waited 1 s)" in message and "Traceback" not in run.stderr


def test_the_ray_start_record_is_found_and_a_stale_one_is_ignored(tmp_path, monkeypatch):
    from gradalign.ray_adapter.connection import recorded_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert recorded_cluster() == (None, "")  # nothing recorded: start a local Ray
    (tmp_path / "ray").mkdir()
    dead = f"127.0.0.1:{_free_port()}"
    (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
    address, note = recorded_cluster()
    assert address is None and dead in note and "starting a local Ray" in note


@pytest.mark.slow
def test_a_running_ray_start_head_is_the_recorded_cluster(head, monkeypatch):
    from gradalign.ray_adapter.connection import recorded_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(head.temp_root))
    assert recorded_cluster() == (head.address, "")


@pytest.mark.timeout(180)
def test_import_check_names_the_module_a_node_lacks(ray_cluster):
    from gradalign.ray_adapter.cluster_checks import project_problems

    assert project_problems() == []
    problems = project_problems(("gradalign", "no_such_module_for_the_check"))
    assert len(problems) == 1 and "import no_such_module_for_the_check failed (ModuleNotFoundError" in problems[0]


def test_connection_summaries():
    from gradalign.ray_adapter import RayConnection

    joined = RayConnection("10.0.0.1:6379", True, 3, {"CPU": 24.0, "GPU": 2.0})
    assert joined.summary() == "joined the Ray cluster at 10.0.0.1:6379: 3 nodes, 24 CPUs, 2 GPUs"
    assert RayConnection("127.0.0.1:1", False, 1, {"CPU": 2.0}).summary() == "started a local Ray with 2 CPUs"


@pytest.mark.timeout(180)
def test_checks_of_a_joined_cluster_ask_for_train_driver_only_when_trials_have_several_workers(ray_cluster, tmp_path):
    from gradalign.ray_adapter import RayConnection
    from gradalign.ray_adapter.cluster_checks import ClusterNotReady, check_cluster

    without = RayConnection("10.0.0.1:6379", True, 1, {"CPU": 2.0})  # the checks then look at this session's Ray
    check_cluster(without, multi_worker=False, storage=str(tmp_path))
    check_cluster(
        RayConnection("10.0.0.1:6379", True, 1, {"CPU": 2.0, "train_driver": 8.0}),
        multi_worker=True,
        storage=str(tmp_path),
    )
    with pytest.raises(
        ClusterNotReady,
        match=r"cluster at 10\.0\.0\.1:6379 cannot run this study:\n  - it offers no "
        r"`train_driver` resource.*ray start --head --resources=",
    ):
        check_cluster(without, multi_worker=True, storage=str(tmp_path))
