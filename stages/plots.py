"""DVC stage ``plots``: report figures and ``reports/README.md``.

Reads the train outputs (``train.json``, ``grid.csv``, ``history.csv``), the
evaluate outputs (``metrics.json``, ``per_class.csv``, ``confusion.csv``,
``mistakes.csv``) and the prepared test images (for the mistakes grid);
writes ``reports/figures/*.png`` (the folder is replaced whole),
``reports/search_history.csv`` (each trial's objective and the best so far,
for ``dvc plots``) and ``reports/README.md``, and logs them to the MLflow
parent run. The search's history, hyperparameter importance and slices
(``cnnpipe.figures.search_study``, ``study_figures``) are drawn for every
strategy; the last two need 2 varying axes and 4 finished trials, and say so
otherwise. A search that selected on a Pareto front (``select_by: [METRIC,
COST]``) also gets ``pareto_front.png`` (``cnnpipe.figures.pareto_figure``). A figure whose inputs did not change since it was last drawn is
copied back from ``.cnnpipe-cache/figures`` instead
(``cnnpipe.figures.figure_cache.draw``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from cnnpipe.codegraph.stage_deps import check_code_deps
from cnnpipe.util.errors import DataError, answer_help, run_entry_point

PREPARED = Path("data/prepared")
REPORTS = Path("reports")
FIGURES = REPORTS / "figures"
README = REPORTS / "README.md"
SEARCH_HISTORY = REPORTS / "search_history.csv"
INPUTS = ("train.json", "grid.csv", "history.csv", "metrics.json", "per_class.csv", "confusion.csv", "mistakes.csv")


def _read_inputs() -> dict:
    import pandas as pd

    missing = [name for name in INPUTS if not (REPORTS / name).is_file()]
    if missing:
        raise DataError(f"reports/{missing[0]} is missing; run the earlier stages first (dvc repro)")
    out = {name: json.loads((REPORTS / name).read_text(encoding="utf-8")) for name in INPUTS if name.endswith(".json")}
    for name in INPUTS:
        if name.endswith(".csv"):
            out[name] = pd.read_csv(REPORTS / name, keep_default_na=True)
    return out


def main() -> int:
    check_code_deps(__file__)  # dvc.yaml must declare every package this stage runs
    from cnnpipe.figures.class_figures import confusion_from_pairs, confusion_heatmap, mistakes_grid, per_class_bars
    from cnnpipe.figures.curve_figures import grid_curves, learning_curves
    from cnnpipe.figures.figure_cache import draw as draw_cached
    from cnnpipe.figures.figure_cache import figure_store
    from cnnpipe.figures.search_figures import grid_comparison, halving_rungs
    from cnnpipe.figures import search_study, study_figures
    from cnnpipe.figures.pareto_figure import pareto_front
    from cnnpipe.data.prepared import load_images_numpy, load_stats
    from cnnpipe.util.files import atomic_dir
    from cnnpipe.util.tables import write_csv
    from cnnpipe.util.text import one_line
    from cnnpipe.params.stage_sections import load_sections
    from cnnpipe.params.values import TRAINING_KEYS, objectives
    from cnnpipe.figures.report_readme import write_readme

    params = load_sections("mlflow", "select_by")
    if params.mlflow.enabled:
        from cnnpipe.tracking import later_stages as tracking_stages
        from cnnpipe.tracking import connection as tracking_store

        tracking_store.warm_up(params.mlflow)  # mlflow's import and store open overlap with the drawing
    data = _read_inputs()
    train, grid, history = data["train.json"], data["grid.csv"], data["history.csv"]
    selected = train.get("run_id")
    run_name = train.get("run_name", selected)
    classes = load_stats(PREPARED).classes
    row = grid[grid["run_id"] == selected]
    stop_reason = row["stop_reason"].iloc[0] if not row.empty and "stop_reason" in row else None
    stop_reason = str(stop_reason) if isinstance(stop_reason, str) else None  # NaN when blank
    mistakes = data["mistakes.csv"]
    confusion = data["confusion.csv"]
    select_by = train.get("select_by") or objectives(params.select_by)[0]
    cost = train.get("select_cost")  # select_by [METRIC, COST]: the Pareto front the train stage selected on
    front = bool(cost) and cost in grid and "pareto_front" in grid and bool(grid["pareto_front"].astype(bool).any())
    trials = search_study.trial_table(grid, select_by, TRAINING_KEYS)
    compared, basis = search_study.comparable_trials(trials, history, select_by)  # halving: at the first rung
    skipped = search_study.insight_skip(compared)
    importances = None
    if skipped is None:
        try:
            importances = search_study.param_importances(compared, select_by, basis)
        except (ValueError, RuntimeError, ArithmeticError) as err:  # a degenerate study: the history still draws
            skipped = f"Optuna's importance evaluator failed: {one_line(str(err))}"
    notes = [f"no hyperparameter importance or slice figures: {skipped}"] if skipped else []

    names = {
        "Learning curves (selected run)": "learning_curves.png",
        "All grid runs": "grid_curves.png",
        "Grid comparison": "grid_comparison.png",
    }
    halving = "pruned" in grid and bool(grid["pruned"].astype(bool).any())
    if halving:
        names["Successive halving rungs"] = "halving_rungs.png"
    names["Search history"] = "search_history.png"
    if front:
        names[f"Pareto front: {select_by} against {cost}"] = "pareto_front.png"
    if importances is not None:
        names["Hyperparameter importance"] = "param_importance.png"
        names["Objective against the two most important hyperparameters"] = "param_slices.png"
    names.update({
        "Per-class accuracy": "per_class_accuracy.png",
        "Confusion matrix": "confusion_matrix.png",
        "Most confident mistakes": "mistakes.png",
    })
    cache = figure_store()  # an unchanged figure is copied back, not drawn again
    draw = functools.partial(draw_cached, cache=cache)
    with atomic_dir(FIGURES) as tmp:
        draw(learning_curves, history[history["run_id"] == selected], tmp / names["Learning curves (selected run)"],
             best_epoch=train.get("best_epoch"), title=f"Selected run: {run_name}", stop_reason=stop_reason)
        draw(grid_curves, history, tmp / names["All grid runs"], grid=grid, selected_run_id=selected)
        draw(grid_comparison, grid, tmp / names["Grid comparison"], select_by=train.get("select_by", "val_loss"),
             selected_run_id=selected)
        if halving:
            draw(halving_rungs, history, grid, tmp / names["Successive halving rungs"], selected_run_id=selected,
                 select_by=select_by)
        draw(study_figures.search_history, trials, tmp / names["Search history"], select_by=select_by,
             selected_run_id=selected)
        if front:
            draw(pareto_front, grid, tmp / "pareto_front.png", select_by=select_by, cost=cost,
                 max_cost=train.get("max_cost"), selected_run_id=selected)
        if importances is not None:
            draw(study_figures.param_importance, importances, tmp / names["Hyperparameter importance"],
                 select_by=select_by)
            draw(study_figures.param_slices, compared, importances,
                 tmp / names["Objective against the two most important hyperparameters"], select_by=select_by,
                 selected_run_id=selected)
        draw(per_class_bars, data["per_class.csv"], tmp / names["Per-class accuracy"],
             title="Per-class accuracy: train vs test")
        counts = confusion_from_pairs(confusion["actual"].astype(str), confusion["predicted"].astype(str), classes)
        draw(confusion_heatmap, counts, classes, tmp / names["Confusion matrix"])
        index = mistakes["index"].to_numpy(dtype=int)
        draw(mistakes_grid, load_images_numpy(PREPARED, "test")[index], mistakes["actual"].astype(str).tolist(),
             mistakes["predicted"].astype(str).tolist(), mistakes["confidence"].tolist(), tmp / names["Most confident mistakes"])
    figures = {caption: FIGURES / name for caption, name in names.items()}
    write_csv(SEARCH_HISTORY, search_study.history_table(trials))
    write_readme(README, train=train, grid=grid, metrics=data["metrics.json"], per_class=data["per_class.csv"],
                 figures=figures, training_keys=TRAINING_KEYS, notes=notes)
    reused = f" ({cache.hits} unchanged since last drawn: copied from {cache.root})" if cache.hits else ""
    print(f"plots: wrote {len(figures)} figures in {FIGURES}/{reused}, {SEARCH_HISTORY} and {README}", flush=True)
    for note in notes:
        print(f"plots: {note}", flush=True)

    if params.mlflow.enabled and train.get("mlflow_parent_run_id"):
        from cnnpipe.tracking import later_stages as tracking_stages
        from cnnpipe.tracking import connection as tracking_store

        parent = train["mlflow_parent_run_id"]
        # same layout as on disk, so the README's relative figure links work in the MLflow UI too
        if tracking_stages.log_evaluation(params.mlflow, parent_run_id=parent, files=list(figures.values()),
                                   artifact_path="report/figures", artifacts={"report": [README, SEARCH_HISTORY]}):
            print(f"mlflow: figures and README logged to parent run {parent} (artifacts: report/)")
    return 0


if __name__ == "__main__":
    answer_help(__file__, __doc__)
    run_entry_point(main)
