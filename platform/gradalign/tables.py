"""A study folder's tables: Parquet (what the study reads back) with a CSV copy beside it (what people open).

Layout: `<out>/cells/<cell>/<phase>.parquet` for each finished phase of each cell (written when the phase ends,
before the next one starts), `<out>/history.parquet` (every row of every phase) and `<out>/cells.parquet` (a row per
cell). Pure pandas: no Ray.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["DamagedTable", "NothingToReport", "save_table", "read_table", "phase_table_path", "load_history"]


class DamagedTable(RuntimeError):
    """A table that cannot be read; the message names the file and what to do."""


class NothingToReport(RuntimeError):
    """A study folder without a finished phase of any cell."""


def save_table(table: pd.DataFrame, stem: Path) -> None:
    """Parquet and CSV side by side; the Parquet file is replaced atomically (it is what resume reads)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(stem.with_suffix(".parquet"))
    table.to_csv(stem.with_suffix(".csv"), index=False)


def read_table(path: Path) -> pd.DataFrame:
    """The Parquet table at `path`; `DamagedTable` naming the file when it is truncated or not Parquet at all."""
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 -- truncated or not Parquet at all: pyarrow raises several kinds
        raise DamagedTable(f"{path} is damaged ({type(err).__name__}: {_last_line(err)})") from None


def phase_table_path(out_dir: Path, cell: str, phase: str) -> Path:
    return out_dir / "cells" / cell / f"{phase}.parquet"


def load_history(out_dir: Path) -> pd.DataFrame:
    """Every finished phase of every cell under `out_dir` (a partial study gives what it has).

    Raises `DamagedTable` naming the file when a table is damaged, `NothingToReport` when nothing is finished yet.
    """
    parts = []
    for path in sorted((out_dir / "cells").glob("*/*.parquet")):
        try:
            parts.append(read_table(path))
        except DamagedTable as err:
            raise DamagedTable(
                f"{err}: re-run the study's command without --report-only to rebuild it from the trial records "
                "(nothing is trained again)"
            ) from None
    if not parts:
        raise NothingToReport(f"no finished cell under {out_dir}/cells: nothing to report yet")
    return pd.concat(parts, ignore_index=True)


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
