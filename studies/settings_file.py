"""A study folder remembers the settings it was started with (`<out>/study.json`), and refuses others.

Everything that makes the plan is remembered: the study's name, every cell (its key, scientific coordinates,
workers, fixed configuration and nuisance ranges: dataset, model, budget, ...), the tuning trials per cell, the seeds,
the objective, ASHA and the sampler seed. Where things run (storage, CPUs or GPUs per worker, concurrency) and where
the data lives are not part of it. The code version is written down (`provenance`) but not compared: a study may be
resumed after a bug fix. Adding seeds is the one change that extends a study soundly (the seed runs of the new seeds
are new trials; nothing else changes), and is accepted when asked for explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

from gradalign.config import ConfigError
from gradalign.provenance import provenance
from gradalign.ray_adapter import flat_settings, setting_changes

SETTINGS_FILE = "study.json"


def plan_settings(plan) -> dict[str, Any]:
    """What a study must keep to be resumed: {'study': flat settings, 'cells': {key: flat settings}}."""
    study = {
        "name": plan.name,
        "trials_per_cell": plan.trials_per_cell,
        "seeds": list(plan.seeds),
        "tuning_seeds": list(plan.tuning_seeds),
        "objective": plan.objective,
        "asha": plan.asha,
        "sampler_seed": plan.sampler_seed,
        "extra_columns": dict(plan.extra_columns),
    }
    cells = {
        c.key: {"coords": dict(c.coords), "workers": c.workers, "space": dataclasses.asdict(c.space)}
        for c in plan.cells
    }
    return {"study": flat_settings(study), "cells": {key: flat_settings(value) for key, value in cells.items()}}


def check_plan(plan, extend_seeds: bool = False) -> None:
    """Raise `ConfigError` naming what changed if the study in `plan.out_dir` was started with other settings.

    With `extend_seeds`, a study whose only change is more seeds (a superset of the old ones) is accepted.
    """
    path = plan.out_dir / SETTINGS_FILE
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            "out",
            str(plan.out_dir),
            f"{path} is damaged ({type(err).__name__}: {err}); it records the "
            "settings the study was started with: restore it, or start a new study with another "
            "--name or --out",
        ) from None
    now = plan_settings(plan)
    changes = _changes(saved, now)
    if not changes:
        return
    old_seeds, new_seeds = saved["study"].get("seeds"), now["study"]["seeds"]
    only_seeds_added = changes == _seed_change(saved, now) and set(old_seeds or ()) < set(new_seeds)
    if extend_seeds and only_seeds_added:
        return
    hint = " To add the new seeds to this study instead, re-run with --extend-seeds." if only_seeds_added else ""
    raise ConfigError(
        "out",
        str(plan.out_dir),
        f"the study in this folder was started with other settings: "
        f"{'; '.join(changes)}. Re-run it with its original options to resume it, or start a new study "
        f"with another --name (or --out).{hint}",
    )


def record_plan(plan) -> None:
    """Write `study.json` (the settings, and the provenance of the run that wrote it)."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": plan_settings(plan),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "provenance": provenance(),
    }
    tmp = plan.out_dir / f"{SETTINGS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(plan.out_dir / SETTINGS_FILE)


def _changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Readable differences; a change shared by every cell is said once."""
    lines = setting_changes(saved.get("study", {}), now["study"], limit=10**6)
    old_cells, new_cells = saved.get("cells", {}), now["cells"]
    if set(new_cells) - set(old_cells):
        lines.append(f"cells added: {', '.join(sorted(set(new_cells) - set(old_cells)))}")
    if set(old_cells) - set(new_cells):
        lines.append(f"cells removed: {', '.join(sorted(set(old_cells) - set(new_cells)))}")
    shared = sorted(set(old_cells) & set(new_cells))
    by_change: dict[str, list[str]] = {}
    for key in shared:
        for line in setting_changes(old_cells[key], new_cells[key], limit=10**6):
            by_change.setdefault(line, []).append(key)
    for line, keys in by_change.items():
        where = "every cell" if len(keys) == len(shared) else f"cells {', '.join(keys)}"
        lines.append(f"{line} ({where})")
    return lines[:8] + ([f"and {len(lines) - 8} more"] if len(lines) > 8 else [])


def _seed_change(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return setting_changes({"seeds": saved["study"].get("seeds")}, {"seeds": now["study"]["seeds"]})
