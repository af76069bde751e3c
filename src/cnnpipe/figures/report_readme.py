"""``reports/README.md``: one page a reviewer reads after ``dvc repro``.

Rendered from the stage outputs only (train.json, grid.csv, metrics.json,
per_class.csv) so it always agrees with the numbers DVC tracks. Figures are
linked relative to the README, so the page renders on GitHub/GitLab and in
the MLflow artifact view alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cnnpipe.figures.grid_table import rank_runs
from cnnpipe.util.files import atomic_write_text

# grid.csv columns that are bookkeeping, not something a reader compares
_GRID_SKIP = {"run_id", "mlflow_run_id", "images_per_s"}
_PERCENT = ("top1", "top5", "accuracy", "precision", "recall", "f1")


def _fmt(value: Any, column: str = "") -> str:
    """Readable cell: percentages for accuracies, 4 digits for losses, '' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if any(tag in column for tag in _PERCENT):
            return f"{value:.2%}"
        if column.endswith("seconds"):
            return f"{value:.1f}"
        return f"{value:.4g}"
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in frame.to_dict("records")]


def render_readme(
    *,
    train: Mapping[str, Any],
    grid: pd.DataFrame,
    metrics: Mapping[str, Any],
    per_class: pd.DataFrame,
    figures: Mapping[str, str | os.PathLike[str]],
    readme_dir: str | os.PathLike[str],
    training_keys: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """The README text. ``figures`` maps a caption to a PNG path (linked relative to ``readme_dir``); ``notes``
    (one line each) say why a figure is missing, under the figures."""
    selected_id = train.get("run_id")
    grid_rows = _records(grid)
    selected = next((row for row in grid_rows if row.get("run_id") == selected_id), None)
    select_by = train.get("select_by", "val_loss")
    lines: list[str] = [
        "# cnnpipe report",
        "",
        "Written by the `plots` stage of `dvc repro` from `reports/train.json`, `grid.csv`, "
        "`metrics.json` and `per_class.csv`; edits are overwritten.",
        "",
        "## Selected run",
        "",
        f"**{train.get('run_name', selected_id)}** (run `{selected_id}`), chosen by "
        f"{'lowest' if select_by == 'val_loss' else 'highest'} `{select_by}` on the validation set "
        f"among {train.get('runs_total', len(grid_rows))} grid run(s)"
        + (f", {train['runs_failed']} failed" if train.get("runs_failed") else "")
        + f". Best epoch {train.get('best_epoch')} of {train.get('epochs_run')}.",
    ]
    ids = [(label, train.get(key)) for label, key in (("experiment", "mlflow_experiment_id"),
                                                         ("parent run", "mlflow_parent_run_id"),
                                                         ("best child run", "mlflow_run_id"))]
    if any(value for _, value in ids):
        lines += ["", "MLflow: " + ", ".join(f"{label} `{value}`" for label, value in ids if value) + "."]
    if selected is not None:
        keys = [k for k in training_keys if k in selected] or [
            k for k in selected if k not in _GRID_SKIP and k not in _RESULT_COLUMNS
        ]
        lines += ["", markdown_table([{"param": k, "value": selected[k]} for k in keys], ["param", "value"])]

    lines += ["", "## Test metrics", "",
              f"The selected model scored once on the held-out test set ({metrics.get('test_images', '?')} images, "
              "never used to choose the run), next to the splits it learned from and was selected on"
              + (f"; the train column scores a fixed seeded subset of {metrics['train_images']:,} training images"
                 if isinstance(metrics.get("train_images"), int) else "")
              + (f"; test-time augmentation: {metrics['tta']}" if metrics.get("tta") not in (None, "none") else "")
              + ".", "",
              _metric_table(metrics)]

    if not per_class.empty:
        lines += ["", "### Per class (test)", ""]
        columns = [c for c in ("class", "support", "accuracy", "precision", "recall", "f1", "train_accuracy") if c in per_class]
        lines.append(markdown_table(_records(per_class), columns))

    lines += ["", "## All grid runs", ""]
    ordered = rank_runs(grid, select_by)
    rows = _records(ordered)
    for row in rows:
        if row.get("run_id") == selected_id:
            row["run_name"] = f"**{row['run_name']}** (selected)"
    columns = [c for c in ("run_name", "status", "stop_reason", "best_epoch", "epochs_run", "val_loss", "val_top1",
                           "val_top5", "seconds") if c in ordered]
    lines.append(markdown_table(rows, columns))

    if figures:
        lines += ["", "## Figures", ""]
        base = Path(readme_dir)
        for caption, figure in figures.items():
            link = Path(os.path.relpath(Path(figure), base)).as_posix()
            lines += [f"### {caption}", "", f"![{caption}]({link})", ""]
        for note in notes:
            lines += [f"Note: {note}", ""]
    return "\n".join(lines).rstrip() + "\n"


_RESULT_COLUMNS = {"run_name", "status", "stop_reason", "best_epoch", "epochs_run", "val_loss", "val_top1", "val_top5",
                   "seconds"}


def _metric_table(metrics: Mapping[str, Any]) -> str:
    """Rows loss / top-k / macro scores, columns train / validation / test (blank where not computed)."""
    def cell(key: str) -> Any:
        value = metrics.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    ks = sorted(int(key[len("test_top"):]) for key in metrics if key.startswith("test_top") and key[8:].isdigit())
    rows = [{"metric": "loss", "train": _loss(cell("train_loss")), "validation": _loss(cell("val_loss")),
             "test": _loss(cell("test_loss"))}]
    for k in ks:
        rows.append({"metric": f"top-{k} accuracy", "train": _pct(cell(f"train_top{k}")),
                     "validation": _pct(cell(f"val_top{k}")), "test": _pct(cell(f"test_top{k}"))})
    for name in ("precision", "recall", "f1"):
        rows.append({"metric": f"macro {name}", "test": _pct(cell(f"macro_{name}"))})
    return markdown_table(rows, ["metric", "train", "validation", "test"])


def _pct(value: Any) -> str:
    return "" if value is None else f"{value:.2%}"


def _loss(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def write_readme(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Render (see ``render_readme``) and write atomically; links are relative to ``path``'s folder."""
    target = Path(path)
    atomic_write_text(target, render_readme(readme_dir=target.parent, **kwargs))
    return target
