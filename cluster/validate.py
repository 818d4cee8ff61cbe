"""Check the cluster configs in cluster/ before `ray up` or `kubectl apply`. Runs offline, in seconds.

    python cluster/validate.py                              # every config under cluster/
    python cluster/validate.py --preflight cluster/gpu.yaml # also: placeholders filled in, token present

Ray cluster-launcher files (anything with a `provider:`) go through Ray's own checks, the ones `ray up`
runs before it touches a cloud: `prepare_config` (merge with the provider's defaults) and `validate_config`
(Ray's JSON schema, node types, worker counts). The provider's bootstrap (IAM, subnets, security groups,
key pairs) needs cloud credentials and is not called. KubeRay manifests (`kind: RayJob`) get a structural
check of the RayJob fields, and their pod templates are validated against the Kubernetes JSON schema
when the `kubernetes-validate` package is installed.

On top of that, every file is checked for the properties this project relies on: dashboard bound to
127.0.0.1, Ray token authentication on every node, SSH as the only port open to the outside (AWS), no
secrets in the file, and images whose Ray and Python versions equal the ones running this script.
Each check returns a list of problems (empty: fine), so tests can call them on broken configs too.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import ipaddress
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

CLUSTER_DIR = Path(__file__).resolve().parent
REPO_ROOT = CLUSTER_DIR.parent

# A placeholder the user must replace before `ray up`; the repository's files keep them.
PLACEHOLDER = re.compile(r"YOUR[-_.A-Z]*|REPLACE[-_A-Z]*|\b(?:192\.0\.2|198\.51\.100|203\.0\.113)\.\d+\b")

# Tokens, keys and passwords that must never be committed. Ray's own tokens are 64 hex characters.
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{40}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Ray auth token (64 hex digits)": re.compile(r"\b[0-9a-fA-F]{64}\b"),
    "literal RAY_AUTH_TOKEN value": re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9_\-]{8,}"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
}

IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})(?:-[\w.]+)?$")
# A project image built from cluster/Dockerfile carries the same versions in its tag: ...:ray2.60.0-py311-gpu
CUSTOM_IMAGE_RE = re.compile(r":ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})(?:-[\w.]+)?$")

# RayJob / RayCluster fields of KubeRay's ray.io/v1 API (the subset of the CRD this check knows).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
    "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "authOptions",
    "gcsFaultToleranceOptions",
    "managedBy",
    "upgradeStrategy",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}


# ----------------------------------------------------------------------------------------------------
# Loading


def load_documents(path: Path) -> list[Any]:
    """All YAML documents of a file (a KubeRay manifest may hold several)."""
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kind_of(docs: list[Any]) -> str:
    """'ray-launcher', 'kuberay' or 'other'."""
    if len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]:
        return "ray-launcher"
    if any(isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/") for d in docs):
        return "kuberay"
    return "other"


def cluster_files(root: Path = CLUSTER_DIR) -> list[Path]:
    """The YAML configs and Dockerfiles under cluster/."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix in (".yaml", ".yml") or (p.name.startswith("Dockerfile") and p.suffix == "")
    )


def installed_versions() -> tuple[str, str]:
    """(Ray version, Python tag such as '311') of the interpreter running this: the client's versions."""
    import ray

    return ray.__version__, f"{sys.version_info.major}{sys.version_info.minor}"


# ----------------------------------------------------------------------------------------------------
# Ray's own validator


def ray_prepare_and_validate(config: dict) -> dict:
    """Run the checks `ray up` runs before it calls the cloud; return the prepared config.

    This is `ray.autoscaler._private.commands._bootstrap_config` without its two provider calls
    (`fillout_available_node_types_resources` and `bootstrap_config`), which need cloud credentials.
    Raises whatever Ray raises (jsonschema.ValidationError, ValueError, click.ClickException, ...).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ----------------------------------------------------------------------------------------------------
# Shell commands


def _segments(command: str) -> list[str]:
    """Split a shell command line into simple commands (on ; && || and newlines)."""
    return [s.strip() for s in re.split(r";|&&|\|\||\n", command) if s.strip()]


def _ray_start_segments(commands: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(`ray start ...` simple command, the simple commands before it in the same line) pairs."""
    found = []
    for command in commands:
        segments = _segments(command)
        for i, segment in enumerate(segments):
            if re.search(r"\bray\s+start\b", segment):
                found.append((segment, segments[:i]))
    return found


