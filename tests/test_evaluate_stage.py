"""The evaluate stage on a tiny checkpoint really trained for one epoch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cnnpipe.util.errors import CheckpointError, CnnpipeError
from cnnpipe.evaluation.score import MISTAKES_COLUMNS, PER_CLASS_COLUMNS, evaluate_checkpoint, write_reports

ROOT = Path(__file__).resolve().parents[1]
TINY_LAYERS = [{"conv": 4, "kernel": 3, "padding": 1}, "relu", {"maxpool": 2}, "flatten", "linear"]
N_TEST = 120


def _train_checkpoint(prepared: Path, out: Path, mlflow_ids: dict | None = None) -> dict:
    """One epoch of a tiny CNN on the synthetic split, saved as a real checkpoint."""
    from cnnpipe.models.checkpoint import save_checkpoint
    from cnnpipe.engine.data import TrainData
    from cnnpipe.engine.loop import train_run
    from cnnpipe.params.run_config import RunConfig
    from cnnpipe.params.values import TrainingValues

    data = TrainData.load(prepared, splits=("train", "val"))
    cfg = RunConfig(values=TrainingValues(model="tiny", lr=0.01, batch_size=50, epochs=1, augment="none"),
                    layers=tuple(TINY_LAYERS))
    result = train_run(cfg, data, device="cpu", progress=False)
    assert result.status == "finished" and result.model is not None
    ids = mlflow_ids or {}
    return save_checkpoint(out, result.model, {
        "model": "tiny", "layers": TINY_LAYERS, "in_shape": list(data.image_shape),
        "num_classes": data.num_classes, "classes": list(data.classes), "dataset": data.dataset,
        "data_fingerprint": data.fingerprint, "mean": list(data.mean), "std": list(data.std),
        "params": cfg.flat(), "run_id": cfg.run_id, "run_name": cfg.name, "best_epoch": result.best_epoch,
        "metrics": {"val_loss": result.best.val_loss, "val_top1": result.best.val_top1, "val_top5": result.best.val_top5},
        "mlflow_run_id": ids.get("child"), "mlflow_parent_run_id": ids.get("parent"),
        "mlflow_experiment_id": ids.get("experiment"),
    })


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with data/prepared and models/best (trained once for the module)."""
    from synthetic import make_prepared

    root = tmp_path_factory.mktemp("evalproj")
    make_prepared(root / "data" / "prepared", n_train=300, n_val=60, n_test=N_TEST)
    _train_checkpoint(root / "data" / "prepared", root / "models" / "best")
    return root


def test_evaluate_writes_documented_files(project: Path, tmp_path: Path) -> None:
    evaluation = evaluate_checkpoint(project / "models/best", project / "data/prepared", top_k=[1, 3, 5], mistakes=7)
    paths = write_reports(evaluation, tmp_path)

    metrics = json.loads(paths["metrics.json"].read_text())
    for key in ("test_loss", "test_top1", "test_top3", "test_top5", "train_top1", "val_top1",
                "macro_precision", "macro_recall", "macro_f1", "mlflow_run_id", "mlflow_parent_run_id"):
        assert key in metrics, key
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top3"] <= metrics["test_top5"] <= 1.0
    assert metrics["test_loss"] > 0
    assert metrics["test_images"] == N_TEST

    per_class = pd.read_csv(paths["per_class.csv"])
    assert tuple(per_class.columns) == PER_CLASS_COLUMNS
    assert list(per_class["class"]) == [f"class{i}" for i in range(10)]
    assert per_class["support"].sum() == N_TEST
    for column in ("accuracy", "precision", "recall", "f1", "train_accuracy"):
        assert per_class[column].between(0, 1).all() and not per_class[column].isna().any()
    # support-weighted per-class accuracy is overall top-1
    weighted = (per_class["accuracy"] * per_class["support"]).sum() / N_TEST
    assert weighted == pytest.approx(metrics["test_top1"], abs=1e-6)
    assert per_class["f1"].mean() == pytest.approx(metrics["macro_f1"], abs=1e-5)

    confusion = pd.read_csv(paths["confusion.csv"])
    assert tuple(confusion.columns) == ("actual", "predicted")
    assert len(confusion) == N_TEST
    assert (confusion["actual"] == confusion["predicted"]).mean() == pytest.approx(metrics["test_top1"])
    assert set(confusion["actual"]) <= set(per_class["class"])

    mistakes = pd.read_csv(paths["mistakes.csv"])
    assert tuple(mistakes.columns) == MISTAKES_COLUMNS
    wrong = int((confusion["actual"] != confusion["predicted"]).sum())
    assert len(mistakes) == min(7, wrong)
    assert (mistakes["actual"] != mistakes["predicted"]).all()
    assert mistakes["confidence"].is_monotonic_decreasing
    assert mistakes["index"].between(0, N_TEST - 1).all()
    # each listed mistake is the same image in confusion.csv
    for _, row in mistakes.iterrows():
        assert confusion.loc[row["index"], "actual"] == row["actual"]
        assert confusion.loc[row["index"], "predicted"] == row["predicted"]


