"""The whole pipeline as a user runs it: ``dvc repro`` from raw files to the report, then ``dvc plots show``.

A temp git + DVC repo (``project_builder.pipeline_project``) holds this
project's dvc.yaml, params.yaml (tiny grid), stages/, src/, dvc_plots/ and
.dvc/config; the raw IDX files are served on 127.0.0.1 (the only mock: the
network edge). MLflow is on, with its default store inside the temp repo.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest

from fixtures_raw import make_idx_raw, no_proxy, serve  # noqa: F401 - no_proxy is a fixture
from project_builder import BIN, assert_reads_declared, pipeline_project, run

FIGURES = ["confusion_matrix.png", "grid_comparison.png", "grid_curves.png", "learning_curves.png", "mistakes.png",
           "per_class_accuracy.png", "search_history.png"]  # 2 trials, 1 axis: no importance or slices
SCRIPT_SRC = re.compile(r"<script\b[^>]*?\bsrc\s*=\s*[\"']?([^\"'\s>]+)", re.IGNORECASE)

pytestmark = pytest.mark.long(55)


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_offline_plots(tmp_path: Path, no_proxy: None) -> None:
    fixture = make_idx_raw(tmp_path / "www", n_train=200, n_test=60)
    with contextlib.contextmanager(serve)(fixture.folder) as server:
        project = pipeline_project(tmp_path / "project", server.url, fixture.checksums)
        reads = tmp_path / "reads"
        repro = run([str(BIN / "dvc"), "repro"], project, timeout=600, env={"CNNPIPE_RECORD_PARAMS": str(reads)})
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    for stage in ("download", "prepare", "weights", "train", "evaluate", "plots"):
        assert f"Running stage '{stage}'" in repro.stdout
    # Each stage read only params keys its dvc.yaml entry declares (recorded as it ran: cnnpipe.params.reads).
    recorded = assert_reads_declared(project, reads)
    assert set(recorded) == {"download", "prepare", "weights", "train", "evaluate", "plots"}
    assert "data.dataset" in recorded["download"] and "lr" in recorded["train"] and "eval.top_k" in recorded["evaluate"]

    reports = project / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0
    assert metrics["test_images"] == 60
    assert metrics["mlflow_parent_run_id"] and metrics["mlflow_run_id"]
    assert (reports / "confusion.csv").read_text().count("\n") == 61  # header + one row per test image
    assert sorted(p.name for p in (reports / "figures").iterdir()) == FIGURES
    readme = (reports / "README.md").read_text()
    assert all(f"](figures/{name})" in readme for name in FIGURES)
    assert (project / "mlflow.db").is_file()  # the default store, anchored at the repo root

    # Test metrics and figures landed in the MLflow runs train created.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    parent = client.get_run(metrics["mlflow_parent_run_id"])
    child = client.get_run(metrics["mlflow_run_id"])
    assert parent.data.metrics["test_top1"] == pytest.approx(metrics["test_top1"])
    assert child.data.metrics["test_top1"] == pytest.approx(metrics["test_top1"])
    sidecar = json.loads((project / "models" / "best" / "model.json").read_text())
    for run_ in (parent, child):  # the runs table's Dataset column: name and the prepared data's digest
        assert [(d.dataset.name, d.dataset.digest) for d in run_.inputs.dataset_inputs] == \
            [(sidecar["dataset"], sidecar["data_fingerprint"])]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report/figures")}
    assert {f"report/figures/{name}" for name in FIGURES} == logged

    # `dvc metrics show` sees the evaluate stage's metrics file.
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], project)
    assert shown.returncode == 0 and "test_top1" in shown.stdout

    # Offline plots: the project template inlines vega; nothing is loaded from the network.
    plots = run([str(BIN / "dvc"), "plots", "show"], project)
    assert plots.returncode == 0, plots.stderr
    page = (project / "dvc_plots" / "index.html").read_text()
    assert "{plot_divs}" not in page
    assert page.count("vegaEmbed(") == 5  # loss, accuracy, confusion, per_class, search_history
    assert SCRIPT_SRC.findall(page) == []  # every script is inline: no <script src=...> at all
    assert "cdn.jsdelivr.net" not in page
    for library in ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js"):
        assert f"vendor/{library} sha256=" in page

    # A second repro changes nothing and runs nothing.
    again = run([str(BIN / "dvc"), "repro"], project)
    assert again.returncode == 0
    assert "Running stage" not in again.stdout

    # A module added later re-scores (the reported bug: dvc.yaml listed files, not the new one, and `dvc repro`
    # said "up to date" with a stale score). The code deps are package folders: the new file is covered.
    # From here on `dvc repro evaluate`: the checks are about the evaluate stage (and that train, upstream of it,
    # does not run); plots, downstream, would only redraw figures nothing below reads.
    repro_evaluate = [str(BIN / "dvc"), "repro", "evaluate"]
    evaluation = project / "src" / "cnnpipe" / "evaluation"
    (evaluation / "scale.py").write_text("FACTOR = 1.0\n")
    score = evaluation / "score.py"
    source = score.read_text()
    anchor = re.search(r"^( +)logits = evaluate_logits\(model, images,[^\n]*\n", source, re.M)
    assert anchor is not None, "the test split's logits line moved: update this test"
    indent = anchor.group(1)
    score.write_text(source[:anchor.end()] + f"{indent}from cnnpipe.evaluation.scale import FACTOR\n"
                     f"{indent}logits = logits * FACTOR\n" + source[anchor.end():])
    same = run(repro_evaluate, project)
    assert same.returncode == 0 and "Running stage 'evaluate'" in same.stdout, same.stdout[-3000:] + same.stderr[-3000:]
    assert json.loads((reports / "metrics.json").read_text())["test_top1"] == metrics["test_top1"]
    (evaluation / "scale.py").write_text("FACTOR = -1.0\n")  # only the new module changes
    rescored = run(repro_evaluate, project)
    assert rescored.returncode == 0, rescored.stdout[-3000:] + rescored.stderr[-3000:]
    assert "Running stage 'evaluate'" in rescored.stdout and "reports reused" not in rescored.stdout
    assert "Running stage 'train'" not in rescored.stdout  # train never ran the evaluation package
    negated = json.loads((reports / "metrics.json").read_text())
    assert negated["test_top1"] < metrics["test_top1"] and negated["test_loss"] > metrics["test_loss"]

    # A package the stage never declared: one line naming the module and the fix, before anything is written.
    (evaluation / "scale.py").write_text("from cnnpipe.figures.report_readme import write_readme\n\nFACTOR = 1.0\n")
    refused = run(repro_evaluate, project)
    assert refused.returncode != 0
    [line] = [ln for ln in refused.stdout.splitlines() + refused.stderr.splitlines() if "does not depend on it" in ln]
    assert "stage evaluate runs src/cnnpipe/figures/" in line and "python -m cnnpipe.codegraph.stage_deps --write" in line
    assert json.loads((reports / "metrics.json").read_text()) == negated
    fixed = run([str(BIN / "python"), "-m", "cnnpipe.codegraph.stage_deps", "--write"], project)
    assert fixed.returncode == 0 and "evaluate" in fixed.stdout, fixed.stdout + fixed.stderr
    again = run(repro_evaluate, project)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((reports / "metrics.json").read_text())["test_top1"] == metrics["test_top1"]
