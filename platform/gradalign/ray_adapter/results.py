"""The tidy results table: a row per trial per reported evaluation, with provenance."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from ray import tune

from gradalign.config import (
    TrainConfig,
)
from gradalign.provenance import provenance

from ._common import _TRAIN_CONFIG_FIELDS, COUNTER, METRICS, final_status, penalise
from .execution import TrialExecution


# ---------------------------------------------------------------------------------------------------------------
# Results table and provenance
# ---------------------------------------------------------------------------------------------------------------
def results_table(
    results: tune.ResultGrid,
    execution: TrialExecution | None = None,
    prov: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """One tidy frame: a row per trial per reported evaluation.

    Columns: trial_id, the TrainConfig fields, the Trainer metrics (`METRICS`), `trial_status` (how the trial
    ended: completed / diverged / stopped / error), workers and cpus_per_worker, and provenance columns (git commit,
    library versions, hardware). A trial that failed before its first evaluation gets one row with evaluation 0.

    Rows are the results Tune recorded; a restored or retried trial may report an evaluation twice (the last report
    wins). Tune writes its records to storage only every ~10 s, so after a hard kill of the driver some evaluations
    before the one a trial resumed from can be missing there: given `execution`, those are filled in from the
    history the trial saved with its checkpoint (never beyond the last evaluation Tune saw, so the table ends where
    Tune's and Optuna's view of the trial ends).
    """
    frames = []
    for result in results:
        config = TrainConfig.from_dict({k: v for k, v in result.config.items() if k in _TRAIN_CONFIG_FIELDS})
        trial_id = _trial_id(result)
        rows = _reported(result.metrics_dataframe)
        if execution is not None and not rows.empty:
            rows = _fill_holes(rows, execution.saved_history(trial_id))
        if rows.empty:
            rows = pd.DataFrame([{COUNTER: 0, "status": "error" if result.error else "running"}])
        last = rows.iloc[-1].to_dict()
        rows.insert(0, "trial_id", trial_id)
        for name, value in config.to_dict().items():
            rows[name] = value
        rows["trial_status"] = final_status(last, error=result.error is not None)
        frames.append(rows)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial_id", *METRICS])
    if execution is not None:
        table["workers"] = execution.workers
        table["cpus_per_worker"] = execution.cpus_per_worker
    for name, value in (provenance() if prov is None else prov).items():
        table[name] = value
    return table.sort_values(["trial_id", COUNTER], ignore_index=True)


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
