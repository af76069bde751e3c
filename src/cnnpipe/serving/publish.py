"""Publishing the selected run: ``models/best``, the train reports, the registered model, the parent's summary.

The order is the guarantee: the checkpoint lands first (assembled in a temp
folder and swapped in whole, ``util.files.atomic_dir``), then the reports
that describe it, then the MLflow model version: a reader never sees a
report or a registered version that points at weights not yet in
``models/best``, and a failure or a kill before the swap leaves the previous
``models/best`` exactly as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.reports.train_files import METRIC_KEYS, clean, cost_fields, grid_frame, write_reports
from cnnpipe.util.files import atomic_dir
from cnnpipe.models.checkpoint import save_checkpoint
from cnnpipe.models.torchvision_spec import run_normalization
from cnnpipe.serving.register import register_checkpoint
from cnnpipe.tracking.model_registry import version_tags

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData
    from cnnpipe.search.selection import RunRecord
    from cnnpipe.tracking.runs import NullTracker

SUMMARY_FILE = "summary.txt"  # the model summary, beside the checkpoint in models/best/


@dataclass(frozen=True)
class Published:
    best_dir: Path
    reports: dict[str, Path]
    model_version: str | None  # "<registered model>/<version>" when registered

    def describe(self) -> str:
        where = f"; registered as {self.model_version}" if self.model_version else ""
        return f"wrote {self.best_dir}/ and {', '.join(str(p) for p in self.reports.values())}{where}"


def checkpoint_sidecar(best: "RunRecord", data: "TrainData", tracker: "NullTracker") -> dict[str, Any]:
    """What ``models/best/model.json`` records beyond the weights: enough to rebuild and trace the model."""
    result = best.result
    mean, std = run_normalization(best.cfg.layers, data.mean, data.std)  # a pretrained net's own normalization
    return {
        "model": best.cfg.values.model,
        "layers": list(best.cfg.layers),
        "in_shape": list(data.image_shape),
        "num_classes": data.num_classes,
        "classes": list(data.classes),
        "dataset": data.dataset or best.cfg.dataset,
        "data_fingerprint": data.fingerprint,
        "mean": mean,
        "std": std,
        "params": best.cfg.flat(),
        "run_id": best.cfg.run_id,
        "run_name": best.cfg.name,
        "best_epoch": result.best_epoch,
        "metrics": {key: clean(getattr(result.best, key)) for key in METRIC_KEYS},
        "mlflow_run_id": best.mlflow_run_id,
        "mlflow_parent_run_id": tracker.parent_run_id,
        "mlflow_experiment_id": tracker.experiment_id,
    }


def publish(records: Sequence["RunRecord"], best: "RunRecord", data: "TrainData", tracker: "NullTracker", *,
            select_by: str, best_dir: str | os.PathLike[str], reports_dir: str | os.PathLike[str],
            prepared_dir: str | os.PathLike[str] | None = None, select_cost: str | None = None,
            max_cost: float | None = None) -> Published:
    """Write the selected checkpoint and the reports, and close the loop in MLflow.

    ``models/best`` is assembled in a temp folder and swapped in whole
    (``fsutil.atomic_dir``): a failure or a kill before the swap leaves the
    previous ``models/best`` exactly as it was, and at no instant is it missing.
    """
    from cnnpipe.models.build import model_summary
    best_dir = Path(best_dir)
    summary = model_summary(best.cfg.values.model, best.cfg.layers, data.image_shape, data.num_classes)
    # Order: the checkpoint lands first (swapped in whole), then the reports that
    # describe it, then the MLflow model version: a reader never sees a report or
    # a registered version that points at weights not yet in models/best.
    with atomic_dir(best_dir) as staging:
        save_checkpoint(staging, best.result.model, checkpoint_sidecar(best, data, tracker))
        (staging / SUMMARY_FILE).write_text(summary + "\n", encoding="utf-8")
    paths = write_reports(reports_dir, records, best, select_by=select_by,
                          mlflow_parent_run_id=tracker.parent_run_id, mlflow_experiment_id=tracker.experiment_id,
                          select_cost=select_cost, max_cost=max_cost)
    version = None
    if tracker.enabled:
        version = register_checkpoint(
            tracker, best.mlflow_run_id, best_dir,
            description=f"{best.cfg.name} (run {best.cfg.run_id}), best {select_by} at epoch {best.result.best_epoch}",
            tags={"run_id": best.cfg.run_id, "dataset": data.dataset, "data_fingerprint": data.fingerprint,
                  **version_tags(best.cfg.flat(), {key: getattr(best.result.best, key) for key in METRIC_KEYS})},
            prepared_dir=Path(prepared_dir) if prepared_dir else None,
        )
    if tracker.enabled:
        log_parent_summary(tracker, records, best, version, paths, front=select_cost is not None)
    return Published(best_dir, paths, version)


def log_parent_summary(tracker: "NullTracker", records: Sequence["RunRecord"], best: "RunRecord",
                       version: str | None, paths: dict[str, Path], *, front: bool = False) -> None:
    """Best child's params and metrics on the parent (``best_`` prefix), its ids, and the grid table.

    With a Pareto front (``front``) every child gets its counted costs and a
    ``cnnpipe.pareto_front`` tag (front trials also their measured latency),
    and the parent the front's CSV and size.
    """
    result = best.result
    metrics = {f"best_{key}": getattr(result.best, key) for key in METRIC_KEYS}
    metrics.update({"best_epoch": float(result.best_epoch or 0), "runs_total": float(len(records)),
                    "runs_failed": float(sum(1 for rec in records if not rec.ok))})
    tags = {"best_run_id": best.cfg.run_id, "best_run_name": best.cfg.name, "best_mlflow_run_id": best.mlflow_run_id or ""}
    if version:
        tags["registered_model_version"] = version
    files = [paths["grid.csv"], paths["train.json"]]
    if front:
        metrics.update({f"best_{key}": value for key, value in cost_fields(best).items() if value is not None})
        metrics["pareto_front_size"] = float(sum(1 for rec in records if rec.on_front))
        files.append(paths["pareto_front.csv"])
        tracker.log_to_runs({rec.mlflow_run_id: ({key: value for key, value in cost_fields(rec).items()
                                                  if value is not None},
                                                 {"cnnpipe.pareto_front": str(rec.on_front).lower()})
                             for rec in records if rec.mlflow_run_id})
    tracker.log_parent(
        params={f"best_{key}": value for key, value in best.cfg.flat().items()},
        metrics=metrics,
        tags=tags,
        files=files,
        table=grid_frame(records),
    )