def check_dashboard_local(prepared: dict) -> list[str]:
    """Every `ray start --head` binds the dashboard (and the Jobs API) to 127.0.0.1."""
    heads = [s for s, _ in _ray_start_segments(prepared.get("head_start_ray_commands") or []) if "--head" in s]
    if not heads:
        return ["head_start_ray_commands has no `ray start --head`"]
    problems = []
    for segment in heads:
        if re.search(r"--include-dashboard[= ]+(?:false|False|0)\b", segment):
            continue
        match = re.search(r"--dashboard-host[= ]+(\S+)", segment)
        host = match.group(1).strip("'\"") if match else None
        if host not in ("127.0.0.1", "localhost"):
            problems.append(
                f"dashboard must listen on 127.0.0.1 (--dashboard-host=127.0.0.1), got "
                f"{host or 'no --dashboard-host'} in: {segment}"
            )
    return problems


def _auth_mode_before(segment: str, earlier: list[str]) -> str | None:
    """RAY_AUTH_MODE in force for a simple command: its own prefix, else the last earlier `export`."""
    own = re.match(r"^(?:\w+=\S*\s+)*", segment).group(0)
    modes = re.findall(r"\bRAY_AUTH_MODE=(\w+)", own)
    if modes:
        return modes[-1]
    for previous in reversed(earlier):
        modes = re.findall(r"^export\s+(?:.*\s)?RAY_AUTH_MODE=(\w+)", previous)
        if modes:
            return modes[-1]
    return None


def check_token_auth(prepared: dict) -> list[str]:
    """Every `ray start` runs with RAY_AUTH_MODE=token, and every node gets the token file."""
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _ray_start_segments(prepared.get(key) or [])
        if not starts:
            problems.append(f"{key} has no `ray start`")
        for segment, earlier in starts:
            mode = _auth_mode_before(segment, earlier)
            if mode != "token":
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token (got {mode}): {segment}")
    for key, value in prepared.items():
        if key.endswith("commands") and re.search(r"RAY_AUTH_MODE=(?!token\b)", json.dumps(value)):
            problems.append(f"{key} sets RAY_AUTH_MODE to something other than token")
    mounts = prepared.get("file_mounts") or {}
    if not any(remote.rstrip("/").endswith(".ray/auth_token") for remote in mounts):
        problems.append('file_mounts must sync the token to every node: "~/.ray/auth_token": "~/.ray/auth_token"')
    return problems


# ----------------------------------------------------------------------------------------------------
# Network (AWS)


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and bool(PLACEHOLDER.search(value))


def check_ssh_cidr(cidr: Any, allow_placeholder: bool = True) -> list[str]:
    """The SSH source range is set, valid, and not (nearly) the whole internet."""
    if cidr is None:
        return ["metadata.gradalign.ssh_cidr is missing: the CIDR allowed to reach SSH"]
    if _is_placeholder(cidr):
        return [] if allow_placeholder else [f"ssh_cidr is still the placeholder {cidr!r}: set it to your IP/32"]
    try:
        network = ipaddress.ip_network(str(cidr), strict=False)
    except ValueError:
        return [f"ssh_cidr {cidr!r} is not a CIDR such as 203.0.113.7/32"]
    if network.prefixlen < (8 if network.version == 4 else 32):
        return [f"ssh_cidr {cidr} opens SSH to (nearly) the whole internet"]
    return []


def check_ip_permissions(rules: list[dict]) -> list[str]:
    """Security-group ingress rules: sources outside the cluster may reach TCP port 22 only."""
    problems = []
    for rule in rules:
        external = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        external += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        external += [r.get("PrefixListId") for r in rule.get("PrefixListIds", [])]
        if not external:
            continue  # only other security groups (the cluster itself)
        ports = (str(rule.get("IpProtocol")), rule.get("FromPort"), rule.get("ToPort"))
        if ports != ("tcp", 22, 22):
            problems.append(f"ingress from {external} to {ports}: only tcp/22 may be open to the outside")
        for cidr in external:
            if cidr and "/" in cidr:
                problems += check_ssh_cidr(cidr, allow_placeholder=True)
    return problems


