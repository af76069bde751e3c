"""The train stage's report files (grid.csv, grid.json, history.csv, curves.csv, pareto_front.csv, train.json).

Built from the grid's records with pandas.

Column lists are module constants: they are the contract with the evaluate
and plots stages and with ``dvc plots`` (``reports/curves.csv``), and the
tests check them by name. Every file is written atomically; JSON never holds
``NaN`` (it becomes ``null``), CSV leaves it empty.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.util.files import atomic_write_json
from cnnpipe.util.tables import write_csv
from cnnpipe.params.values import TRAINING_KEYS

if TYPE_CHECKING:
    import pandas as pd

    from cnnpipe.search.selection import RunRecord

METRIC_KEYS = ("val_loss", "val_top1", "val_top5")
EPOCH_COLUMNS = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds", "images_per_s")
COST_COLUMNS = ("params", "macs", "latency_ms")  # counted (models.cost), and measured for front trials only
HISTORY_COLUMNS = ("run_id", "run_name", *EPOCH_COLUMNS)
GRID_COLUMNS = (
    "run_id", "run_name", *TRAINING_KEYS, "status", "stop_reason", "best_epoch", "epochs_run",
    *METRIC_KEYS, "seconds", "images_per_s", "mlflow_run_id", "cached", "resumed_at", "rung", "pruned",
    *COST_COLUMNS, "pareto_front",
)
# The Pareto front of select_by [METRIC, COST], cheapest first (a header only when select_by names no cost).
PARETO_COLUMNS = ("run_id", "run_name", *METRIC_KEYS, *COST_COLUMNS, "selected", "mlflow_run_id")
TRAIN_JSON_KEYS = (
    "select_by", "run_id", "run_name", "best_epoch", *METRIC_KEYS, "epochs_run", "seconds",
    "runs_total", "runs_failed", "mlflow_parent_run_id", "mlflow_run_id", "mlflow_experiment_id",
    "select_cost", "max_cost", *COST_COLUMNS,
)
REPORT_FILES = ("grid.csv", "grid.json", "history.csv", "curves.csv", "pareto_front.csv", "train.json")


def clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf -> None, numpy scalars -> Python."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def history_frame(records: Sequence["RunRecord"]) -> "pd.DataFrame":
    """One row per run per completed epoch, in grid order."""
    import pandas as pd

    rows = [
        {"run_id": rec.cfg.run_id, "run_name": rec.cfg.name, **{key: getattr(epoch, key) for key in EPOCH_COLUMNS}}
        for rec in records
        for epoch in rec.result.history
    ]
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def grid_row(rec: "RunRecord") -> dict[str, Any]:
    result = rec.result
    best = result.best
    return {
        "run_id": rec.cfg.run_id,
        "run_name": rec.cfg.name,
        **rec.cfg.flat(),
        "status": result.status,
        "stop_reason": result.stop_reason,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        **{key: (getattr(best, key) if best is not None else None) for key in METRIC_KEYS},
        "seconds": round(float(result.seconds), 3),
        "images_per_s": round(float(result.images_per_s), 1),
        "mlflow_run_id": rec.mlflow_run_id,
        "cached": bool(rec.cached),  # reused from the run cache, not trained this time
        "resumed_at": rec.resumed_at,  # continued from its saved run state after this epoch
        "rung": rec.rung,  # successive halving: the last rung it trained in (0: exhaustive grid)
        "pruned": bool(rec.pruned),  # successive halving: stopped at epochs_run, not a candidate
        **cost_fields(rec),
        "pareto_front": bool(rec.on_front),  # select_by [METRIC, COST]: on the Pareto front
    }


def cost_fields(rec: "RunRecord") -> dict[str, Any]:
    """params and macs (counted when select_by names a cost) and latency_ms (measured for front trials)."""
    cost = rec.cost
    return {"params": cost.params if cost else None, "macs": cost.macs if cost else None,
            "latency_ms": round(rec.latency_ms, 4) if rec.latency_ms is not None else None}


def pareto_frame(records: Sequence["RunRecord"], best: "RunRecord", cost: str | None) -> "pd.DataFrame":
    """The front trials, cheapest by ``cost`` first, the selected one marked (no rows when ``cost`` is None)."""
    import pandas as pd

    front = sorted((rec for rec in records if rec.on_front and rec.cost and cost),
                   key=lambda rec: (rec.cost.get(cost), rec.index))  # type: ignore[union-attr,arg-type]
    rows = [{"run_id": rec.cfg.run_id, "run_name": rec.cfg.name,
             **{key: getattr(rec.result.best, key) for key in METRIC_KEYS}, **cost_fields(rec),
             "selected": rec is best, "mlflow_run_id": rec.mlflow_run_id} for rec in front]
    return pd.DataFrame(rows, columns=list(PARETO_COLUMNS))


def grid_frame(records: Sequence["RunRecord"]) -> "pd.DataFrame":
    import pandas as pd

    frame = pd.DataFrame([grid_row(rec) for rec in records], columns=list(GRID_COLUMNS))
    return frame.astype({"best_epoch": "Int64", "epochs_run": "Int64", "resumed_at": "Int64", "params": "Int64",
                         "macs": "Int64"})


def train_summary(best: "RunRecord", records: Sequence["RunRecord"], *, select_by: str,
                  mlflow_parent_run_id: str | None, mlflow_experiment_id: str | None, select_cost: str | None = None,
                  max_cost: float | None = None) -> dict[str, Any]:
    """``reports/train.json``: the selected run's validation metrics and every id to find it again."""
    result = best.result
    summary = {
        "select_by": select_by,
        "run_id": best.cfg.run_id,
        "run_name": best.cfg.name,
        "best_epoch": result.best_epoch,
        **{key: getattr(result.best, key) for key in METRIC_KEYS},
        "epochs_run": result.epochs_run,
        "seconds": round(float(result.seconds), 3),
        "runs_total": len(records),
        "runs_failed": sum(1 for rec in records if not rec.ok),
        "mlflow_parent_run_id": mlflow_parent_run_id,
        "mlflow_run_id": best.mlflow_run_id,
        "mlflow_experiment_id": mlflow_experiment_id,
        "select_cost": select_cost,
        "max_cost": max_cost,
        **cost_fields(best),
    }
    return {key: clean(summary[key]) for key in TRAIN_JSON_KEYS}


