"""cluster/: every config passes Ray's own validator (offline) and keeps the cluster secure by default.

Each property is asserted on the committed files and, to show the check can fail, on a deliberately
broken copy. The checker functions live in cluster/validate.py (users run it before `ray up`).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import secrets
import sys
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cv = _load("validate")
aws_setup = _load("aws_setup")

RAY_VERSION, PY_TAG = cv.installed_versions()
PY_VERSION = f"{PY_TAG[0]}.{PY_TAG[1:]}"
LAUNCHER_FILES = [
    p for p in cv.cluster_files() if p.suffix == ".yaml" and cv.kind_of(cv.load_documents(p)) == "ray-launcher"
]
KUBERAY_FILE = CLUSTER / "kuberay-rayjob.yaml"
DOCS = ROOT / "docs" / "cluster.md"


def config_of(name: str) -> dict:
    return cv.load_documents(CLUSTER / name)[0]


@pytest.fixture
def gpu() -> dict:
    return config_of("gpu.yaml")


@pytest.fixture
def rayjob() -> dict:
    return cv.load_documents(KUBERAY_FILE)[0]


def test_the_routes_exist():
    names = {p.name for p in LAUNCHER_FILES}
    assert {"gpu.yaml", "local.yaml"} <= names
    assert KUBERAY_FILE.exists() and (CLUSTER / "Dockerfile").exists()


# ---------------------------------------------------------------------------------------------------
# Ray's own validator (what `ray up` runs before it touches the cloud)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validator(path):
    prepared = cv.ray_prepare_and_validate(cv.load_documents(path)[0])
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert "cluster_synced_files" in prepared  # filled in by prepare_config, required by validate_config


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_has_every_project_property(path):
    assert cv.check_launcher_config(cv.load_documents(path)[0], RAY_VERSION, PY_TAG) == []


def test_rays_validator_rejects_broken_configs(gpu):
    fractional = copy.deepcopy(gpu)
    fractional["available_node_types"]["gpu_1x_a10g"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        cv.ray_prepare_and_validate(fractional)

    typo = copy.deepcopy(gpu)
    typo["head_start_ray_command"] = typo.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        cv.ray_prepare_and_validate(typo)

    bad_head = copy.deepcopy(gpu)
    bad_head["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        cv.ray_prepare_and_validate(bad_head)
    assert "Ray's validator rejects it" in cv.check_launcher_config(bad_head, RAY_VERSION, PY_TAG)[0]


# ---------------------------------------------------------------------------------------------------
# Dashboard on 127.0.0.1


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_every_head_start_binds_dashboard_to_localhost(path):
    prepared = cv.ray_prepare_and_validate(cv.load_documents(path)[0])
    heads = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert heads and all("--dashboard-host=127.0.0.1" in c for c in heads)
    assert cv.check_dashboard_local(prepared) == []


def test_public_dashboard_is_caught(gpu):
    public = copy.deepcopy(gpu)
    public["head_start_ray_commands"] = [c.replace("127.0.0.1", "0.0.0.0") for c in gpu["head_start_ray_commands"]]
    assert cv.check_dashboard_local(cv.ray_prepare_and_validate(public))

    # Leaving the key out inherits Ray's AWS default, which binds the dashboard to 0.0.0.0.
    inherited = copy.deepcopy(gpu)
    del inherited["head_start_ray_commands"]
    assert "0.0.0.0" in cv.check_dashboard_local(cv.ray_prepare_and_validate(inherited))[0]


# ---------------------------------------------------------------------------------------------------
# Token authentication on every node


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_every_ray_start_uses_token_auth(path):
    prepared = cv.ray_prepare_and_validate(cv.load_documents(path)[0])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert cv.check_token_auth(prepared) == []


def test_missing_or_disabled_token_auth_is_caught(gpu):
    def problems(**changes):
        config = copy.deepcopy(gpu)
        config.update(changes)
        return cv.check_token_auth(cv.ray_prepare_and_validate(config))

    no_auth = [c.replace("RAY_AUTH_MODE=token ", "") for c in gpu["worker_start_ray_commands"]]
    assert any("worker_start_ray_commands" in p for p in problems(worker_start_ray_commands=no_auth))
    disabled = [c.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled") for c in gpu["head_start_ray_commands"]]
    assert problems(head_start_ray_commands=disabled)
    # An assignment that only prefixes `ray stop` does not reach the next command.
    assert problems(worker_start_ray_commands=["RAY_AUTH_MODE=token ray stop; ray start --address=$RAY_HEAD_IP:6379"])
    assert (
        problems(worker_start_ray_commands=["export RAY_AUTH_MODE=token; ray start --address=$RAY_HEAD_IP:6379"]) == []
    )
    assert any("auth_token" in p for p in problems(file_mounts={"~/gradalign": "."}))


# ---------------------------------------------------------------------------------------------------
# Network: only SSH from one CIDR reaches the AWS nodes


def test_every_aws_node_uses_the_locked_down_group(gpu):
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in gpu["available_node_types"].values()}
    assert len(groups) == 1  # one group for all node types, set in one place
    assert "security_group" not in gpu["provider"]  # no extra rules for Ray to add
    assert cv.check_aws_network(gpu) == []


def test_open_ports_and_default_group_are_caught(gpu):
    no_group = copy.deepcopy(gpu)
    del no_group["available_node_types"]["gpu_4x_a10g"]["node_config"]["SecurityGroupIds"]
    assert any("0.0.0.0/0" in p for p in cv.check_aws_network(no_group))

    dashboard_open = copy.deepcopy(gpu)
    dashboard_open["provider"]["security_group"] = {
        "GroupName": "x",
        "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "198.18.7.7/32"}]}
        ],
    }
    assert cv.check_aws_network(dashboard_open)

    world_ssh = copy.deepcopy(gpu)
    world_ssh["metadata"]["gradalign"]["ssh_cidr"] = "0.0.0.0/0"
    assert cv.check_aws_network(world_ssh)
    assert cv.check_ssh_cidr("::/0") and cv.check_ssh_cidr("not-a-cidr")
    assert cv.check_ssh_cidr("198.18.7.7/32") == []


def test_aws_setup_opens_only_ssh_from_the_cidr():
    rules = aws_setup.ingress_rules("sg-0123456789abcdef0", "198.18.7.7/32")
    assert cv.check_ip_permissions(rules) == []
    external = [r for r in rules if r.get("IpRanges")]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in external] == [("tcp", 22, 22)]
    internal = [r for r in rules if r.get("UserIdGroupPairs")]
    assert internal[0]["UserIdGroupPairs"][0]["GroupId"] == "sg-0123456789abcdef0"
    for world in ("0.0.0.0/0", "::/0", "YOUR.PUBLIC.IP.ADDRESS/32"):
        with pytest.raises(ValueError):
            aws_setup.ingress_rules("sg-1", world)


def test_aws_setup_policies_are_scoped(gpu):
    todo = aws_setup.plan(gpu, "198.18.7.7/32", "s3://my-results/gradalign", None)
    assert todo["region"] == gpu["provider"]["region"] and todo["bucket"] == "my-results"
    worker = todo["roles"][aws_setup.WORKER_ROLE]
    assert worker["managed"] == []
    resources = [s["Resource"] for s in worker["inline"]["gradalign-results"]["Statement"]]
    assert resources == ["arn:aws:s3:::my-results", "arn:aws:s3:::my-results/gradalign/*"]
    passrole = aws_setup.head_extra_policy("arn:aws:iam::111122223333:role/gradalign-ray-worker")["Statement"][0]
    assert passrole["Resource"].endswith("role/gradalign-ray-worker")
    names = {t["node_config"]["IamInstanceProfile"]["Name"] for t in gpu["available_node_types"].values()}
    assert names == {aws_setup.HEAD_ROLE, aws_setup.WORKER_ROLE}
    with pytest.raises(ValueError):  # the committed yaml still has the placeholder bucket
        aws_setup.plan(gpu, "198.18.7.7/32", None, None)


class _FakeEC2:
    def __init__(self, existing_rules):
        self.rules = list(existing_rules)

    def describe_vpcs(self, Filters):
        return {"Vpcs": [{"VpcId": "vpc-1"}]}

    def describe_security_groups(self, Filters):
        return {"SecurityGroups": [{"GroupId": "sg-1", "IpPermissions": list(self.rules)}]}

    def revoke_security_group_ingress(self, GroupId, IpPermissions):
        self.rules = [r for r in self.rules if r not in IpPermissions]

    def authorize_security_group_ingress(self, GroupId, IpPermissions):
        self.rules += IpPermissions


def test_aws_setup_replaces_a_world_open_rule():
    world = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    ec2 = _FakeEC2([world])
    assert cv.check_ip_permissions(ec2.rules)
    assert aws_setup.ensure_security_group(ec2, "gradalign-gpu-sg", None, "198.18.7.7/32") == "sg-1"
    assert world not in ec2.rules and cv.check_ip_permissions(ec2.rules) == []


# ---------------------------------------------------------------------------------------------------
# Versions: image == installed ray == what pyproject admits


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_images_match_installed_ray_and_python(path):
    config = cv.load_documents(path)[0]
    images = cv.launcher_images(config)
    assert images == [f"rayproject/ray:{RAY_VERSION}-py{PY_TAG}-gpu"]
    assert cv.check_launcher_versions(config, RAY_VERSION, PY_TAG) == []


def test_version_mismatches_are_caught(gpu):
    assert cv.check_image(f"rayproject/ray:2.59.0-py{PY_TAG}-gpu", RAY_VERSION, PY_TAG)
    assert cv.check_image(f"rayproject/ray:{RAY_VERSION}-py310-gpu", RAY_VERSION, PY_TAG)
    assert cv.check_image("rayproject/ray:latest-gpu", RAY_VERSION, PY_TAG)
    assert cv.check_image(f"registry.example/gradalign:ray{RAY_VERSION}-py{PY_TAG}-gpu", RAY_VERSION, PY_TAG) == []
    pinned = copy.deepcopy(gpu)
    pinned["setup_commands"] = [c.replace(f"=={RAY_VERSION}", "==2.59.0") for c in gpu["setup_commands"]]
    assert cv.check_launcher_versions(pinned, RAY_VERSION, PY_TAG)


def test_pyproject_admits_the_image_versions(tmp_path):
    assert cv.check_pyproject_admits(ROOT / "pyproject.toml", RAY_VERSION, PY_VERSION) == []
    narrow = tmp_path / "pyproject.toml"
    narrow.write_text('[project]\nname = "x"\nrequires-python = ">=3.12"\ndependencies = ["ray[tune]<2.60"]\n')
    assert len(cv.check_pyproject_admits(narrow, "2.60.0", "3.11")) == 2


def test_dockerfile_builds_from_the_same_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert cv.check_dockerfile(text, RAY_VERSION, PY_TAG) == []
    assert cv.check_dockerfile(text.replace(f":{RAY_VERSION}-", ":2.50.0-"), RAY_VERSION, PY_TAG)


# ---------------------------------------------------------------------------------------------------
# The cluster runs the studies: project installed, storage in one place, driver room on the head


def test_gpu_yaml_runs_the_studies(gpu):
    head = gpu["available_node_types"][gpu["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["train_driver"] >= 1
    assert "InstanceMarketOptions" not in head["node_config"]  # on demand: losing the head loses the study
    workers = {n: t for n, t in gpu["available_node_types"].items() if n != gpu["head_node_type"]}
    assert workers and all(
        t["min_workers"] == 0 and t["max_workers"] >= 1 and t["resources"]["GPU"] >= 1 for t in workers.values()
    )
    setup = " ".join(gpu["setup_commands"])
    assert "pip install" in setup and "-e ~/gradalign" in setup and "boto3" in setup
    assert cv.storage_settings(gpu) == ["s3://YOUR-BUCKET/gradalign"]
    assert cv.check_launcher_project(gpu) == [] and cv.check_launcher_resources(cv.ray_prepare_and_validate(gpu)) == []


def test_project_and_resource_gaps_are_caught(gpu):
    twice = copy.deepcopy(gpu)
    twice["head_setup_commands"] = ["export GRADALIGN_STORAGE=s3://other/x"]
    assert any("exactly once" in p for p in cv.check_launcher_project(twice))
    no_install = copy.deepcopy(gpu)
    no_install["setup_commands"] = gpu["setup_commands"][:1]
    assert cv.check_launcher_project(no_install)
    gpu_head = copy.deepcopy(gpu)
    gpu_head["available_node_types"]["head"]["resources"] = {"CPU": 8, "GPU": 1}
    assert len(cv.check_launcher_resources(cv.ray_prepare_and_validate(gpu_head))) == 2


# ---------------------------------------------------------------------------------------------------
# No secrets in the repository


def _committed_text_files() -> list[Path]:
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return files + ([DOCS] if DOCS.exists() else [])


def test_no_secrets_in_cluster_files_or_docs():
    assert _committed_text_files()
    for path in _committed_text_files():
        assert cv.check_no_secrets(path.read_text()) == [], path


def test_secret_scanner_finds_secrets():
    fakes = [
        "aws_access_key_id = AKIA" + "ABCDEFGHIJKLMNOP",
        "aws_secret_access_key: " + "a" * 20 + "B/" * 10,
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
        secrets.token_hex(32),  # what `ray get-auth-token --generate` writes
        "RAY_AUTH_" + "TOKEN=s3cretvalue123",
    ]
    for fake in fakes:
        assert cv.check_no_secrets(f"x: 1\n{fake}\n"), fake
    assert cv.check_no_secrets('RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"') == []


# ---------------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_rayjob_structure(rayjob):
    assert cv.kind_of(cv.load_documents(KUBERAY_FILE)) == "kuberay"
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert re.search(r"python \S*studies/batch_scaling\.py", rayjob["spec"]["entrypoint"])
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["authOptions"] == {"mode": "token", "secretName": "gradalign-ray-token"}
    assert cv.check_kuberay_documents(cv.load_documents(KUBERAY_FILE), RAY_VERSION, PY_TAG) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(enableIngress=True),
        lambda j: j["spec"]["rayClusterSpec"].update(rayVersion="2.59.0"),
        lambda j: j["spec"]["rayClusterSpec"].pop("authOptions"),
        lambda j: j["spec"].update(entrypoint="python studies/tune.py"),
        lambda j: j["spec"]["rayClusterSpec"].update(
            workerGroupSpec=j["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
        ),
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            env=[{"name": "RAY_AUTH_TOKEN", "value": "hunter2hunter2"}]
        ),
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
            image="rayproject/ray:2.59.0-py311-gpu"
        ),
    ],
    ids=[
        "load-balancer",
        "ingress",
        "ray-version",
        "no-auth",
        "other-script",
        "typo",
        "int-param",
        "literal-token",
        "worker-image",
    ],
)
def test_kuberay_breakages_are_caught(rayjob, breakage):
    broken = copy.deepcopy(rayjob)
    breakage(broken)
    assert cv.check_rayjob(broken, RAY_VERSION, PY_TAG)


def test_kuberay_manifest_must_not_carry_a_secret(rayjob):
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t"}, "stringData": {"auth_token": "x"}}
    assert cv.check_kuberay_documents([secret, rayjob], RAY_VERSION, PY_TAG)


def test_kuberay_pod_templates_match_the_kubernetes_schema(rayjob):
    validator = cv.pod_template_validator()
    if validator is None:
        pytest.skip("kubernetes-validate is not installed (it ships the Kubernetes JSON schemas)")
    assert cv.check_rayjob(rayjob, RAY_VERSION, PY_TAG, validator) == []
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0]["opertor"] = "x"
    assert any("opertor" in p for p in cv.check_rayjob(broken, RAY_VERSION, PY_TAG, validator))


# ---------------------------------------------------------------------------------------------------
# The script users run before `ray up`


def test_preflight_demands_filled_placeholders_and_a_token(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # file_mounts' "." is the directory `ray up` runs in
    monkeypatch.setenv("HOME", str(tmp_path))
    path = CLUSTER / "gpu.yaml"
    problems = cv.preflight_problems(path, cv.load_documents(path))
    assert any("YOUR-BUCKET" in p for p in problems) and any("REPLACE" in p for p in problems)
    assert any("ray get-auth-token --generate" in p for p in problems)

    filled = tmp_path / "gpu.yaml"
    filled.write_text(
        path.read_text()
        .replace("YOUR.PUBLIC.IP.ADDRESS/32", "198.18.7.7/32")
        .replace("sg-REPLACE-WITH-AWS-SETUP-OUTPUT", "sg-0123456789abcdef0")
        .replace("YOUR-BUCKET", "my-results")
    )
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert cv.preflight_problems(filled, cv.load_documents(filled)) == []


def test_validate_cli(capsys):
    assert cv.main([]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "gpu.yaml" in out and "kuberay-rayjob.yaml" in out
    with pytest.raises(SystemExit) as exit_info:
        cv.main(["--help"])
    assert exit_info.value.code == 0


def test_docs_walk_through_the_workflow():
    text = DOCS.read_text()
    for step in (
        "ray get-auth-token --generate",
        "cluster/aws_setup.py",
        "ray up cluster/gpu.yaml",
        "ray dashboard cluster/gpu.yaml",
        "studies/batch_scaling.py",
        "ray rsync-down",
        "ray down cluster/gpu.yaml",
        "cluster/validate.py",
        "kubectl create secret",
        "cluster/local.yaml",
        "approximate",
    ):
        assert step in text, step
