"""DVC stage ``evaluate``: score ``models/best`` on the held-out test set.

Reads ``models/best/`` (safetensors checkpoint + sidecar), ``data/prepared/``
and the ``eval``/``mlflow`` params; writes ``reports/metrics.json`` (DVC
metrics), ``reports/per_class.csv``, ``reports/confusion.csv`` (one row per
test image, for DVC's confusion template) and ``reports/mistakes.csv``.
Test metrics are added (``test_`` prefix) to the MLflow runs train created
(the best child and its parent) and, as tags, to the registered model version
holding these weights, with the ``dvc.lock`` hash of ``models/best``.
Weights already scored on the same data with the same ``eval`` params (a
``dvc exp run`` whose runs all came from the run cache) are not scored
again: the stored reports are copied back (``cnnpipe.store.outputs``).
"""

from __future__ import annotations

from pathlib import Path

from cnnpipe.codegraph.stage_deps import check_code_deps
from cnnpipe.util.errors import answer_help, run_entry_point

CHECKPOINT = Path("models/best")
PREPARED = Path("data/prepared")
REPORTS = Path("reports")


def main() -> int:
    check_code_deps(__file__)  # dvc.yaml must declare every package this stage runs
    from cnnpipe.evaluation.score import (check_top_k, evaluate_checkpoint, evaluation_key, numeric_metrics, report_paths, reuse_reports,
                                    store_reports, summary_line, write_reports)
    from cnnpipe.params.stage_sections import load_sections

    from cnnpipe.compute import turns

    params = load_sections("eval", "mlflow", "device")
    check_top_k(params.eval.top_k, PREPARED)
    if params.mlflow.enabled:
        from cnnpipe.tracking import later_stages as tracking_stages
        from cnnpipe.tracking import connection as tracking_store

        tracking_store.warm_up(params.mlflow)  # mlflow's import and store open overlap with the forward passes
    eval_key = evaluation_key(CHECKPOINT, PREPARED, settings=params.eval.model_dump(mode="json"), device=params.device)
    metrics = reuse_reports(eval_key, CHECKPOINT, REPORTS)
    if metrics is not None:
        paths = report_paths(REPORTS)
        print(f"evaluate: these weights were scored before on this data with these settings; reports reused (key {eval_key})")
    else:
        with turns.compute_turn("evaluate"):  # concurrent experiments on this machine take turns
            evaluation = evaluate_checkpoint(
                CHECKPOINT,
                PREPARED,
                top_k=params.eval.top_k,
                batch_size=params.eval.batch_size,
                mistakes=params.eval.mistakes,
                device=params.device,
                tta=params.eval.tta,
            )
        paths = write_reports(evaluation, REPORTS)
        store_reports(eval_key, paths)
        metrics = evaluation.metrics
    print(summary_line(metrics), flush=True)

    if params.mlflow.enabled:
        if not metrics.get("mlflow_parent_run_id"):
            print("mlflow: models/best has no MLflow run ids (trained with mlflow.enabled: false); not logged")
        else:
            test_metrics = {
                (key if key.startswith("test_") else f"test_{key}"): value
                for key, value in numeric_metrics(metrics).items()
                if key.startswith(("test_", "macro_")) and key != "test_images"
            }
            from cnnpipe.models.checkpoint import read_sidecar
            from cnnpipe.tracking.model_registry import LOCK_TAG, dvc_lock_hash

            lock_hash = dvc_lock_hash()  # DVC locked train before running evaluate
            logged = tracking_stages.log_evaluation(
                params.mlflow,
                parent_run_id=metrics["mlflow_parent_run_id"],
                child_run_id=metrics.get("mlflow_run_id"),
                metrics=test_metrics,
                files=[paths["metrics.json"], paths["per_class.csv"], paths["mistakes.csv"]],
                weights_sha256=read_sidecar(CHECKPOINT)["weights_sha256"],
                model_tags={LOCK_TAG: lock_hash} if lock_hash else None,
            )
            if logged:
                print(f"mlflow: test metrics logged to run {metrics.get('mlflow_run_id')} and parent {metrics['mlflow_parent_run_id']}")
    return 0


if __name__ == "__main__":
    answer_help(__file__, __doc__)
    run_entry_point(main)
