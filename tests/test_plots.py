"""Report figures, README and the plots stage, from small synthetic tables."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cnnpipe.figures import class_figures, curve_figures, figure_cache, figure_style, search_figures
from cnnpipe.figures.report_readme import markdown_table, render_readme, write_readme

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
RUNS = [("r0", "lr=0.01,batch_size=100", 6, 4, "early_stopping"), ("r1", "lr=0.01,batch_size=1000", 8, 8, "max_epochs"),
        ("r2", "lr=0.001,batch_size=100", 8, 7, "max_epochs"), ("r3", "lr=0.001,batch_size=1000", 2, None, "diverged: loss is nan at epoch 2 batch 3")]


def make_history() -> pd.DataFrame:
    rows = []
    for i, (run_id, name, epochs, _, _) in enumerate(RUNS):
        for e in range(1, epochs + 1):
            rows.append({"run_id": run_id, "run_name": name, "epoch": e, "train_loss": 1 / e + 0.05 * i,
                         "train_top1": 1 - 0.4 / e, "val_loss": 1.1 / e + 0.02 * e, "val_top1": 0.9 - 0.35 / e - 0.02 * i,
                         "val_top5": 0.99 - 0.1 / e, "lr": 0.01, "epoch_seconds": 2.0, "images_per_s": 900.0})
    return pd.DataFrame(rows)


def make_grid() -> pd.DataFrame:
    rows = []
    for i, (run_id, name, epochs, best, stop) in enumerate(RUNS):
        failed = best is None
        rows.append({"run_id": run_id, "run_name": name, "model": "fashion_tutorial", "lr": 0.01 if i < 2 else 0.001,
                     "batch_size": 100 if i % 2 == 0 else 1000, "status": "diverged" if failed else "finished",
                     "stop_reason": stop, "best_epoch": best, "epochs_run": epochs,
                     "val_loss": None if failed else 0.3 + 0.02 * i, "val_top1": None if failed else 0.88 - 0.02 * i,
                     "val_top5": None if failed else 0.99, "seconds": 12.5, "images_per_s": 900.0, "mlflow_run_id": None})
    return pd.DataFrame(rows)


def make_per_class() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    acc = rng.uniform(0.6, 0.99, len(CLASSES))
    return pd.DataFrame({"class": CLASSES, "support": 100, "accuracy": acc, "precision": acc, "recall": acc,
                         "f1": acc, "train_accuracy": np.minimum(acc + 0.05, 1.0)})


def make_confusion() -> np.ndarray:
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 20, (10, 10))
    np.fill_diagonal(counts, 800)
    counts[2] = 0  # a class with no test images: its row stays 0, not NaN
    return counts


def assert_png(path: Path, size: tuple[float, float]) -> None:
    """A non-empty, non-blank PNG of ``size`` (figure inches x DPI, +-1 px rounding)."""
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert abs(width - size[0] * figure_style.DPI) <= 1 and abs(height - size[1] * figure_style.DPI) <= 1, image.size
        low, high = image.convert("L").getextrema()
        assert low < 100 and high > 200  # something was drawn on the white background


def test_learning_curves(tmp_path: Path) -> None:
    history = make_history()
    path = curve_figures.learning_curves(history[history.run_id == "r0"], tmp_path / "lc.png", best_epoch=4,
                                 title="Selected run", stop_reason="early_stopping")
    assert path == tmp_path / "lc.png"
    assert_png(path, (15, 4.8))


def test_learning_curves_single_epoch(tmp_path: Path) -> None:
    history = make_history()
    one = history[(history.run_id == "r1") & (history.epoch == 1)]
    assert_png(curve_figures.learning_curves(one, tmp_path / "one.png", best_epoch=1), (15, 4.8))


def test_grid_curves(tmp_path: Path) -> None:
    path = curve_figures.grid_curves(make_history(), tmp_path / "grid_curves.png", grid=make_grid(), selected_run_id="r0")
    legend_rows = math.ceil(len(RUNS) / 3) + 1
    assert_png(path, (15, 4.8 + 0.25 * legend_rows))


def test_grid_comparison_with_a_diverged_run(tmp_path: Path) -> None:
    path = search_figures.grid_comparison(make_grid(), tmp_path / "cmp.png", selected_run_id="r0")
    assert_png(path, (10, 1.6 + 0.42 * len(RUNS)))


def ranking_grid() -> pd.DataFrame:
    """val_loss and val_top1 disagree on the best run; r1 and r2 tie on val_loss."""
    grid = make_grid()
    grid["val_loss"] = [0.40, 0.30, 0.30, None]
    grid["val_top1"] = [0.91, 0.85, 0.86, None]
    return grid


@pytest.mark.parametrize(("select_by", "order"), [("val_loss", ["r2", "r1", "r0", "r3"]),
                                                   ("val_top1", ["r0", "r2", "r1", "r3"])])
def test_grid_comparison_ranks_by_select_by_with_the_selected_run_on_top(select_by: str, order: list[str]) -> None:
    """The same order as select_best: the metric, ties to the other metric then grid order; failures last."""
    from cnnpipe.figures.grid_table import rank_runs

    grid = ranking_grid()
    assert list(rank_runs(grid, select_by)["run_id"]) == order
    fig = search_figures.grid_comparison_figure(grid, select_by=select_by, selected_run_id=order[0])
    names = dict(zip(grid["run_id"], grid["run_name"]))
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]  # y axis inverted: first tick is the top bar
    assert ticks == [f"{names[order[0]]}  (selected)", *(names[r] for r in order[1:])]
    assert select_by in fig.axes[0].get_title()


def test_rank_runs_matches_select_best_on_real_records() -> None:
    """rank_runs reads grid.csv, select_best reads RunRecords: both must name the same run."""
    from cnnpipe.engine.records import EpochRecord, RunResult
    from cnnpipe.search import selection as grid_mod
    from cnnpipe.search.space import expand as expand_grid
    from cnnpipe.figures.grid_table import rank_runs
    from synthetic import tiny_params

    table = ranking_grid()
    configs = expand_grid(tiny_params(lr=[0.1, 0.2, 0.3, 0.4], batch_size=32))
    records = []
    for i, row in table.iterrows():
        ok = row["status"] == "finished"
        best = EpochRecord(1, 0.5, 0.5, row["val_loss"], row["val_top1"], 0.99, 0.01, 1.0, 1.0) if ok else None
        result = RunResult(run_id=configs[i].run_id, status=row["status"], stop_reason="", best_epoch=1 if ok else None,
                           best=best, history=[best] if ok else [], epochs_run=1, seconds=1.0, images_per_s=1.0,
                           model=object() if ok else None, device="cpu")
        records.append(grid_mod.RunRecord(i + 1, configs[i], result))
    for select_by in ("val_loss", "val_top1"):
        best = grid_mod.select_best(records, select_by)
        assert table["run_id"][best.index - 1] == rank_runs(table, select_by)["run_id"].iloc[0]


def test_curves_label_train_metrics_as_measured_while_training(tmp_path: Path) -> None:
    fig_labels = [label for _, series, _, _ in curve_figures.CURVE_PANELS for column, label, _ in series]
    assert figure_style.TRAIN_LABEL in fig_labels and "augmented" in figure_style.TRAIN_LABEL and "train mode" in figure_style.TRAIN_LABEL
    assert all(label == figure_style.VAL_LABEL for _, series, _, _ in curve_figures.CURVE_PANELS
               for column, label, _ in series if column.startswith("val"))
    assert all(label == figure_style.TRAIN_LABEL for _, series, _, _ in curve_figures.CURVE_PANELS
               for column, label, _ in series if column.startswith("train"))


def test_per_class_bars(tmp_path: Path) -> None:
    assert_png(class_figures.per_class_bars(make_per_class(), tmp_path / "pc.png"), (9, 1.6 + 0.5 * len(CLASSES)))


def test_confusion_heatmap(tmp_path: Path) -> None:
    side = 2.8 + 0.65 * len(CLASSES)
    assert_png(class_figures.confusion_heatmap(make_confusion(), CLASSES, tmp_path / "cm.png"), (side + 1.3, side))


def test_confusion_from_pairs_counts_in_class_order() -> None:
    counts = class_figures.confusion_from_pairs(["Bag", "Bag", "Coat"], ["Bag", "Coat", "Coat"], ["Coat", "Bag"])
    assert counts.tolist() == [[1, 0], [1, 1]]


@pytest.mark.parametrize("channels", [1, 3])
def test_mistakes_grid(tmp_path: Path, channels: int) -> None:
    from synthetic import make_images

    images, labels = make_images(7, (channels, 16, 16), 10, seed=3)
    path = class_figures.mistakes_grid(images, [CLASSES[i] for i in labels], [CLASSES[(i + 1) % 10] for i in labels],
                               [0.99] * 7, tmp_path / "m.png", ncols=5)
    assert_png(path, (2.3 * 5 + 0.4, 2.55 * 2 + 0.7))


def test_mistakes_grid_without_mistakes(tmp_path: Path) -> None:
    path = class_figures.mistakes_grid(np.zeros((0, 1, 8, 8), np.uint8), [], [], [], tmp_path / "none.png")
    assert_png(path, (2.3 + 0.4, 2.55 + 0.7))


def test_figure_write_is_atomic_and_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies half-way (disk full) leaves the old figure whole; a good one replaces it."""
    import io

    from matplotlib.figure import Figure

    target = tmp_path / "cmp.png"
    target.write_bytes(b"old")
    search_figures.grid_comparison(make_grid(), target)
    old = target.read_bytes()
    assert old[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cmp.png"]  # no temp file left behind

    real_savefig = Figure.savefig

    def dies_half_way(self, fname, *args, **kwargs):
        buffer = io.BytesIO()
        real_savefig(self, buffer, *args, **kwargs)
        half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if hasattr(fname, "write"):
            fname.write(half)
        else:
            Path(fname).write_bytes(half)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        search_figures.grid_comparison(make_grid(), target, selected_run_id="r1")
    assert target.read_bytes() == old  # never observed half-written
    assert [p.name for p in tmp_path.iterdir()] == ["cmp.png"]
    monkeypatch.setattr(Figure, "savefig", real_savefig)
    search_figures.grid_comparison(make_grid(), target, selected_run_id="r1")
    assert target.read_bytes() != old and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- README


TRAIN_JSON = {"select_by": "val_loss", "run_id": "r0", "run_name": "lr=0.01,batch_size=100", "best_epoch": 4,
              "val_loss": 0.3, "val_top1": 0.88, "val_top5": 0.99, "epochs_run": 6, "seconds": 50.0, "runs_total": 4,
              "runs_failed": 1, "mlflow_parent_run_id": "p123", "mlflow_run_id": "c456", "mlflow_experiment_id": "1"}
METRICS_JSON = {"test_loss": 0.3312, "test_top1": 0.8765, "test_top5": 0.9912, "macro_precision": 0.87,
                "macro_recall": 0.8765, "macro_f1": 0.874, "train_loss": 0.2, "train_top1": 0.93, "val_loss": 0.3,
                "val_top1": 0.88, "test_images": 1000, "run_id": "r0", "mlflow_run_id": "c456"}


def test_readme_has_tables_and_relative_image_links(tmp_path: Path) -> None:
    figures = {"Learning curves (selected run)": tmp_path / "figures" / "learning_curves.png",
               "Confusion matrix": tmp_path / "figures" / "confusion_matrix.png"}
    path = write_readme(tmp_path / "README.md", train=TRAIN_JSON, grid=make_grid(), metrics=METRICS_JSON,
                        per_class=make_per_class(), figures=figures, training_keys=("model", "lr", "batch_size"))
    text = path.read_text()
    assert "## Selected run" in text and "**lr=0.01,batch_size=100**" in text
    assert "lowest `val_loss`" in text and "4 grid run(s), 1 failed" in text
    assert "| param | value |" in text and "| lr | 0.01 |" in text and "| batch_size | 100 |" in text
    assert "| metric | train | validation | test |" in text
    assert "| loss | 0.2000 | 0.3000 | 0.3312 |" in text
    assert "| top-1 accuracy | 93.00% | 88.00% | 87.65% |" in text
    assert "| top-5 accuracy |  |  | 99.12% |" in text
    assert "| macro f1 |  |  | 87.40% |" in text and "1000 images" in text
    assert "| class | support | accuracy | precision | recall | f1 | train_accuracy |" in text
    assert "| T-shirt/top | 100 |" in text
    # every grid run is in the table, the selected one marked; the diverged one too
    for _, name, *_ in RUNS:
        assert name in text
    assert "**lr=0.01,batch_size=100** (selected)" in text and "| diverged |" in text
    assert "![Learning curves (selected run)](figures/learning_curves.png)" in text
    assert "![Confusion matrix](figures/confusion_matrix.png)" in text
    assert "MLflow: experiment `1`, parent run `p123`, best child run `c456`." in text
    assert str(tmp_path) not in text  # links are relative


def test_markdown_table_escapes_pipes_and_blanks_missing() -> None:
    table = markdown_table([{"a": "x|y", "b": None, "val_top1": 0.5}], ["a", "b", "val_top1"])
    assert table.splitlines() == ["| a | b | val_top1 |", "|---|---|---|", "| x\\|y |  | 50.00% |"]


def test_readme_orders_grid_by_selection_metric(tmp_path: Path) -> None:
    train = {**TRAIN_JSON, "select_by": "val_top1"}
    text = render_readme(train=train, grid=make_grid(), metrics=METRICS_JSON, per_class=make_per_class(),
                         figures={}, readme_dir=tmp_path)
    grid_section = text.split("## All grid runs", 1)[1]
    order = [grid_section.index(name) for _, name, *_ in RUNS]
    assert order == sorted(order)  # r0 (0.88) > r1 > r2, diverged last
    assert "highest `val_top1`" in text and "## Figures" not in text


# --------------------------------------------------------------------------- the stage script


def run_plots_stage(tmp_path: Path, history: pd.DataFrame, grid: pd.DataFrame,
                    **train: object) -> subprocess.CompletedProcess[str]:
    """``stages/plots.py`` in ``tmp_path`` on these train reports and synthetic evaluate reports (MLflow off)."""
    from synthetic import make_prepared

    make_prepared(tmp_path / "data" / "prepared", n_train=40, n_val=20, n_test=30)
    reports = tmp_path / "reports"
    reports.mkdir()
    classes = [f"class{i}" for i in range(10)]
    history.to_csv(reports / "history.csv", index=False)
    grid.to_csv(reports / "grid.csv", index=False)
    (reports / "train.json").write_text(json.dumps({**TRAIN_JSON, "mlflow_parent_run_id": None, **train}))
    (reports / "metrics.json").write_text(json.dumps(METRICS_JSON))
    per_class = make_per_class().assign(**{"class": classes})
    per_class.to_csv(reports / "per_class.csv", index=False)
    rng = np.random.default_rng(0)
    actual = rng.integers(0, 10, 30)
    predicted = np.where(rng.random(30) < 0.7, actual, rng.integers(0, 10, 30))
    pd.DataFrame({"actual": [classes[i] for i in actual], "predicted": [classes[i] for i in predicted]}).to_csv(
        reports / "confusion.csv", index=False)
    wrong = np.flatnonzero(actual != predicted)[:4]
    pd.DataFrame({"index": wrong, "actual": [classes[i] for i in actual[wrong]],
                  "predicted": [classes[i] for i in predicted[wrong]], "confidence": 0.9}).to_csv(
        reports / "mistakes.csv", index=False)
    (reports / "figures").mkdir()
    (reports / "figures" / "stale.png").write_bytes(b"old")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("enabled: true", "enabled: false"))

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run([sys.executable, str(ROOT / "stages" / "plots.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


FIGURES = ["confusion_matrix.png", "grid_comparison.png", "grid_curves.png", "learning_curves.png", "mistakes.png",
           "per_class_accuracy.png", "search_history.png"]


@pytest.mark.slow
def test_plots_stage_writes_figures_and_readme(tmp_path: Path) -> None:
    done = run_plots_stage(tmp_path, make_history(), make_grid())
    assert done.returncode == 0, done.stderr
    reports = tmp_path / "reports"
    names = sorted(p.name for p in (reports / "figures").iterdir())
    assert names == FIGURES  # the stale file is gone (folder replaced whole)
    for name in names:
        with Image.open(reports / "figures" / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    readme = (reports / "README.md").read_text()
    for name in names:
        assert f"](figures/{name})" in readme
    assert not (tmp_path / "mlflow.db").exists()
    # 3 finished trials: the history only, and one line saying why
    note = "no hyperparameter importance or slice figures: 3 finished trial(s); they need 4"
    assert f"plots: {note}" in done.stdout.splitlines() and f"Note: {note}" in readme
    history = pd.read_csv(reports / "search_history.csv")
    assert history["objective"].tolist()[:3] == pytest.approx([0.3, 0.32, 0.34])
    assert history["best_so_far"].tolist() == pytest.approx([0.3] * 4)


@pytest.mark.slow
def test_plots_stage_draws_what_a_search_learned(tmp_path: Path) -> None:
    """A 12-trial search over lr x batch_size: history, importance, slices and its Pareto front, in the report."""
    rng = np.random.default_rng(3)
    lrs, sizes = 10 ** rng.uniform(-4, -1, 12), rng.choice([32, 64, 128, 256], 12)
    grid = pd.DataFrame([{"run_id": f"t{i}", "run_name": f"lr={lr:.4g},batch_size={bs}", "model": "small_bn",
                          "lr": float(f"{lr:.4g}"), "batch_size": int(bs), "status": "finished", "stop_reason": "max_epochs",
                          "best_epoch": 2, "epochs_run": 2, "val_loss": 0.3 + 0.1 * abs(math.log10(lr) + 2.5),
                          "val_top1": 0.9 - 0.05 * abs(math.log10(lr) + 2.5), "val_top5": 0.99}
                         for i, (lr, bs) in enumerate(zip(lrs, sizes))])
    history = pd.DataFrame([{"run_id": row.run_id, "run_name": row.run_name, "epoch": e, "train_loss": row.val_loss,
                             "train_top1": row.val_top1, "val_loss": row.val_loss, "val_top1": row.val_top1,
                             "val_top5": 0.99, "lr": row.lr, "epoch_seconds": 1.0, "images_per_s": 100.0}
                            for row in grid.itertuples() for e in (1, 2)])
    # select_by [val_loss, macs]: each batch size a network of another size, the cheapest third on the front
    grid["macs"] = grid["batch_size"] * 10_000
    grid["params"] = grid["batch_size"] * 100
    cheapest = grid.groupby("macs")["val_loss"].transform("min") == grid["val_loss"]
    grid["pareto_front"] = cheapest & (grid["val_loss"] <= grid.sort_values("macs")["val_loss"].cummin()
                                       .reindex(grid.index))
    grid["latency_ms"] = np.where(grid["pareto_front"], 0.5, np.nan)
    best = grid.loc[grid["val_loss"].idxmin()]
    done = run_plots_stage(tmp_path, history, grid, run_id=best["run_id"], run_name=best["run_name"], best_epoch=2,
                           select_cost="macs", max_cost=2e6)
    assert done.returncode == 0, done.stderr
    figures = tmp_path / "reports" / "figures"
    for name in ("search_history.png", "param_importance.png", "param_slices.png", "pareto_front.png"):
        assert (figures / name).stat().st_size > 1000
        assert f"](figures/{name})" in (tmp_path / "reports" / "README.md").read_text()
    assert "no hyperparameter importance" not in done.stdout
    assert len(pd.read_csv(tmp_path / "reports" / "search_history.csv")) == 12


@pytest.mark.slow
def test_plots_stage_missing_input_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"}
    env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "plots.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: reports/train.json is missing; run the earlier stages first (dvc repro)"


def test_the_plots_stage_never_imports_training_code() -> None:
    """Drawing needs no engine, search or compute layer: the stage's import closure (its code deps) stays small."""
    from cnnpipe.codegraph import code_identity as ci

    modules = ci.closure((), scripts=[ROOT / "stages" / "plots.py"])
    layers = {m.split(".")[1] for m in modules if m.count(".")}
    assert not layers & {"engine", "search", "compute"}, sorted(modules)
    assert len(modules) <= 50, sorted(modules)


# --------------------------------------------------------------------------- offline DVC plots template


def test_offline_template_is_current_and_loads_nothing_remote() -> None:
    import configparser
    import re

    done = subprocess.run([sys.executable, str(ROOT / "dvc_plots" / "build_template.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # template.html == vendor/*.js inlined
    page = (ROOT / "dvc_plots" / "template.html").read_text(encoding="utf-8")
    assert page.count("{plot_divs}") == 1
    assert "{scripts}" not in page  # DVC would put its CDN <script src> tags there
    assert re.findall(r"<script\b[^>]*\bsrc\s*=", page, re.IGNORECASE) == []
    for library in ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js"):
        assert f"vendor/{library} sha256=" in page

    # The project default: DVC resolves a relative figures.html_template against .dvc/.
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    template = config.get("plots", "html_template")
    assert (ROOT / ".dvc" / template).resolve() == (ROOT / "dvc_plots" / "template.html").resolve()


def test_rank_runs_leaves_pruned_trials_out_of_the_candidates() -> None:
    """A successive-halving grid.csv (read back from CSV, as the plots stage does): pruned trials rank last."""
    import io

    from cnnpipe.figures.grid_table import rank_runs

    csv = ("run_id,run_name,status,val_loss,val_top1,pruned\n"
           "a,lr=1,paused,0.10,0.99,True\n"
           "b,lr=2,finished,0.30,0.90,False\n"
           "c,lr=3,diverged,0.20,0.95,False\n")
    table = pd.read_csv(io.StringIO(csv))
    assert list(rank_runs(table, "val_loss")["run_id"]) == ["c", "b", "a"]


# --------------------------------------------------------------------------- figure cache

def _full_grid() -> pd.DataFrame:
    """make_grid() with every column grid.csv has (the missing ones filled)."""
    from cnnpipe.reports.train_files import GRID_COLUMNS

    grid = make_grid()
    for i, column in enumerate(c for c in GRID_COLUMNS if c not in grid):
        grid[column] = [f"v{i}"] * len(grid) if i % 2 else [float(i)] * len(grid)
    return grid[list(GRID_COLUMNS)]


def _perturbed(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    out = frame.copy()
    value = out[column].iloc[0]
    if isinstance(value, (bool, np.bool_)):
        new = not value
    elif isinstance(value, (int, float, np.integer, np.floating)) and not pd.isna(value):
        new = value + 1
    else:
        new = f"{value}-changed"
    out[column] = out[column].astype(object)
    out.loc[out.index[0], column] = new
    return out


def test_a_figure_key_changes_with_every_drawn_column_and_no_undrawn_one() -> None:
    from cnnpipe.reports.train_files import GRID_COLUMNS, HISTORY_COLUMNS

    assert figure_cache.UNDRAWN_COLUMNS <= set(GRID_COLUMNS) | set(HISTORY_COLUMNS)  # no stale name hides a real column
    for fn, frame, other in ((search_figures.grid_comparison, _full_grid(), {}),
                             (curve_figures.learning_curves, make_history()[list(HISTORY_COLUMNS)], {})):
        base = figure_cache.figure_key(fn, frame, "unused.png", **other)
        assert figure_cache.figure_key(fn, frame.copy(), "elsewhere.png", **other) == base  # the output path does not count
        for column in frame.columns:
            changed = figure_cache.figure_key(fn, _perturbed(frame, column), "unused.png", **other)
            assert (changed == base) == (column in figure_cache.UNDRAWN_COLUMNS), column
    assert figure_cache.figure_key(search_figures.grid_comparison, make_grid(), "x.png", select_by="val_top1") != \
        figure_cache.figure_key(search_figures.grid_comparison, make_grid(), "x.png", select_by="val_loss")


def test_undrawn_columns_really_leave_every_figure_unchanged(tmp_path: Path) -> None:
    """The key's promise, checked on the pixels: perturbing every undrawn column gives the same PNG bytes."""
    history, grid = make_history(), _full_grid()
    other_history, other_grid = history, grid
    for column in figure_cache.UNDRAWN_COLUMNS:
        if column in other_history:
            other_history = _perturbed(other_history, column)
        if column in other_grid:
            other_grid = _perturbed(other_grid, column)
    for name, draw in {
        "curves": lambda h, g, p: curve_figures.grid_curves(h, p, grid=g, selected_run_id="r0"),
        "comparison": lambda h, g, p: search_figures.grid_comparison(g, p, selected_run_id="r0"),
        "learning": lambda h, g, p: curve_figures.learning_curves(h[h.run_id == "r0"], p, best_epoch=4),
    }.items():
        a = draw(history, grid, tmp_path / f"{name}-a.png")
        b = draw(other_history, other_grid, tmp_path / f"{name}-b.png")
        assert a.read_bytes() == b.read_bytes(), name


def test_a_figure_with_unchanged_inputs_is_copied_back_not_drawn(tmp_path: Path, monkeypatch) -> None:
    cache = figure_cache.figure_store(root=tmp_path / "cache")
    first = figure_cache.draw(search_figures.grid_comparison, make_grid(), tmp_path / "a.png", cache=cache, selected_run_id="r0")
    assert cache.hits == 0 and len(list(cache.root.iterdir())) == 1
    again = figure_cache.draw(search_figures.grid_comparison, make_grid(), tmp_path / "b.png", cache=cache, selected_run_id="r0")
    assert cache.hits == 1 and again.read_bytes() == first.read_bytes()
    other = figure_cache.draw(search_figures.grid_comparison, make_grid(), tmp_path / "c.png", cache=cache, selected_run_id="r1")
    assert cache.hits == 1 and len(list(cache.root.iterdir())) == 2 and other.read_bytes() != first.read_bytes()
    monkeypatch.setenv("CNNPIPE_NO_CACHE", "1")  # draws again (and stores the fresh one)
    figure_cache.draw(search_figures.grid_comparison, make_grid(), tmp_path / "d.png", cache=cache, selected_run_id="r0")
    assert cache.hits == 1
    monkeypatch.delenv("CNNPIPE_NO_CACHE")
    (cache.root / figure_cache.figure_key(search_figures.grid_comparison, make_grid(), "x", selected_run_id="r0") / figure_cache.FIGURE_FILE).unlink()
    redrawn = figure_cache.draw(search_figures.grid_comparison, make_grid(), tmp_path / "e.png", cache=cache, selected_run_id="r0")
    assert cache.hits == 1 and redrawn.read_bytes() == first.read_bytes()  # an incomplete entry is drawn again


def test_a_figure_that_cannot_be_stored_is_still_written(tmp_path: Path, capsys) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    cache = figure_cache.figure_store(root=blocked)
    path = figure_cache.draw(search_figures.grid_comparison, make_grid(), tmp_path / "a.png", cache=cache, selected_run_id="r0")
    assert path.stat().st_size > 1000
    assert "cache: could not store" in capsys.readouterr().err


# --------------------------------------------------------------------------- a 27-point halving search

DIVERGED = "t05"


def halving_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """history.csv / grid.csv of a 3x3x3 search halved with eta 3 (rungs at epochs 1, 3, 9), one trial diverging.

    Trial ``i`` has val_loss ``(0.3 + 0.02 i)(0.6 + 0.4 / epoch)``; ``t05``'s is 25 at epoch 1 (pruned there).
    """
    import itertools

    points = list(itertools.product([0.03, 0.003, 0.0003], [16, 64, 256], [0.0, 0.0001, 0.001]))
    base = {f"t{i:02d}": 0.3 + 0.02 * i for i in range(len(points))}
    ranked = sorted((r for r in base if r != DIVERGED), key=base.get)
    stop = {r: 9 if r in ranked[:3] else 3 if r in ranked[:9] else 1 for r in base}
    history, grid = [], []
    for (run_id, level), (lr, bs, wd) in zip(base.items(), points):
        name = f"lr={lr},batch_size={bs},weight_decay={wd}"
        losses = [25.0 if run_id == DIVERGED else level * (0.6 + 0.4 / e) for e in range(1, stop[run_id] + 1)]
        history += [{"run_id": run_id, "run_name": name, "epoch": e, "val_loss": v, "val_top1": max(0.1, 1 - v / 2)}
                    for e, v in enumerate(losses, 1)]
        grid.append({"run_id": run_id, "run_name": name, "status": "finished" if stop[run_id] == 9 else "paused",
                     "best_epoch": len(losses), "epochs_run": stop[run_id], "val_loss": losses[-1],
                     "val_top1": max(0.1, 1 - losses[-1] / 2), "rung": {1: 0, 3: 1, 9: 2}[stop[run_id]],
                     "pruned": stop[run_id] < 9})
    return pd.DataFrame(history), pd.DataFrame(grid)


def test_halving_rungs_clip_a_diverged_trial_on_a_log_axis(tmp_path: Path) -> None:
    """One trial at val_loss 25 must not flatten the others: log axis, top at 10x the median best loss."""
    history, grid = halving_tables()
    ax = search_figures.halving_rungs_figure(history, grid, selected_run_id="t00").axes[0]
    sane = history[history["run_id"] != DIVERGED]["val_loss"]
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "log" and low <= sane.min() and sane.max() <= high < 25
    assert high < 10 * sane.max()  # the sane curves fill the axis, not a tenth of it
    assert "1 diverging trial(s) clipped" in ax.get_title() and "rungs end at epochs 1, 3" in ax.get_title()
    assert_png(search_figures.halving_rungs(history, grid, tmp_path / "halving_rungs.png", selected_run_id="t00"), (9, 5.2))
    top1 = search_figures.halving_rungs_figure(history, grid, select_by="val_top1").axes[0]
    assert top1.get_yscale() == "linear"


def test_grid_comparison_sets_pruned_trials_apart_from_the_ranked_finalists(tmp_path: Path) -> None:
    history, grid = halving_tables()
    fig = search_figures.grid_comparison_figure(grid, select_by="val_loss", selected_run_id="t00")
    ax = fig.axes[0]
    names = dict(zip(grid["run_name"], grid["run_id"]))
    order = [names[t.get_text().removesuffix("  (selected)")] for t in ax.get_yticklabels()]
    stop = dict(zip(grid["run_id"], grid["epochs_run"]))
    loss = dict(zip(grid["run_id"], grid["val_loss"]))
    finalists = [r for r in order if stop[r] == 9]
    assert order[:3] == finalists == sorted(finalists, key=loss.get) and order[0] == "t00"
    assert [stop[r] for r in order] == [9] * 3 + [3] * 6 + [1] * 18  # pruned: latest rung first
    for rung in (3, 1):
        trials = [r for r in order if stop[r] == rung]
        assert trials == sorted(trials, key=loss.get)  # ranked only within a rung (one epoch)
    texts = [t.get_text() for t in ax.texts]
    assert not any("paused" in text for text in texts)
    assert [text.endswith(f"(pruned at epoch {stop[r]})") for text, r in zip(texts, order)] == [False] * 3 + [True] * 24
    colors = [bar.get_facecolor() for bar in ax.patches]
    from matplotlib.colors import to_rgba

    assert colors[3:] == [to_rgba(figure_style.PRUNED_COLOR)] * 24 and to_rgba(figure_style.PRUNED_COLOR) not in colors[:3]
    assert ax.get_title().startswith("3 finalists ranked by select_by: val_loss")
    assert ax.get_xlim()[1] < 25  # the diverged trial's bar runs off the edge instead of shrinking every other
    assert_png(search_figures.grid_comparison(grid, tmp_path / "grid_comparison.png", selected_run_id="t00"),
               (12, 1.6 + 0.42 * 27))  # wider: room for the "pruned at epoch N" labels
    curves = curve_figures.grid_curves(history, tmp_path / "grid_curves.png", grid=grid, selected_run_id="t00")
    assert curves.is_file()
