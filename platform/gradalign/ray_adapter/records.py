"""Trial records: what each trial configuration has trained so far, the ground truth a resumed study reconciles with.

Tune snapshots its experiment state at most every ~10 s, so after a hard kill of the driver it can forget trials that
had started (or even finished) since. The trial records cannot forget: the trainable writes its record beside its
state after every evaluation. A record is keyed by a hash of the trial's *configuration* (`trial_key`), not by the Tune
trial id, so whichever Tune trial runs a configuration again -- a restored one, or one re-suggested after a restore
-- finds what was already trained: a finished record is answered without training, an unfinished one resumes.

One JSON file per configuration (`TrialExecution.history_path(key)`)::

    {"key": ..., "config": {...}, "trial_ids": [first Tune trial id, later ones...], "created": unix time,
     "history": [per-evaluation metrics], "trained": [[evaluation, pid], ...]}

`trained` gets one entry each time an evaluation interval is actually computed (and saved), so it counts the
trainings. The first Tune trial id is the trial's id in every table and in the Optuna study, whichever Tune
trial reported it last. A trial that Tune itself ended before its budget was spent (stopped by ASHA) also gets a marker
(`ended/<key>.json`, written by `RecordCloser` in the driver), so that a restored study does not train it further.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs
from ray import tune

from ._common import _join, _plain, _read_json
from .execution import TrialExecution

KEY_EXCLUDED = ("data_dir", "download")
"""Config entries that do not change what a trial computes (where the data lives), left out of its key."""

_ALL_MAX_AGE_S = 60.0
"""How long `TrialRecords.all()` reuses what it read."""

FROM_RECORD = "from_record"
"""Set (True) in the one result a trial reports when its configuration was answered from its record, untrained."""

FINAL_STATUSES = ("completed", "diverged")
"""Trainer statuses after which a trial has nothing left to train."""


def trial_key(config: Mapping[str, Any]) -> str:
    """A stable name for a trial configuration: the same configuration always gets the same key."""
    kept = {k: _plain(v) for k, v in config.items() if k not in KEY_EXCLUDED}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class TrialRecord:
    """What one trial configuration has trained so far (see the module docstring)."""

    key: str
    config: dict[str, Any]
    trial_ids: list[str] = field(default_factory=list)
    created: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    trained: list[list[int]] = field(default_factory=list)
    ended: str | None = None
    """Set when Tune ended the trial (e.g. ASHA stopped it) before its own budget was spent."""

    @property
    def trial_id(self) -> str | None:
        """The trial's id in tables and in the Optuna study: the first Tune trial that ran this configuration."""
        return self.trial_ids[0] if self.trial_ids else None

    @property
    def finished(self) -> bool:
        """Nothing is left to train: the trainer finished (or diverged), or Tune ended the trial."""
        done = bool(self.history) and self.history[-1].get("status") in FINAL_STATUSES
        return done or (self.ended is not None and bool(self.history))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "config": self.config,
            "trial_ids": self.trial_ids,
            "created": self.created,
            "history": self.history,
            "trained": self.trained,
        }


