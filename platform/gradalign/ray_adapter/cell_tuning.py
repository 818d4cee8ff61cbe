"""Per-cell tuning on the engine: search, ranges that adapt, confirmation, and a choice that survives more seeds.

The logic is `gradalign.tuning`'s (pure, and replayed against dense grids in `benchmarks/tuning_strategies.py`);
this module runs it as Tune experiments through `engine.Engine`, every round of every cell saved as it ends:

1. **Search** (`cells/<cell>/tune.parquet`): the protocol's trials per cell, sampled by `tuning.make_sampler`
   (a Sobol design, then a Gaussian process).
2. **Extensions** (`tune-r2.parquet`, ...): the cells whose best configuration sits at an edge of its range search
   `recipe.extension_trials` more trials over a range moved out by `recipe.extend_by` (at most
   `recipe.max_extensions` times per side), their searcher warm-started with every trial so far.
3. **Confirmation** (`confirm.parquet`): the `recipe.confirm_top` best configurations of each cell re-run on
   `recipe.confirm_seeds` seeds that no search trial used.
4. **Choice**: `tuning.choose`, the best mean among the candidates whose seeds did not collapse.

Every decision reads only the saved tables, so a resumed study takes the same decisions and trains nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from gradalign.analysis import COUNTER
from gradalign.ranges import Range
from gradalign.tuning import at_edge, choose, confirmation_candidates, extend_ranges

from ._common import GROUP_SEEDS
from .plan import Cell

SEARCH_RANGE = "search_range"
"""Column of every tuning row: the ranges its round searched, as JSON ({param: [low, high]})."""
LIMITS = {"momentum": (0.0, 0.99), "server_lr": (0.0, 100.0)}
"""Bounds a range extension never passes."""


@dataclass(frozen=True)
class CellChoice:
    """What tuning a cell decided: the configuration its seed runs use, and why."""

    config: dict[str, Any]
    """TrainConfig fields (the cell's fixed ones and the chosen parameters), without the seed."""
    reason: str
    candidates: pd.DataFrame


def tune_cells(engine) -> tuple[dict[str, pd.DataFrame], dict[str, CellChoice]]:
    """Run the tuning phases of every cell of `engine.plan`; returns ({cell key: every tuning and confirmation row},
    {cell key: its choice})."""
    plan = engine.plan
    protocol, recipe = plan.protocol, plan.protocol.recipe
    spaces = {c.key: c.space for c in plan.cells}
    first = engine.search("tune", round_no=1, spaces=spaces)
    rounds = {c.key: [first[c.key]] for c in plan.cells}
    for round_no in range(2, 2 + 2 * len(_searched(plan.cells[0])) * recipe.max_extensions):
        wider = {}
        for cell in plan.cells:
            current = _ranges(spaces[cell.key])
            edges = at_edge(runs_of(rounds[cell.key], protocol), current, "score", recipe.edge)
            moved = extend_ranges(current, edges, _ranges(cell.space), recipe.extend_by, recipe.max_extensions, LIMITS)
            if moved != current:
                wider[cell.key] = dataclasses.replace(spaces[cell.key], **moved)
        if not wider:
            break
        engine.log(
            "  ranges extended (best at an edge): "
            + "; ".join(f"{k}: {_describe(_ranges(s))}" for k, s in sorted(wider.items()))
        )
        spaces.update(wider)
        warm = {key: pd.concat(rounds[key], ignore_index=True) for key in wider}
        new = engine.search("tune", round_no=round_no, spaces=wider, trials=recipe.extension_trials, warm=warm)
        for key, rows in new.items():
            rounds[key].append(rows)
    tuned = {key: pd.concat(parts, ignore_index=True) for key, parts in rounds.items()}
    engine.sync_optuna(tuned, spaces)
    confirm = {}
    if recipe.confirm_top and recipe.confirm_seeds:
        runs = {}
        for cell in plan.cells:
            params = list(cell.space.param_names)
            top = confirmation_candidates(runs_of([tuned[cell.key]], protocol), params, recipe.confirm_top, "score")
            runs[cell.key] = {
                f"c{i + 1}:seed={s}": {**_fixed(cell), **_plain(candidate[params]), "seed": s}
                for i, candidate in top.iterrows()
                for s in protocol.confirm_seeds
            }
        confirm = engine.run_configs("confirm", runs)
    choices = {}
    for cell in plan.cells:
        rows = pd.concat([tuned[cell.key], confirm.get(cell.key, tuned[cell.key].iloc[0:0])], ignore_index=True)
        params = list(cell.space.param_names)
        gap = recipe.collapse_gap if recipe.choice == "stable" else math.inf
        chosen, candidates = choose(runs_of([rows], protocol), params, "score", gap)
        config = {**_fixed(cell), **_plain(chosen[params])}
        config.pop("seed", None)
        choices[cell.key] = CellChoice(config, str(chosen["reason"]), candidates)
        tuned[cell.key] = rows
    return tuned, choices


def runs_of(parts: list[pd.DataFrame], protocol) -> pd.DataFrame:
    """One row per training run that ran its whole budget (or diverged; not one ASHA stopped), for
    `gradalign.tuning`: the searched parameters, `seed`, `status`, and `score`
    (higher is better: the objective, or 1 / (1 + loss) for a minimised loss, so that a diverged run's 0 is the
    worst)."""
    rows = pd.concat(parts, ignore_index=True)
    if "trial_status" in rows:  # a trial ASHA stopped never saw the whole budget: its score is not comparable
        rows = rows[rows["trial_status"] != "stopped"]
    if rows.empty:
        return rows.assign(score=[])
    last = rows.sort_values(COUNTER, kind="stable").groupby(["phase", "trial_id"], sort=False).tail(1)
    value = pd.to_numeric(last[protocol.objective], errors="coerce")
    score = value if protocol.mode == "max" else 1.0 / (1.0 + value.clip(lower=0.0))
    return last.assign(score=score.astype(float)).reset_index(drop=True)


def searched_ranges(rows: pd.DataFrame) -> dict[str, dict[str, tuple[float, float]]]:
    """{cell: {param: (low, high)}}: the widest ranges each cell searched (after its extensions), from the tuning
    rows' `search_range` column."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    if SEARCH_RANGE not in rows:
        return out
    for cell, texts in rows.dropna(subset=[SEARCH_RANGE]).groupby("cell")[SEARCH_RANGE]:
        merged: dict[str, tuple[float, float]] = {}
        for text in set(texts):
            for name, (low, high) in json.loads(text).items():
                old = merged.get(name, (low, high))
                merged[name] = (min(old[0], low), max(old[1], high))
        out[cell] = merged
    return out


def range_json(space) -> str:
    return json.dumps({name: [r.low, r.high] for name, r in _ranges(space).items()}, sort_keys=True)


def _ranges(space) -> dict[str, Range]:
    """The float ranges a space searches (what may be extended)."""
    return {name: getattr(space, name) for name in _searched_names(space) if getattr(space, name) is not None}


def _searched_names(space) -> list[str]:
    return [n for n in ("lr", "beta", "momentum", "weight_decay", "mu", "server_lr") if n in space.param_names]


def _searched(cell: Cell) -> list[str]:
    return _searched_names(cell.space)


def _fixed(cell: Cell) -> dict[str, Any]:
    return {k: v for k, v in cell.space.fixed.items() if k != GROUP_SEEDS}


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in dict(values).items():
        item = getattr(value, "item", None)
        value = item() if callable(item) else value
        out[key] = int(value) if key == "batch_size" else value
    return out


def _describe(ranges: Mapping[str, Range]) -> str:
    return ", ".join(f"{name} [{r.low:.3g}, {r.high:.3g}]" for name, r in ranges.items())
