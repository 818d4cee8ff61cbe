"""The tidy results table: a row per trial per reported evaluation, with provenance."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from gradalign.config import (
    TrainConfig,
)
from gradalign.provenance import provenance

from ._common import _TRAIN_CONFIG_FIELDS, COUNTER, METRICS, final_status, penalise
from .execution import TrialExecution
from .records import TrialRecords


# ---------------------------------------------------------------------------------------------------------------
# Results table and provenance
# ---------------------------------------------------------------------------------------------------------------
def results_table(
    results: tune.ResultGrid,
    execution: TrialExecution | None = None,
    prov: Mapping[str, Any] | None = None,
    config_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """One tidy frame: a row per trial per reported evaluation.

    Columns: trial_id, the TrainConfig fields, the Trainer metrics (`METRICS`), `trial_status` (how the trial
    ended: completed / diverged / stopped / error), workers and cpus_per_worker, the entries of each trial's config
    named in `config_columns` (e.g. a study's `cell`), and provenance columns (git commit, library versions,
    hardware). A trial that failed before its first evaluation gets one row with evaluation 0.

    Rows are the results Tune recorded; a restored or retried trial may report an evaluation twice (the last report
    wins). Given `execution`, each trial is named after its record (`records.TrialRecords`: the first Tune trial
    that ran its configuration, so a configuration re-run after a restore keeps its id), and the evaluations Tune
    did not record (it writes its records to storage only every ~10 s, and a configuration answered from its record
    reports only its last evaluation) are filled in from the record's history, never beyond the last evaluation
    Tune saw (so the table ends where Tune's and Optuna's view of the trial ends).
    """
    records = TrialRecords(execution) if execution is not None and execution.storage_path else None
    frames: dict[str, pd.DataFrame] = {}
    for result in results:
        config = TrainConfig.from_dict({k: v for k, v in result.config.items() if k in _TRAIN_CONFIG_FIELDS})
        record = records.record_of(result.config) if records is not None else None
        trial_id = (record.trial_id if record is not None else None) or _trial_id(result)
        rows = _reported(result.metrics_dataframe)
        if record is not None and not rows.empty:
            rows = _fill_holes(rows, record.history)
        if rows.empty:
            rows = pd.DataFrame([{COUNTER: 0, "status": "error" if result.error else "running"}])
        if trial_id in frames:  # the same configuration twice: one trial, its last report of each evaluation
            rows = _merge(frames[trial_id], rows)
        last = rows.iloc[-1].to_dict()
        rows.insert(0, "trial_id", trial_id)
        for name, value in config.to_dict().items():
            rows[name] = value
        for name in config_columns:
            rows[name] = result.config.get(name)
        rows["trial_status"] = final_status(last, error=result.error is not None)
        frames[trial_id] = rows
    table = pd.concat(frames.values(), ignore_index=True) if frames else pd.DataFrame(columns=["trial_id", *METRICS])
    if execution is not None:
        table["workers"] = execution.workers
        table["cpus_per_worker"] = execution.cpus_per_worker
    for name, value in (provenance() if prov is None else prov).items():
        table[name] = value
    return table.sort_values(["trial_id", COUNTER], ignore_index=True)


def _merge(before: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    before = before[[c for c in before.columns if c in METRICS]]
    merged = pd.concat([before, rows], ignore_index=True)
    return merged.drop_duplicates(COUNTER, keep="last").sort_values(COUNTER, ignore_index=True)


def _trial_id(result: tune.Result) -> str:
    frame = result.metrics_dataframe
    if frame is not None and "trial_id" in frame and len(frame):
        return str(frame["trial_id"].iloc[-1])
    match = re.search(r"_([0-9a-f]{5,})_\d+_", Path(result.path).name)  # <trainable>_<id>_<n>_<params>
    return str((result.metrics or {}).get("trial_id") or (match.group(1) if match else Path(result.path).name))


def _reported(frame: pd.DataFrame | None) -> pd.DataFrame:
    if frame is None or frame.empty or COUNTER not in frame:
        return pd.DataFrame(columns=list(METRICS))
    rows = frame.dropna(subset=[COUNTER])[[c for c in METRICS if c in frame]]
    rows = rows.assign(**{COUNTER: rows[COUNTER].astype(int)})
    return rows.drop_duplicates(COUNTER, keep="last").sort_values(COUNTER, ignore_index=True)


def _fill_holes(rows: pd.DataFrame, saved: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    seen, last = set(rows[COUNTER]), int(rows[COUNTER].max())
    missing = [penalise(m) for m in saved if int(m[COUNTER]) <= last and int(m[COUNTER]) not in seen]
    if not missing:
        return rows
    extra = pd.DataFrame(missing)[[c for c in METRICS if c in missing[0]]]
    return pd.concat([rows, extra], ignore_index=True).sort_values(COUNTER, ignore_index=True)


def write_results_table(table: pd.DataFrame, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `results.parquet` and `results.csv` into `out_dir`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parquet, csv = out / "results.parquet", out / "results.csv"
    table.to_parquet(parquet, index=False)
    table.to_csv(csv, index=False)
    return parquet, csv
