"""Where a result came from: code version, library versions, hardware. Attached to every result row."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The repository's commit (with '+dirty' when the tree has changes), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU ({platform.machine()})"
    if torch.cuda.is_available():
        return f"{cpu}, {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return cpu


def provenance() -> dict[str, str]:
    """Flat string fields, ready to be columns of a results table."""
    return {
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "ray": _version("ray"),
        "optuna": _version("optuna"),
        "hardware": hardware(),
        "host": platform.node(),
    }
