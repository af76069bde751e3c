"""A search's trials read as Optuna reads a study: each trial's objective, the best so far, and what mattered.

All from ``grid.csv`` (one row per trained trial, in trial order; a tpe
point suggested twice is one row), so exhaustive grids, drawn points,
halving and tpe are read alike (``study_figures`` draws them):

* ``trial_table``: per trial its objective -- ``select_by`` at its best epoch,
  the value the train stage selects by and tpe tells its sampler -- and the
  best so far; ``history_table`` is the part ``reports/search_history.csv``
  keeps for ``dvc plots``. Pruned trials (measured at an earlier epoch) and
  failed ones never become the best, as in ``grid_table.rank_runs``.
* ``comparable_trials``: the trials whose objectives can be compared. After
  successive halving only a few finalists ran to the end, so there every
  trial is read at halving's first rung instead, where all were measured
  alike (``history.csv``).
* ``param_importances``: how much of the objective's variation each varying
  axis explains: Optuna's fANOVA on an in-memory study of those trials (no
  storage), each axis with a distribution read from its values.

Why fANOVA: with the 4-30 trials these searches have, its seeded random
forest ranks an axis that drives the objective above one that does not where
PED-ANOVA, which compares the top 10% (one or two trials) with the rest,
often swaps them. It needs scikit-learn (installed with mlflow); without it
PED-ANOVA is used, and ``Importances.method`` names the one used. optuna and
scikit-learn are imported inside ``param_importances`` only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cnnpipe.figures.grid_table import candidates, pruned_flags

MIN_TRIALS = 4  # comparable trials the importance and slices need: fewer say nothing about a 2-D space
MIN_AXES = 2
IMPORTANCE_SEED = 0  # fANOVA's random forest: the same trials give the same numbers
HISTORY_COLUMNS = ("trial", "run_name", "status", "objective", "best_so_far")
BEST_EPOCH = "at each trial's best epoch"


def minimizes(select_by: str) -> bool:
    """``val_loss`` is minimized, ``val_top1`` maximized (as the train stage selects)."""
    return select_by != "val_top1"


def search_axes(grid: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The training keys (``keys``, in their order) whose value differs between the trials."""
    return [key for key in keys if key in grid and grid[key].nunique(dropna=False) > 1]


def trial_table(grid: pd.DataFrame, select_by: str, keys: Sequence[str]) -> pd.DataFrame:
    """One row per trial: trial (1-based), run_id, run_name, status, candidate, objective, best_so_far, each axis.

    ``status`` is grid.csv's, ``pruned`` for a trial successive halving stopped;
    ``candidate`` marks the trials selection could pick (finished or diverged
    with a finite objective, not pruned): only they count for the best so far
    (empty until the first one) and for the importances.
    """
    table = grid.reset_index(drop=True)
    objective = (pd.to_numeric(table[select_by], errors="coerce") if select_by in table
                 else pd.Series(np.nan, index=table.index)).astype(float)
    candidate = candidates(table, select_by)
    status = table["status"].astype(str) if "status" in table else pd.Series("finished", index=table.index)
    status = status.where(~pruned_flags(table), "pruned")
    axes = search_axes(table, keys)
    out = pd.DataFrame({"trial": np.arange(1, len(table) + 1), "run_id": table.get("run_id", ""),
                        "run_name": table.get("run_name", ""), "status": status, "candidate": candidate,
                        "objective": objective, "best_so_far": best_so_far(objective, candidate, select_by)})
    return pd.concat([out, table[axes]], axis=1)


def best_so_far(objective: pd.Series, candidate: np.ndarray, select_by: str) -> np.ndarray:
    """The best candidate objective up to each trial (NaN before the first candidate)."""
    sign = 1.0 if minimizes(select_by) else -1.0
    signed = np.where(candidate, sign * objective.to_numpy(dtype=float), np.inf)
    best = np.minimum.accumulate(signed) if len(signed) else signed
    return np.where(np.isfinite(best), sign * best, np.nan)


def comparable_trials(trials: pd.DataFrame, history: pd.DataFrame | None, select_by: str) -> tuple[pd.DataFrame, str]:
    """The trials whose objectives compare, for the importances and slices, and what that objective is (a phrase).

    Without pruned trials: ``trials`` as they are, each at its best epoch.
    After successive halving the finalists alone are few (27 trials, eta 3:
    1 to 3), so every trial is read at halving's first rung instead -- the
    best ``select_by`` up to the earliest epoch a trial was pruned at, from
    ``history.csv`` -- where all had trained alike and halving ranked them.
    """
    pruned = (trials["status"] == "pruned").to_numpy()
    if not pruned.any() or history is None or select_by not in history or history.empty:
        return trials, BEST_EPOCH
    last = history.groupby("run_id")["epoch"].max().reindex(trials.loc[pruned, "run_id"])
    if last.isna().all():
        return trials, BEST_EPOCH
    rung = int(last.min())
    early = history[history["epoch"] <= rung]
    values = pd.to_numeric(early[select_by], errors="coerce")
    values = values.where(np.isfinite(values)).groupby(early["run_id"])
    best = values.min() if minimizes(select_by) else values.max()
    out = trials.copy()
    out["objective"] = out["run_id"].map(best).astype(float)
    out["candidate"] = np.isfinite(out["objective"].to_numpy())
    out["best_so_far"] = best_so_far(out["objective"], out["candidate"].to_numpy(), select_by)
    return out, f"best up to epoch {rung}, halving's first rung, where every trial was measured"