def test_top_k_above_class_count_is_refused(project: Path) -> None:
    with pytest.raises(CnnpipeError, match="top-11 accuracy needs 1 <= k <= 10"):
        evaluate_checkpoint(project / "models/best", project / "data/prepared", top_k=[1, 11])


def test_checkpoint_for_other_data_is_refused(project: Path, tmp_path: Path) -> None:
    from synthetic import make_prepared

    other = tmp_path / "other"
    make_prepared(other, n_train=50, n_val=20, n_test=20, seed=9)
    with pytest.raises(CheckpointError, match="dvc repro train"):
        evaluate_checkpoint(project / "models/best", other)


def _write_params(root: Path, *, mlflow: dict) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update({"model": "fashion_tutorial", "lr": 0.01, "batch_size": 100})
    params["eval"] = {"top_k": [1, 5], "batch_size": 64, "mistakes": 5}
    params["mlflow"] = {**params["mlflow"], **mlflow}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _run_stage(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    full_env.update({"PYTHONPATH": str(ROOT / "src"), **(env or {})})
    return subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py")], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_stage_script_without_mlflow(project: Path, tmp_path: Path) -> None:
    work = tmp_path / "proj"
    shutil.copytree(project, work)
    _write_params(work, mlflow={"enabled": False})
    done = _run_stage(work)
    assert done.returncode == 0, done.stderr
    assert "evaluate: test top-1" in done.stdout and "reused" not in done.stdout
    names = ("metrics.json", "per_class.csv", "confusion.csv", "mistakes.csv")
    for name in names:
        assert (work / "reports" / name).stat().st_size > 0
    assert not (work / "mlflow.db").exists()
    first = {name: (work / "reports" / name).read_bytes() for name in names}
    shutil.rmtree(work / "reports")
    again = _run_stage(work)  # same weights, data and settings: the stored reports come back, byte for byte
    assert again.returncode == 0, again.stderr
    assert "reports reused" in again.stdout and "evaluate: test top-1" in again.stdout
    assert {name: (work / "reports" / name).read_bytes() for name in names} == first


@pytest.mark.slow
def test_stage_error_is_one_line(tmp_path: Path) -> None:
    from synthetic import make_prepared

    make_prepared(tmp_path / "data" / "prepared", n_train=50, n_val=20, n_test=20)
    _write_params(tmp_path, mlflow={"enabled": False})
    done = _run_stage(tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "models/best" in lines[0]
    assert not (tmp_path / "reports" / "metrics.json").exists()


@pytest.mark.slow
def test_stage_logs_test_metrics_to_best_child_and_parent(project: Path, tmp_path: Path) -> None:
    from cnnpipe.tracking import runs as tracking_runs
    from cnnpipe.params.sections import MlflowParams

    work = tmp_path / "proj"
    work.mkdir()
    shutil.copytree(project / "data", work / "data")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    settings = MlflowParams(enabled=True, tracking_uri=uri, experiment="evaltest", registered_model=None)
    tracker = tracking_runs.open_tracker(settings, root=work)
    child = tracker.start_child("tiny", params={"lr": 0.01}, tags={})
    tracker.end_child(child, status="FINISHED")
    tracker.end_parent()
    _train_checkpoint(work / "data" / "prepared", work / "models" / "best",
                      {"child": child, "parent": tracker.parent_run_id, "experiment": tracker.experiment_id})
    _write_params(work, mlflow={"enabled": True, "tracking_uri": uri, "experiment": "evaltest"})

    done = _run_stage(work, env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert metrics["mlflow_run_id"] == child and metrics["mlflow_parent_run_id"] == tracker.parent_run_id

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for run_id in (child, tracker.parent_run_id):
        logged = client.get_run(run_id).data.metrics
        assert logged["test_top1"] == pytest.approx(metrics["test_top1"])
        assert logged["test_loss"] == pytest.approx(metrics["test_loss"])
        assert logged["test_macro_f1"] == pytest.approx(metrics["macro_f1"])
        assert "train_top1" not in logged  # only test_ metrics are added
    artifacts = {a.path for a in client.list_artifacts(tracker.parent_run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/per_class.csv", "evaluation/mistakes.csv"} <= artifacts


def test_evaluate_honours_device_tta_and_labels_the_train_count(project: Path) -> None:
    import torch

    from cnnpipe.util.errors import ParamsError

    plain = evaluate_checkpoint(project / "models/best", project / "data/prepared", device="cpu", tta="none")
    flipped = evaluate_checkpoint(project / "models/best", project / "data/prepared", device="cpu", tta="flip")
    assert plain.metrics["tta"] == "none" and flipped.metrics["tta"] == "flip"
    assert plain.metrics["train_images"] == 300 and plain.metrics["test_images"] == N_TEST
    assert plain.metrics["test_loss"] != flipped.metrics["test_loss"]
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match="no CUDA GPU"):
            evaluate_checkpoint(project / "models/best", project / "data/prepared", device="cuda")


# --------------------------------------------------------------------------- stored reports

EVAL_ALTERNATIVES = {"top_k": [1, 3], "batch_size": 999, "mistakes": 3, "tta": "flip"}


def test_the_evaluation_key_changes_with_every_eval_setting_the_device_the_model_and_the_data(project: Path,
                                                                                              tmp_path: Path) -> None:
    from cnnpipe.evaluation.score import evaluation_key
    from cnnpipe.params.sections import EvalParams

    assert set(EVAL_ALTERNATIVES) == set(EvalParams.model_fields)  # a new eval setting must be added here
    settings = EvalParams().model_dump(mode="json")
    best, prepared = project / "models/best", project / "data/prepared"
    base = evaluation_key(best, prepared, settings=settings, device="cpu")
    for name, value in EVAL_ALTERNATIVES.items():
        assert value != settings[name]
        assert evaluation_key(best, prepared, settings={**settings, name: value}, device="cpu") != base, name
    assert evaluation_key(best, prepared, settings=settings, device="auto") != base

    copy = tmp_path / "best"
    shutil.copytree(best, copy)
    sidecar = json.loads((copy / "model.json").read_text())
    ids = {"mlflow_run_id": "c", "mlflow_parent_run_id": "p", "mlflow_experiment_id": "9", "run_id": "r",
           "run_name": "n", "created": "2000-01-01T00:00:00+00:00"}
    (copy / "model.json").write_text(json.dumps({**sidecar, **ids}))
    assert evaluation_key(copy, prepared, settings=settings, device="cpu") == base  # ids and time stamp do not count
    for field, value in (("best_epoch", 99), ("weights_sha256", "0" * 64), ("std", [0.5])):
        (copy / "model.json").write_text(json.dumps({**sidecar, field: value}))
        assert evaluation_key(copy, prepared, settings=settings, device="cpu") != base, field
    (copy / "model.json").write_text(json.dumps(sidecar))
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # altered weights under an unchanged sidecar: another key, so they are loaded (and refused)
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert evaluation_key(copy, prepared, settings=settings, device="cpu") != base

    other = tmp_path / "prepared"
    shutil.copytree(prepared, other)
    stats = json.loads((other / "stats.json").read_text())
    (other / "stats.json").write_text(json.dumps({**stats, "files": {**stats["files"], "extra": "0" * 64}}))
    with pytest.raises(CheckpointError, match="re-run training"):  # other data: refused before any key
        evaluation_key(best, other, settings=settings, device="cpu")
    (copy / "model.json").write_text(json.dumps({k: v for k, v in sidecar.items() if k != "data_fingerprint"}))
    unpinned = evaluation_key(copy, prepared, settings=settings, device="cpu")  # a sidecar without the data version
    assert evaluation_key(copy, other, settings=settings, device="cpu") != unpinned


def test_stored_reports_come_back_byte_for_byte_with_this_checkpoints_ids(project: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnpipe.evaluation.score import REPORT_FILES, evaluation_key, report_store, reuse_reports, store_reports
    from cnnpipe.params.sections import EvalParams

    cache = report_store(root=tmp_path / "cache")
    settings = EvalParams(tta="none").model_dump(mode="json")
    best, prepared = project / "models/best", project / "data/prepared"
    key = evaluation_key(best, prepared, settings=settings, device="cpu")
    assert reuse_reports(key, best, tmp_path / "none", cache) is None and not (tmp_path / "none").exists()
    evaluation = evaluate_checkpoint(best, prepared, device="cpu", tta="none")
    store_reports(key, write_reports(evaluation, tmp_path / "fresh"), cache)

    # The same weights under a new MLflow parent (what a cached `dvc exp run` gives): same key, new ids.
    copy = tmp_path / "best"
    shutil.copytree(best, copy)
    ids = {"mlflow_run_id": "child2", "mlflow_parent_run_id": "parent2", "mlflow_experiment_id": "7"}
    (copy / "model.json").write_text(json.dumps({**json.loads((copy / "model.json").read_text()), **ids}))
    assert evaluation_key(copy, prepared, settings=settings, device="cpu") == key
    metrics = reuse_reports(key, copy, tmp_path / "reused", cache)
    fresh = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "reused" / "metrics.json").read_text()) == {**fresh, **ids}
    assert list(metrics) == list(fresh)  # same key order: `dvc metrics diff` sees only the ids change
    for name in REPORT_FILES[1:]:
        assert (tmp_path / "reused" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name

    monkeypatch.setenv("CNNPIPE_NO_CACHE", "1")
    assert reuse_reports(key, best, tmp_path / "off", cache) is None
    monkeypatch.delenv("CNNPIPE_NO_CACHE")
    (cache.root / key / "mistakes.csv").unlink()  # an incomplete entry is never used
    assert reuse_reports(key, best, tmp_path / "partial", cache) is None


def test_a_train_subset_is_scored_alike_whatever_the_gather_and_page_budgets(project: Path, monkeypatch) -> None:
    """The train subset (``train_images`` < the split) gathered a row at a time under a one-page resident budget
    scores exactly what it scores gathered whole: the budgets change memory, not results."""
    import cnnpipe.evaluation.score as score
    from cnnpipe.data import resident_pages

    whole = evaluate_checkpoint(project / "models/best", project / "data/prepared", device="cpu", train_images=100)
    monkeypatch.setattr(score, "GATHER_PAGES_BYTES", 1)  # one row a gather
    monkeypatch.setattr(resident_pages, "BUDGET_BYTES", resident_pages.PAGE)  # drops after (nearly) every gather
    bits = evaluate_checkpoint(project / "models/best", project / "data/prepared", device="cpu", train_images=100)
    assert whole.metrics["train_images"] == bits.metrics["train_images"] == 100
    assert whole.metrics["train_top1"] == bits.metrics["train_top1"]
    assert whole.metrics["train_loss"] == bits.metrics["train_loss"]
    assert bool((whole.train_accuracy == bits.train_accuracy).all())


def test_the_evaluate_stage_never_imports_the_report_code() -> None:
    """Scoring needs no figure or README code: evaluate's import closure (its code deps) stays without reports/."""
    from cnnpipe.codegraph import code_identity as ci

    modules = ci.closure((), scripts=[ROOT / "stages" / "evaluate.py"])
    assert not [m for m in modules if m.startswith("cnnpipe.reports")]
    assert len(modules) <= 60, sorted(modules)