def check_aws_network(config: dict) -> list[str]:
    """No node lets Ray create its default security group (SSH from 0.0.0.0/0); extra rules are SSH only."""
    if config.get("provider", {}).get("type") != "aws":
        return []
    problems = []
    for name, node_type in config.get("available_node_types", {}).items():
        node_config = node_type.get("node_config", {})
        groups = node_config.get("SecurityGroupIds") or [
            g for ni in node_config.get("NetworkInterfaces", []) for g in ni.get("Groups", [])
        ]
        if not groups:
            problems.append(
                f"node type {name} has no SecurityGroupIds: `ray up` would create a group with "
                "SSH open to 0.0.0.0/0 (create one with cluster/aws_setup.py)"
            )
    problems += check_ip_permissions(config["provider"].get("security_group", {}).get("IpPermissions", []))
    problems += check_ssh_cidr(config.get("metadata", {}).get("gradalign", {}).get("ssh_cidr"))
    return problems


# ----------------------------------------------------------------------------------------------------
# Versions, project, storage, resources


def check_image(image: str, ray_version: str, py_tag: str) -> list[str]:
    """A rayproject/ray image (or a project image tagged ray<version>-py<tag>) of the given versions."""
    match = IMAGE_RE.match(image) or CUSTOM_IMAGE_RE.search(image)
    if not match:
        return [
            f"image {image!r} does not name its Ray and Python versions "
            "(rayproject/ray:<ray>-py<python>-gpu, or a project image tagged :ray<ray>-py<python>-gpu)"
        ]
    problems = []
    if match["ray"] != ray_version:
        problems.append(f"image {image} has Ray {match['ray']}, the client has Ray {ray_version}")
    if match["py"] != py_tag:
        problems.append(f"image {image} has Python {match['py']}, the client has Python {py_tag}")
    return problems


def launcher_images(config: dict) -> list[str]:
    docker = config.get("docker") or {}
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    for node_type in (config.get("available_node_types") or {}).values():
        if (node_type.get("docker") or {}).get("worker_image"):
            images.append(node_type["docker"]["worker_image"])
    return images


def check_launcher_versions(config: dict, ray_version: str, py_tag: str) -> list[str]:
    images = launcher_images(config)
    problems = [] if images else ["no docker image: pin rayproject/ray:<ray>-py<python>-gpu"]
    for image in images:
        problems += check_image(image, ray_version, py_tag)
    all_commands = json.dumps([config.get(k) for k in config if k.endswith("commands")])
    for pinned in re.findall(r"ray\[[\w,]+\]==([\w.]+)", all_commands):
        if pinned != ray_version:
            problems.append(f"setup commands pin ray=={pinned}, the client has Ray {ray_version}")
    return problems


def check_pyproject_admits(pyproject: Path, ray_version: str, py_version: str) -> list[str]:
    """pyproject.toml's ray requirement and requires-python admit the image's versions."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads(pyproject.read_text())["project"]
    rays = [Requirement(d) for d in project.get("dependencies", []) if Requirement(d).name == "ray"]
    problems = [] if rays else ["pyproject.toml does not depend on ray"]
    for req in rays:
        if not req.specifier.contains(ray_version, prereleases=True):
            problems.append(f"pyproject requires {req}, which excludes Ray {ray_version}")
    if not SpecifierSet(project.get("requires-python", "")).contains(py_version):
        problems.append(f"requires-python {project.get('requires-python')} excludes Python {py_version}")
    return problems


def storage_settings(config: dict) -> list[str]:
    """Every GRADALIGN_STORAGE=... assignment in the file's commands (there should be exactly one)."""
    commands = json.dumps([config.get(k) for k in sorted(config) if k.endswith("commands")])
    return re.findall(r"GRADALIGN_STORAGE=([^\s'\"\\]+)", commands)


def check_dockerfile(text: str, ray_version: str, py_tag: str) -> list[str]:
    """The project image builds FROM the official image of the client's versions and keeps Ray there."""
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    problems = [] if bases else ["no FROM line"]
    for base in bases:
        problems += check_image(base, ray_version, py_tag)
    for pinned in re.findall(r"ray\[[\w,]+\]==([\w.]+)", text):
        if pinned != ray_version:
            problems.append(f"the Dockerfile pins ray=={pinned}, the client has Ray {ray_version}")
    return problems