def frame_records(frame: "pd.DataFrame") -> list[dict[str, Any]]:
    """Rows as JSON-safe dicts (NaN and pandas NA -> None)."""
    import pandas as pd

    out = []
    for row in frame.to_dict(orient="records"):
        out.append({key: (None if (value is pd.NA or value is None) else clean(value)) for key, value in row.items()})
    return out


def write_reports(reports_dir: str | os.PathLike[str], records: Sequence["RunRecord"], best: "RunRecord", *,
                  select_by: str, mlflow_parent_run_id: str | None = None,
                  mlflow_experiment_id: str | None = None, select_cost: str | None = None,
                  max_cost: float | None = None) -> dict[str, Path]:
    """Write grid.csv, grid.json, history.csv, curves.csv, pareto_front.csv and train.json; return their paths."""
    out = Path(reports_dir)
    grid = grid_frame(records)
    history = history_frame(records)
    curves = history[history["run_id"] == best.cfg.run_id].reset_index(drop=True)
    paths = {name: out / name for name in REPORT_FILES}
    write_csv(paths["grid.csv"], grid)
    atomic_write_json(paths["grid.json"], frame_records(grid))
    write_csv(paths["history.csv"], history)
    write_csv(paths["curves.csv"], curves)
    write_csv(paths["pareto_front.csv"], pareto_frame(records, best, select_cost))
    summary = train_summary(best, records, select_by=select_by, mlflow_parent_run_id=mlflow_parent_run_id,
                            mlflow_experiment_id=mlflow_experiment_id, select_cost=select_cost, max_cost=max_cost)
    atomic_write_json(paths["train.json"], summary)
    return paths


def history_csv_text(rec: "RunRecord") -> str:
    """One run's history as CSV text (logged to its MLflow child run)."""
    return history_frame([rec]).to_csv(index=False)


def summary_table(records: Sequence["RunRecord"], best: "RunRecord", select_by: str, select_cost: str | None = None,
                  max_cost: float | None = None) -> str:
    """The fixed-width table the stage prints at the end (selected run marked ``*``).

    One column per search axis holds that run's value, never cut: a truncated
    run name (``lr=0.03,batch_size=16,weight_deca...``) made rows of a large
    grid look identical. Without axes (one run) the model names the row.
    """
    from cnnpipe.params.messages import _fmt

    axes = list(dict.fromkeys(axis for rec in records for axis in rec.cfg.axes)) or ["model"]
    cells = [[_fmt(getattr(rec.cfg.values, axis)) for axis in axes] for rec in records]
    widths = [max([len(axis), *(len(row[i]) for row in cells)]) for i, axis in enumerate(axes)]
    head = " ".join(f"{axis:<{width}}" for axis, width in zip(axes, widths))
    costs = any(rec.cost is not None for rec in records)  # select_by [METRIC, COST]: the costs, the front marked
    extra = f" {'params':>10} {'MACs':>13} front" if costs else ""
    lines = [f"{'':1} {head} {'status':<9} {'epoch':>5} {'val_loss':>9} {'val_top1':>9} {'seconds':>8}{extra}"]
    for rec, row in zip(records, cells):
        r = rec.result
        mark = "*" if rec is best else ""
        values = " ".join(f"{value:<{width}}" for value, width in zip(row, widths))
        loss = f"{r.best.val_loss:.4f}" if r.best else "-"
        top1 = f"{r.best.val_top1:.4f}" if r.best else "-"
        epoch = str(r.best_epoch) if r.best_epoch else "-"
        cost = f" {rec.cost.params:>10,} {rec.cost.macs:>13,} {'yes' if rec.on_front else ''}" if rec.cost else ""
        lines.append(f"{mark:1} {values} {rec.status:<9} {epoch:>5} {loss:>9} {top1:>9} {r.seconds:>8.1f}{cost}")
    rule = select_by
    if select_cost:
        rule = f"{select_by} on its Pareto front with {select_cost}" + (f" within {max_cost:g}" if max_cost else "")
    lines.append(f"* selected by {rule}: {best.cfg.name} (run {best.cfg.run_id})")
    return "\n".join(lines)
