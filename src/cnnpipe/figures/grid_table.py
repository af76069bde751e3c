"""Reading ``grid.csv`` as the train stage's selection does: which run ranks first, which trials were pruned.

Shared by the README's run table and the figures that rank or label runs, so
the report never orders the runs differently from ``search.selection``
(``tests/test_plots.py`` checks the two agree on real records).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def rank_runs(grid: pd.DataFrame, select_by: str) -> pd.DataFrame:
    """``grid.csv`` rows best first, in the train stage's selection order for ``select_by``.

    Candidates come first, as ``select_best`` sees them (finished, or diverged
    after a finite best epoch; not pruned by successive halving):
    ``val_loss`` lowest / ``val_top1`` highest, ties to the other validation
    metric, then to the earlier grid point, so the selected run is the first
    row. The rest (failed, never-finite, pruned) follow in grid order.
    """
    table = grid.reset_index(drop=True)
    if select_by not in table:
        return table
    other = "val_top1" if select_by == "val_loss" else "val_loss"
    sign = 1.0 if select_by == "val_loss" else -1.0
    value = pd.to_numeric(table[select_by], errors="coerce").to_numpy(dtype=float)
    second = (pd.to_numeric(table[other], errors="coerce").to_numpy(dtype=float) if other in table
              else np.zeros(len(table)))
    candidate = candidates(table, select_by)
    keys = pd.DataFrame({
        "rest": ~candidate,
        "value": np.where(candidate, sign * value, 0.0),
        "second": np.where(candidate, np.nan_to_num(-sign * second, nan=np.inf), 0.0),
        "index": np.arange(len(table)),
    })
    return table.loc[keys.sort_values(["rest", "value", "second", "index"], kind="stable").index]


def candidates(grid: pd.DataFrame, select_by: str) -> np.ndarray:
    """Per row: could selection pick it? Finished or diverged with a finite ``select_by``, not pruned."""
    value = (pd.to_numeric(grid[select_by], errors="coerce").to_numpy(dtype=float) if select_by in grid
             else np.full(len(grid), np.nan))
    usable = (grid["status"].astype(str).isin(("finished", "diverged")).to_numpy() if "status" in grid
              else np.ones(len(grid), bool))
    return usable & ~pruned_flags(grid) & np.isfinite(value)


def pruned_flags(grid: pd.DataFrame) -> np.ndarray:
    """Per row: did successive halving stop the trial early (``pruned``: bools, or text read back from CSV)?"""
    if "pruned" not in grid:
        return np.zeros(len(grid), bool)
    return grid["pruned"].astype(str).str.lower().isin(("true", "1", "1.0")).to_numpy()


def pruned_at(grid: pd.DataFrame) -> dict[str, int]:
    """Run id -> the epoch successive halving stopped it at (only pruned trials)."""
    if "pruned" not in grid or "epochs_run" not in grid:
        return {}
    flags = pruned_flags(grid)
    return {r: int(e) for r, e, f in zip(grid["run_id"], grid["epochs_run"], flags) if f and pd.notna(e)}
