"""What each MLflow run of a search records: the parent's search definition, a child's params, tags and metrics.

Plain functions of the search's data (configs, records, the prepared data),
so the same run always logs the same keys whichever executor trained it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData
    from cnnpipe.engine.records import RunResult
    from cnnpipe.engine.records import EpochRecord
    from cnnpipe.params.run_config import RunConfig
    from cnnpipe.params.schema import Params


def child_params(cfg: "RunConfig", data: "TrainData") -> dict[str, Any]:
    from cnnpipe.engine.finetune import tracking_fields

    pretrained, _ = tracking_fields(cfg, data.image_shape, data.num_classes)  # torchvision: weights, counts
    return {**cfg.flat(), "dataset": cfg.dataset or data.dataset, **pretrained}


def child_tags(cfg: "RunConfig", data: "TrainData", device: str) -> dict[str, str]:
    from cnnpipe.engine.finetune import tracking_fields

    return {
        "cnnpipe.run_id": cfg.run_id,
        "dataset": cfg.dataset or data.dataset,
        "data_fingerprint": data.fingerprint,
        "device": device,
        **tracking_fields(cfg, data.image_shape, data.num_classes)[1],  # torchvision: weights' source, SHA-256
    }


def epoch_metrics(record: "EpochRecord", layer_stats: bool) -> dict[str, float]:
    metrics = {key: value for key, value in record.metrics().items() if key != "epoch"}
    if layer_stats:
        metrics.update(record.layer_stats)
    return metrics


def final_metrics(result: "RunResult") -> dict[str, float]:
    out: dict[str, float] = {"epochs_run": float(result.epochs_run), "run_seconds": float(result.seconds),
                             "run_images_per_s": float(result.images_per_s)}
    if result.best is not None:
        out.update({"best_epoch": float(result.best_epoch or 0), "best_val_loss": result.best.val_loss,
                    "best_val_top1": result.best.val_top1, "best_val_top5": result.best.val_top5})
    return out


def search_definition(params: "Params") -> dict[str, Any]:
    """The parent run's params: every training key (a list for grid axes), the strategy and selection rule."""
    out: dict[str, Any] = {}
    for key, values in params.training.items():
        out[key] = list(values) if len(values) > 1 else values[0]
    out.update({key: str(spec) for key, spec in params.ranges.items()})
    grid = params.grid
    out.update({"dataset": params.data.dataset, "select_by": params.select_metric, "device": params.device,
                "grid_size": params.grid_size, "grid_axes": ",".join(params.axes) or "none",
                "strategy": grid.strategy})
    if params.select_cost:
        out.update({"select_cost": params.select_cost, "max_cost": params.max_cost})
    if grid.strategy == "halving" or grid.prune == "halving":
        out.update({"eta": grid.eta, "min_epochs": grid.min_epochs})
    if params.ranges or grid.strategy == "tpe":
        out.update({"samples": grid.samples, "search_seed": grid.search_seed})
    if grid.strategy == "tpe":
        out.update({"batch": grid.batch, "prune": grid.prune})
    return out


def parent_tags(params: "Params", data: "TrainData", device: str) -> dict[str, str]:
    return {
        "dataset": params.data.dataset,
        "data_fingerprint": data.fingerprint,
        "device": device,
        "select_by": params.select_metric,
        **({"select_cost": params.select_cost} if params.select_cost else {}),
        "grid_axes": ",".join(params.axes) or "none",
        "cnnpipe.strategy": params.grid.strategy,
    }