class TrialRecords:
    """The records of every trial configuration run with one `TrialExecution` (one folder or URI)."""

    def __init__(self, execution: TrialExecution):
        if not execution.storage_path:
            raise ValueError("trial records need TrialExecution.storage_path")
        self.execution = execution

    def path(self, key: str) -> str:
        return self.execution.history_path(key)

    def _ended_path(self, key: str) -> str:
        return _join(self.execution.storage_path, "ended", f"{key}.json")

    def read(self, key: str) -> TrialRecord | None:
        data = _read_json(self.path(key))
        if not isinstance(data, dict):  # none yet, or a pre-record history list (nothing to reconcile with)
            return None
        ended = _read_json(self._ended_path(key))
        return TrialRecord(
            key=key,
            config=dict(data.get("config") or {}),
            trial_ids=list(data.get("trial_ids") or []),
            created=float(data.get("created") or 0.0),
            history=list(data.get("history") or []),
            trained=[list(t) for t in data.get("trained") or []],
            ended=(ended or {}).get("status") if isinstance(ended, dict) else None,
        )

    def record_of(self, config: Mapping[str, Any]) -> TrialRecord | None:
        return self.read(trial_key(config))

    def trial_id_of(self, config: Mapping[str, Any], default: str) -> str:
        """The table/Optuna id of the trial that ran `config` (`default`, the Tune trial id, if it has no record)."""
        record = self.record_of(config)
        return (record.trial_id if record is not None else None) or default

    def start(self, config: Mapping[str, Any], trial_id: str) -> TrialRecord:
        """The record of `config`, created if new, with `trial_id` added to the Tune trials that ran it."""
        key = trial_key(config)
        record = self.read(key) or TrialRecord(key=key, config=_plain_dict(config), created=time.time())
        if trial_id not in record.trial_ids:
            record.trial_ids.append(trial_id)
            write_json_atomic(self.path(key), record.to_json())
        return record

    def end(self, config: Mapping[str, Any], status: str) -> None:
        """Mark the trial of `config` as ended by Tune (nothing more will be trained for it)."""
        write_json_atomic(self._ended_path(trial_key(config)), {"status": status, "time": time.time()})

    def keys(self) -> list[str]:
        """Keys of every record in the folder."""
        fs, path = pyarrow.fs.FileSystem.from_uri(_join(self.execution.storage_path, "history"))
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        return sorted(os.path.basename(i.path)[:-5] for i in infos if i.path.endswith(".json"))

    def all(self) -> list[TrialRecord]:
        """Every record, oldest first. Read once per minute at most: after a restore every cell's searcher asks,
        and on an object store each record is a request."""
        cached = self.__dict__.get("_all")
        if cached is None or time.monotonic() - cached[0] > _ALL_MAX_AGE_S:
            records = [r for r in (self.read(k) for k in self.keys()) if r is not None]
            cached = self._all = (time.monotonic(), sorted(records, key=lambda r: (r.created, r.key)))
        return list(cached[1])

    def __getstate__(self) -> dict:  # (pickled with the searchers that use it)
        return {k: v for k, v in self.__dict__.items() if k != "_all"}


def damaged_records(storage_path: str) -> list[str]:
    """'PATH (why)' for every trial record under `storage_path`/trials/<phase>/history that cannot be read."""
    fs, root = pyarrow.fs.FileSystem.from_uri(_join(storage_path, "trials"))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    damaged = []
    for info in infos:
        if info.type != pyarrow.fs.FileType.File or not info.path.endswith(".json"):
            continue
        if info.path.rsplit("/", 2)[-2] != "history":
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                data = json.loads(f.read())
            if not isinstance(data, (dict, list)):
                raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        except (OSError, ValueError) as err:
            damaged.append(f"{info.path} ({type(err).__name__}: {err})")
    return sorted(damaged)


def update_record(uri: str, history: list[dict[str, Any]], trained_evaluation: int | None) -> None:
    """Rewrite a record's history after an evaluation, adding `[trained_evaluation, pid]` to its trainings
    (atomically)."""
    data = _read_json(uri)
    data = data if isinstance(data, dict) else {}
    data["history"] = history
    if trained_evaluation is not None:
        data.setdefault("trained", []).append([int(trained_evaluation), os.getpid()])
    write_json_atomic(uri, data)


def write_json_atomic(uri: str, value: Any) -> None:
    """Write JSON to a local path or URI; locally through a temporary file and a rename, so a kill leaves the old
    file or the new one, never half of one (object stores write a whole object on close anyway)."""
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(value).encode())
    fs.move(tmp, path)


class RecordCloser(tune.Callback):
    """Marks the record of a trial that Tune ended before the trainer did (ASHA, a stop condition), so that a
    restored study does not train it further."""

    def __init__(self, execution: TrialExecution):
        self.execution = execution

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        status = (trial.last_result or {}).get("status")
        if status not in FINAL_STATUSES and trial.last_result:
            TrialRecords(self.execution).end(trial.config, "stopped")


def _plain_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: _plain(v) for k, v in config.items()}, default=str))
