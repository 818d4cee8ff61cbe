"""A study folder remembers what it is (`<out>/study.json`): its kind, its protocol and its cells, and refuses others.

Everything that makes the numbers is remembered: the protocol (`gradalign.protocol.StudyProtocol`: axes, ranges,
budget, splits, seeds, tuning, target, tolerance) and every cell (its key, scientific coordinates, workers, fixed
configuration and search space). Where things run (storage, CPUs or GPUs per worker, concurrency) and where the data
lives are not part of it. The code version is written down (`provenance`) but not compared: a study may be resumed
after a bug fix. Adding seeds is the one change that extends a study soundly (the runs of the new seeds are new
trials; nothing else changes), and is accepted when asked for explicitly. Pure: no Ray.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .protocol import StudyProtocol
from .provenance import provenance

__all__ = ["STUDY_FILE", "StudyFile", "read_study_file", "check_study_file", "write_study_file", "flat_settings"]

STUDY_FILE = "study.json"
KEY_EXCLUDED = ("data_dir", "download")
"""Settings that say where the data lives, not what is computed: never compared."""


@dataclass(frozen=True)
class StudyFile:
    """What `study.json` holds."""

    kind: str
    protocol: StudyProtocol
    cells: Mapping[str, Mapping[str, Any]]
    """Per cell key, its flattened settings (coords, workers, search space)."""
    provenance: Mapping[str, Any]


def read_study_file(out_dir: Path) -> StudyFile | None:
    """The study recorded in `out_dir` (None if there is none). A damaged or foreign file raises `ConfigError`
    naming it and what to do."""
    path = Path(out_dir) / STUDY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if "settings" in data and "protocol" not in data:
            raise ConfigError(
                "out",
                str(out_dir),
                f"{path} was written by an older version of this project (no protocol in it): "
                "its study cannot be resumed or rebuilt by this one; start a new study with another --name or --out",
            )
        return StudyFile(
            kind=data["kind"],
            protocol=StudyProtocol.from_json(data["protocol"]),
            cells={k: dict(v) for k, v in data["cells"].items()},
            provenance=dict(data.get("provenance") or {}),
        )
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            "out",
            str(out_dir),
            f"{path} is damaged ({type(err).__name__}: {err}); it records the protocol the study was started "
            "with: restore it (e.g. from a backup), or start a new study with another --name or --out",
        ) from None


def check_study_file(
    out_dir: Path, protocol: StudyProtocol, cells: Mapping[str, Mapping[str, Any]], extend_seeds: bool = False
) -> None:
    """Raise `ConfigError` naming what changed if `out_dir` holds a study of another kind or other settings.

    With `extend_seeds`, a study whose only change is more seeds (a superset of the old ones) is accepted.
    """
    saved = read_study_file(out_dir)
    if saved is None:
        return
    if saved.kind != protocol.kind:
        raise ConfigError(
            "out",
            str(out_dir),
            f"this folder holds a {saved.kind} study, not a {protocol.kind} study: use "
            f"the {saved.kind} script on it, or another --out",
        )
    changes = protocol.changes_from(saved.protocol) + _cell_changes(saved.cells, cells)
    if not changes:
        return
    only_seeds_added = all(c.startswith("seeds:") for c in changes) and set(saved.protocol.seeds) < set(protocol.seeds)
    if extend_seeds and only_seeds_added:
        return
    hint = " To add the new seeds to this study instead, re-run with --extend-seeds." if only_seeds_added else ""
    shown = changes[:8] + ([f"and {len(changes) - 8} more"] if len(changes) > 8 else [])
    raise ConfigError(
        "out",
        str(out_dir),
        f"the study in this folder was started with other settings: {'; '.join(shown)}. Re-run "
        f"it with its original options to resume it, or start a new study with another --name (or --out).{hint}",
    )


def write_study_file(out_dir: Path, protocol: StudyProtocol, cells: Mapping[str, Mapping[str, Any]]) -> None:
    """Write `study.json` atomically (the protocol, the cells, and the provenance of the run that wrote it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": protocol.kind,
        "protocol": protocol.to_json(),
        "cells": {k: dict(v) for k, v in cells.items()},
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "provenance": provenance(),
    }
    tmp = out_dir / f"{STUDY_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(out_dir / STUDY_FILE)


def flat_settings(value: Any) -> dict[str, Any]:
    """JSON-ready settings flattened to 'space.lr.high'-style keys, without where the data lives."""
    flat = _flatten(json.loads(json.dumps(value, default=repr)))
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in KEY_EXCLUDED}


def _cell_changes(old_cells: Mapping[str, Mapping], new_cells: Mapping[str, Mapping]) -> list[str]:
    """Readable differences between two studies' cells; a change shared by every cell is said once."""
    lines = []
    if set(new_cells) - set(old_cells):
        lines.append(f"cells added: {', '.join(sorted(set(new_cells) - set(old_cells)))}")
    if set(old_cells) - set(new_cells):
        lines.append(f"cells removed: {', '.join(sorted(set(old_cells) - set(new_cells)))}")
    shared = sorted(set(old_cells) & set(new_cells))
    by_change: dict[str, list[str]] = {}
    for key in shared:
        old, new = old_cells[key], new_cells[key]
        for name in sorted(k for k in old.keys() | new.keys() if _canonical(old.get(k)) != _canonical(new.get(k))):
            by_change.setdefault(f"{name}: {_show(old.get(name))} -> {_show(new.get(name))}", []).append(key)
    for line, keys in by_change.items():
        where = "every cell" if len(keys) == len(shared) else f"cells {', '.join(keys)}"
        lines.append(f"{line} ({where})")
    return lines


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _show(value: Any) -> str:
    return "(not set)" if value is None else repr(value)