def check_launcher_project(config: dict) -> list[str]:
    """The repository is synced, installed on every node, and the storage is set in one place."""
    problems = []
    mounts = config.get("file_mounts") or {}
    if mounts.get("~/gradalign") != ".":
        problems.append('file_mounts must sync the repository: "~/gradalign": "."')
    setup = " ".join(config.get("setup_commands") or [])
    if not re.search(r"pip install\b.*-e\s+~/gradalign\b", setup):
        problems.append("setup_commands must `pip install -e ~/gradalign` (on every node)")
    if ".gitignore" not in (config.get("rsync_filter") or []):
        problems.append("rsync_filter should contain .gitignore (or the sync copies .venv and results/)")
    settings = storage_settings(config)
    if len(settings) != 1:
        problems.append(f"GRADALIGN_STORAGE must be set exactly once, found {settings}")
    return problems


def check_launcher_resources(prepared: dict) -> list[str]:
    """The head reserves `train_driver` for Tune's driver trials and offers no GPU; GPU workers exist."""
    problems = []
    head_cmds = " ".join(prepared.get("head_start_ray_commands") or [])
    if prepared.get("provider", {}).get("type") == "local":
        if "train_driver" not in head_cmds:
            problems.append("the head `ray start` must declare --resources='{\"train_driver\": N}'")
        return problems
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]].get("resources", {})
    if head.get("train_driver", 0) < 1 and "train_driver" not in head_cmds:
        problems.append("the head node type must offer the custom resource train_driver (>= 1)")
    if head.get("GPU", 0) != 0:
        problems.append("the head node type should offer GPU: 0 (it runs drivers, not training)")
    if not any(
        t.get("resources", {}).get("GPU", 0) >= 1 for name, t in types.items() if name != prepared["head_node_type"]
    ):
        problems.append("no worker node type offers a GPU")
    return problems


# ----------------------------------------------------------------------------------------------------
# Secrets


def check_no_secrets(text: str) -> list[str]:
    return [
        f"looks like a committed secret ({name}): {m.group(0)[:12]}..."
        for name, pattern in SECRET_PATTERNS.items()
        for m in pattern.finditer(text)
    ]


# ----------------------------------------------------------------------------------------------------
# KubeRay


def _kube_schema_dir() -> Path | None:
    """The newest strict schema folder of the `kubernetes-validate` package, without importing it."""
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "kubernetes-json-schema"
    strict = [p for p in root.glob("v*-local-strict") if p.is_dir()]
    return max(strict, key=lambda p: tuple(int(x) for x in re.findall(r"\d+", p.name)[:3])) if strict else None