def history_table(trials: pd.DataFrame) -> pd.DataFrame:
    """``reports/search_history.csv``: trial, run_name, status, objective, best_so_far.

    A missing value (a failed trial, the best before the first finished one)
    is written ``NaN``, not left empty: ``dvc plots`` hands the cells to Vega
    as text, and an empty one counts as 0 there, a ``NaN`` as no point.
    """
    table = trials[list(HISTORY_COLUMNS)].copy()
    for column in ("objective", "best_so_far"):
        table[column] = table[column].astype(object).where(table[column].notna(), "NaN")
    return table


def table_axes(trials: pd.DataFrame) -> list[str]:
    """The axis columns ``trial_table`` appended."""
    return list(trials.columns[list(trials.columns).index("best_so_far") + 1:])


def is_log_axis(values: pd.Series) -> bool:
    """A numeric axis whose values are positive and span more than a decade is read on a log scale."""
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return False
    finite = values[np.isfinite(values.astype(float))]
    return bool(len(finite)) and float(finite.min()) > 0 and float(finite.max()) > 10 * float(finite.min())


def is_categorical_axis(values: pd.Series) -> bool:
    """Strings, bools and anything not numeric are choices; numbers are ranges."""
    return pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values) or bool(values.isna().any())


@dataclass(frozen=True)
class Importances:
    """Each varying axis's share of the objective's variation (sums to 1), most important first."""

    method: str  # e.g. "fANOVA (seed 0)"
    trials: int  # the trials they were computed from
    values: tuple[tuple[str, float], ...]
    log_axes: tuple[str, ...]  # the axes read on a log scale
    basis: str = BEST_EPOCH  # what the objective is (``comparable_trials``)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.values]


def insight_skip(trials: pd.DataFrame) -> str | None:
    """Why the importance and slice figures cannot be drawn (a one-line reason), or None when they can."""
    done = trials[trials["candidate"]]
    varying = [axis for axis in table_axes(trials) if done[axis].nunique(dropna=False) > 1]
    if len(varying) < MIN_AXES:
        which = f"1 search axis varies ({varying[0]})" if varying else "no search axis varies"
        return f"{which} across the finished trials; they need {MIN_AXES}"
    if len(done) < MIN_TRIALS:
        return f"{len(done)} finished trial(s); they need {MIN_TRIALS}"
    if done["objective"].nunique() < 2:
        return "every finished trial has the same objective"
    return None


def axis_distribution(values: pd.Series) -> Any:
    """The Optuna distribution a varying axis's values are read from (see ``is_log_axis``)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if is_categorical_axis(values):
        return CategoricalDistribution(choices(values))
    log = is_log_axis(values)
    if pd.api.types.is_integer_dtype(values):
        return IntDistribution(int(values.min()), int(values.max()), log=log)
    return FloatDistribution(float(values.min()), float(values.max()), log=log)


def choices(values: pd.Series) -> list[Any]:
    """A categorical axis's distinct values, as plain Python values, in the order first tried."""
    return list(dict.fromkeys(plain(v) for v in values.tolist()))


def plain(value: Any) -> Any:
    """A numpy scalar or NaN as the plain Python value a categorical choice must be."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def param_importances(trials: pd.DataFrame, select_by: str, basis: str = BEST_EPOCH) -> Importances:
    """Optuna's importance of each varying axis over the candidate trials (call ``insight_skip`` first).

    The trials are added to a fresh in-memory study (no storage), each axis
    with a distribution read from its values: categorical for strings and
    bools, integer or float for numbers, log-scaled when they span more than
    a decade.
    """
    import optuna

    done = trials[trials["candidate"]].reset_index(drop=True)
    axes = [axis for axis in table_axes(trials) if done[axis].nunique(dropna=False) > 1]
    distributions = {axis: axis_distribution(done[axis]) for axis in axes}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if minimizes(select_by) else "maximize")
    for _, row in done.iterrows():
        params = {axis: _param(row[axis], distributions[axis]) for axis in axes}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row["objective"])))
    try:
        import sklearn  # noqa: F401 - fANOVA's random forest

        evaluator, method = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED), \
            f"fANOVA (seed {IMPORTANCE_SEED})"
    except ImportError:
        evaluator, method = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    ranked = sorted(((name, float(found.get(name, 0.0))) for name in axes), key=lambda item: -item[1])
    log_axes = tuple(axis for axis in axes if getattr(distributions[axis], "log", False))
    return Importances(method, len(done), tuple(ranked), log_axes, basis)


def _param(value: Any, distribution: Any) -> Any:
    """``value`` as ``distribution`` takes it (an int for an integer axis, a plain choice for a categorical one)."""
    name = distribution.__class__.__name__
    if name == "IntDistribution":
        return int(value)
    if name == "FloatDistribution":
        return float(value)
    return plain(value)