def pod_template_validator():
    """A jsonschema validator for Kubernetes PodTemplateSpec (strict), or None without kubernetes-validate."""
    schema_dir = _kube_schema_dir()
    if schema_dir is None:
        return None
    import jsonschema
    from referencing import Registry, Resource

    schema = json.loads((schema_dir / "podtemplatespec-v1.json").read_text())
    definitions = json.loads((schema_dir / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _unknown(fields: dict, known: set[str], where: str) -> list[str]:
    return [f"{where}: unknown field {k!r}" for k in sorted(set(fields) - known)]


def _containers(template: dict) -> list[dict]:
    return ((template or {}).get("spec") or {}).get("containers") or []


def _check_start_params(params: Any, where: str) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams must be a mapping (may be empty)"]
    return [
        f"{where}.rayStartParams.{k} must be a string, got {v!r}" for k, v in params.items() if not isinstance(v, str)
    ]


def _check_pod_env(template: dict, where: str) -> list[str]:
    problems = []
    for container in _containers(template):
        for env in container.get("env") or []:
            if env.get("name") == "RAY_AUTH_TOKEN" and "value" in env:
                problems.append(f"{where}: RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef)")
            if env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token":
                problems.append(f"{where}: RAY_AUTH_MODE must be token")
    return problems


def check_rayjob(doc: dict, ray_version: str, py_tag: str, validator=None) -> list[str]:
    """Structural check of a KubeRay RayJob (ray.io/v1) for this project; pod templates against the
    Kubernetes schema when a `validator` (see pod_template_validator) is given."""
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayJob":
        return [f"expected apiVersion ray.io/v1, kind RayJob; got {doc.get('apiVersion')}, {doc.get('kind')}"]
    problems = []
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name is required")
    spec = doc.get("spec") or {}
    problems += _unknown(spec, RAYJOB_SPEC_FIELDS, "spec")
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str) or not re.search(r"\bpython3?\s+(\S*/)?studies/batch_scaling\.py\b", entrypoint):
        problems.append(f"spec.entrypoint must run `python studies/batch_scaling.py ...`, got {entrypoint!r}")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    if not isinstance(runtime_env, dict):
        problems.append("spec.runtimeEnvYAML must be a YAML mapping")
    elif "GRADALIGN_STORAGE" not in (runtime_env.get("env_vars") or {}):
        problems.append("spec.runtimeEnvYAML must set env_vars.GRADALIGN_STORAGE (shared results storage)")

    cluster = spec.get("rayClusterSpec")
    if not isinstance(cluster, dict):
        return problems + ["spec.rayClusterSpec is required (this manifest creates its own cluster)"]
    problems += _unknown(cluster, RAYCLUSTER_SPEC_FIELDS, "spec.rayClusterSpec")
    if str(cluster.get("rayVersion")) != ray_version:
        problems.append(f"rayClusterSpec.rayVersion is {cluster.get('rayVersion')!r}, the client has {ray_version}")
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") != "token":
        problems.append("rayClusterSpec.authOptions.mode must be token")
    if not auth.get("secretName"):
        problems.append("rayClusterSpec.authOptions.secretName must name the Secret that holds the token")

    head = cluster.get("headGroupSpec") or {}
    problems += _unknown(head, HEAD_GROUP_FIELDS, "headGroupSpec")
    problems += _check_start_params(head.get("rayStartParams"), "headGroupSpec")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"headGroupSpec.serviceType {head['serviceType']} exposes the dashboard; use ClusterIP")
    if ((head.get("headService") or {}).get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append("headGroupSpec.headService must be of type ClusterIP")
    if head.get("enableIngress"):
        problems.append("headGroupSpec.enableIngress exposes the dashboard; leave it off")
    head_params = head.get("rayStartParams") or {}
    if "train_driver" not in str(head_params.get("resources", "")):
        problems.append("headGroupSpec.rayStartParams.resources must declare train_driver")
    if str(head_params.get("num-gpus", "")) != "0":
        problems.append('headGroupSpec.rayStartParams["num-gpus"] should be "0"')

    templates = [("headGroupSpec", head.get("template"))]
    workers = cluster.get("workerGroupSpecs") or []
    if not workers:
        problems.append("workerGroupSpecs: at least one (GPU) worker group")
    for i, group in enumerate(workers):
        where = f"workerGroupSpecs[{i}]"
        problems += _unknown(group, WORKER_GROUP_FIELDS, where)
        problems += _check_start_params(group.get("rayStartParams"), where)
        if not group.get("groupName"):
            problems.append(f"{where}.groupName is required")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= group.get("replicas", low) <= high):
            problems.append(f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas")
        gpus = [
            c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for c in _containers(group.get("template"))
        ]
        if not any(gpus):
            problems.append(f"{where}: the Ray container should have a nvidia.com/gpu limit")
        templates.append((where, group.get("template")))
    if spec.get("submitterPodTemplate"):
        templates.append(("submitterPodTemplate", spec["submitterPodTemplate"]))

    for where, template in templates:
        containers = _containers(template)
        if not containers:
            problems.append(f"{where}.template.spec.containers must not be empty")
        for container in containers:
            problems += [f"{where}: {p}" for p in check_image(container.get("image", ""), ray_version, py_tag)]
        problems += _check_pod_env(template, where)
        if validator is not None:
            problems += [
                f"{where}.template.{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(template)
            ]
    return problems


def check_kuberay_documents(docs: list[Any], ray_version: str, py_tag: str, validator=None) -> list[str]:
    problems = []
    for doc in docs:
        if doc.get("kind") == "Secret":
            problems.append("do not commit Kubernetes Secrets: create the token Secret with kubectl")
        elif doc.get("kind") == "RayJob":
            problems += check_rayjob(doc, ray_version, py_tag, validator)
        elif doc.get("kind") in ("Service", "Ingress") or (doc.get("spec") or {}).get("type") == "LoadBalancer":
            problems.append(f"{doc.get('kind')} in the manifest: do not expose the Ray head")
    if not any(doc.get("kind") == "RayJob" for doc in docs):
        problems.append("no RayJob in the manifest")
    return problems


# ----------------------------------------------------------------------------------------------------
# Files


def check_launcher_config(config: dict, ray_version: str, py_tag: str) -> list[str]:
    """Everything for one cluster-launcher config: Ray's validator, then this project's properties."""
    try:
        prepared = ray_prepare_and_validate(config)
    except Exception as e:  # noqa: BLE001 -- Ray raises jsonschema, ValueError, AssertionError or click exceptions
        return [f"Ray's validator rejects it: {type(e).__name__}: {getattr(e, 'message', e)}"]
    problems = []
    problems += check_dashboard_local(prepared)
    problems += check_token_auth(prepared)
    problems += check_aws_network(prepared)
    problems += check_launcher_versions(config, ray_version, py_tag)
    problems += check_launcher_project(config)
    problems += check_launcher_resources(prepared)
    return problems


def preflight_problems(path: Path, docs: list[Any]) -> list[str]:
    """What stops a real launch: placeholders left, no local token, missing SSH key."""
    problems = []
    text = path.read_text()
    for line_no, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        for m in PLACEHOLDER.finditer(code):
            problems.append(f"line {line_no}: replace the placeholder {m.group(0)!r}")
    if kind_of(docs) == "ray-launcher":
        config = docs[0]
        mounts = config.get("file_mounts") or {}
        for remote, local in mounts.items():
            if not Path(os.path.expanduser(local)).exists():
                hint = " (run `ray get-auth-token --generate`)" if remote.endswith("auth_token") else ""
                problems.append(f"file_mounts source {local} does not exist{hint}")
        problems += (
            check_ssh_cidr(config.get("metadata", {}).get("gradalign", {}).get("ssh_cidr"), allow_placeholder=False)
            if config["provider"]["type"] == "aws"
            else []
        )
        key = (config.get("auth") or {}).get("ssh_private_key")
        if key and not _is_placeholder(key) and not Path(os.path.expanduser(key)).exists():
            problems.append(f"auth.ssh_private_key {key} does not exist")
    return problems


def check_file(path: Path, ray_version: str, py_tag: str, preflight: bool = False, validator=None) -> list[str]:
    text = path.read_text()
    problems = check_no_secrets(text)
    if path.name.startswith("Dockerfile"):
        return problems + check_dockerfile(text, ray_version, py_tag)
    try:
        docs = load_documents(path)
    except yaml.YAMLError as e:
        return problems + [f"not valid YAML: {e}"]
    kind = kind_of(docs)
    if kind == "ray-launcher":
        problems += check_launcher_config(docs[0], ray_version, py_tag)
    elif kind == "kuberay":
        problems += check_kuberay_documents(docs, ray_version, py_tag, validator)
    if preflight:
        problems += preflight_problems(path, docs)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "files", nargs="*", type=Path, help="files to check (default: every .yaml and Dockerfile under cluster/)"
    )
    parser.add_argument(
        "--preflight",
        action="store_true",
        help="also fail on placeholders (YOUR-..., REPLACE-...), a missing ~/.ray/auth_token "
        "or SSH key: run this right before `ray up` / `kubectl apply`",
    )
    args = parser.parse_args(argv)

    ray_version, py_tag = installed_versions()
    validator = pod_template_validator()
    files = args.files or cluster_files()
    failed = 0
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.exists():
        problems = check_pyproject_admits(pyproject, ray_version, f"{py_tag[0]}.{py_tag[1:]}")
        print(f"{'FAIL' if problems else 'ok  '} pyproject.toml admits Ray {ray_version}, Python {py_tag}")
        for p in problems:
            print(f"     - {p}")
        failed += bool(problems)
    for path in files:
        problems = check_file(path, ray_version, py_tag, args.preflight, validator)
        kind = kind_of(load_documents(path)) if path.suffix in (".yaml", ".yml") else path.name
        how = {
            "ray-launcher": "Ray prepare_config + validate_config, security checks",
            "Dockerfile": "base image versions, secrets scan",
            "kuberay": "RayJob structure"
            + (", Kubernetes pod schema" if validator else " (pip install kubernetes-validate for the pod schema)"),
        }.get(kind, "secrets scan")
        shown = os.path.relpath(path) if path.is_absolute() else path
        print(f"{'FAIL' if problems else 'ok  '} {shown}  [{how}]")
        for p in problems:
            print(f"     - {p}")
        failed += bool(problems)
    print(f"{len(files) + 1 - failed} ok, {failed} failed (client: Ray {ray_version}, Python {py_tag})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
