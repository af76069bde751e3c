"""What a search learned (``cnnpipe.figures.study_figures``): history, importance and slices from a grid.csv."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from cnnpipe.figures import figure_cache, search_study, study_figures
from cnnpipe.params.values import TRAINING_KEYS
from test_plots import assert_png

# trial: (status, val_loss, val_top1, pruned); trial 3 failed, trial 5 was pruned with a value that would win
TRIALS = [("finished", 0.50, 0.80, False), ("finished", 0.40, 0.85, False), ("failed", None, None, False),
          ("finished", 0.45, 0.90, False), ("paused", 0.10, 0.99, True), ("diverged", 0.30, 0.83, False),
          ("finished", 0.35, 0.88, False)]


def read_back(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` through CSV, as the plots stage reads grid.csv."""
    return pd.read_csv(io.StringIO(frame.to_csv(index=False)))


def history_grid() -> pd.DataFrame:
    return read_back(pd.DataFrame([
        {"run_id": f"r{i}", "run_name": f"lr={0.1 / (i + 1):.4g}", "model": "small_bn", "lr": 0.1 / (i + 1),
         "batch_size": 64, "status": status, "val_loss": loss, "val_top1": top1, "pruned": pruned}
        for i, (status, loss, top1, pruned) in enumerate(TRIALS)]))


@pytest.mark.parametrize(("select_by", "best"), [
    ("val_loss", [0.50, 0.40, 0.40, 0.40, 0.40, 0.30, 0.30]),  # the pruned 0.10 never becomes the best
    ("val_top1", [0.80, 0.85, 0.85, 0.90, 0.90, 0.90, 0.90]),
])
def test_history_has_each_trials_objective_and_the_best_so_far(tmp_path, select_by: str, best: list[float]) -> None:
    trials = search_study.trial_table(history_grid(), select_by, TRAINING_KEYS)
    table = search_study.history_table(trials)
    assert list(table.columns) == ["trial", "run_name", "status", "objective", "best_so_far"]
    assert table["trial"].tolist() == list(range(1, 8))
    assert table["status"].tolist() == ["finished", "finished", "failed", "finished", "pruned", "diverged", "finished"]
    column = [t[1 if select_by == "val_loss" else 2] for t in TRIALS]
    assert [None if v == "NaN" else v for v in table["objective"]] == column
    assert table["best_so_far"].tolist() == pytest.approx(best)
    written = tmp_path / "search_history.csv"
    table.to_csv(written, index=False)
    assert written.read_text().splitlines()[3] == f"3,lr=0.03333,failed,NaN,{best[2]}"  # not an empty cell
    assert pd.read_csv(written)["objective"].isna().tolist() == [v is None for v in column]  # NaN reads back as NaN
    assert trials["candidate"].tolist() == [True, True, False, True, False, True, True]
    assert search_study.table_axes(trials) == ["lr"]  # model and batch_size are the same in every trial

    first = read_back(pd.DataFrame({"run_id": ["a", "b"], "status": ["failed", "finished"], select_by: [None, 0.5]}))
    assert search_study.trial_table(first, select_by, TRAINING_KEYS)["best_so_far"].isna().tolist() == [True, False]

    selected = "r5" if select_by == "val_loss" else "r3"
    fig = study_figures.search_history_figure(trials, select_by=select_by, selected_run_id=selected)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "best so far" in labels and "failed: no value (1)" in labels
    assert any(label.startswith("pruned") for label in labels)
    assert any(label.startswith("selected: trial") for label in labels)
    assert ("minimized" if select_by == "val_loss" else "maximized") in fig.axes[0].get_title()
    assert_png(study_figures.search_history(trials, tmp_path / "history.png", select_by=select_by), (10, 5))


def driven_grid(n: int = 12) -> pd.DataFrame:
    """``n`` trials where lr (log-uniform) sets val_loss and batch_size and optimizer are noise."""
    rng = np.random.default_rng(7)
    lr = 10 ** rng.uniform(-4, -1, n)
    rows = [{"run_id": f"t{i}", "run_name": f"t{i}", "model": "small_bn", "lr": float(f"{lr[i]:.4g}"),
             "batch_size": int(rng.choice([32, 64, 128, 256])), "optimizer": str(rng.choice(["adam", "sgd"])),
             "nesterov": bool(rng.integers(2)), "status": "finished",
             "val_loss": 0.25 + 0.1 * abs(math.log10(lr[i]) + 2.5) + 0.002 * rng.normal(), "pruned": False}
            for i in range(n)]
    return read_back(pd.DataFrame(rows))


def test_importance_ranks_the_axis_that_drives_the_objective_first_and_is_repeatable() -> None:
    trials = search_study.trial_table(driven_grid(), "val_loss", TRAINING_KEYS)
    assert search_study.table_axes(trials) == ["lr", "batch_size", "optimizer", "nesterov"]
    assert search_study.insight_skip(trials) is None
    found = search_study.param_importances(trials, "val_loss")
    assert found.names[0] == "lr" and sorted(found.names) == ["batch_size", "lr", "nesterov", "optimizer"]
    shares = dict(found.values)
    assert shares["lr"] > 2 * max(shares["batch_size"], shares["optimizer"], shares["nesterov"]), shares
    assert sum(shares.values()) == pytest.approx(1.0)
    assert found.trials == 12 and found.log_axes == ("lr",) and found.method.startswith("fANOVA")
    assert search_study.param_importances(trials, "val_loss") == found  # seeded: the same trials, the same numbers

    # the axes as Optuna reads them: a decade-spanning number on a log scale, ints as ints, the rest as choices
    grid = driven_grid()
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert search_study.axis_distribution(grid["lr"]) == FloatDistribution(grid["lr"].min(), grid["lr"].max(), log=True)
    assert search_study.axis_distribution(grid["batch_size"]) == IntDistribution(32, 256, log=False)
    assert isinstance(search_study.axis_distribution(grid["optimizer"]), CategoricalDistribution)
    assert search_study.axis_distribution(grid["nesterov"]).choices in ((True, False), (False, True))


def test_importance_and_slice_figures_are_drawn(tmp_path) -> None:
    grid = driven_grid()
    grid.loc[3, "val_loss"] = 40.0  # a diverged-looking trial: clipped on the loss axis, not flattening the others
    trials = search_study.trial_table(grid, "val_loss", TRAINING_KEYS)
    found = search_study.param_importances(trials, "val_loss")
    bars = study_figures.param_importance_figure(found, select_by="val_loss").axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()][0] == found.names[0] + (
        " (log scale)" if found.names[0] == "lr" else "")
    assert_png(study_figures.param_importance(found, tmp_path / "importance.png"), (9, 1.8 + 0.45 * 4))

    fig = study_figures.param_slices_figure(trials, found, selected_run_id="t0")
    panels = fig.axes[:2]
    assert [ax.get_xlabel().split(":")[0].removesuffix(" (log scale)") for ax in panels] == found.names[:2]
    lr_panel = panels[found.names.index("lr")] if "lr" in found.names[:2] else None
    if lr_panel is not None:
        assert lr_panel.get_xscale() == "log"
    assert panels[0].get_yscale() == "log" and panels[0].get_ylim()[1] < 40  # clipped at 10x the median
    assert "clipped" in fig._suptitle.get_text()
    assert_png(study_figures.param_slices(trials, found, tmp_path / "slices.png", selected_run_id="t0"), (13, 4.8))

    top1 = read_back(grid.assign(val_top1=1 - grid["val_loss"].clip(upper=1) / 2))
    trials1 = search_study.trial_table(top1, "val_top1", TRAINING_KEYS)
    found1 = search_study.param_importances(trials1, "val_top1")
    assert study_figures.param_slices_figure(trials1, found1, select_by="val_top1").axes[0].get_yscale() == "linear"

    # the numbers a figure draws are part of its cache key
    other = search_study.Importances(found.method, found.trials, tuple(reversed(found.values)), found.log_axes)
    assert figure_cache.figure_key(study_figures.param_importance, found, "x.png") != \
        figure_cache.figure_key(study_figures.param_importance, other, "x.png")
    again = search_study.param_importances(trials, "val_loss")
    assert figure_cache.figure_key(study_figures.param_importance, found, "x.png") == \
        figure_cache.figure_key(study_figures.param_importance, again, "y.png")


def test_too_few_axes_or_trials_skip_the_importance_with_one_line() -> None:
    same = driven_grid().assign(batch_size=64, optimizer="adam", nesterov=False)
    one_axis = search_study.trial_table(same, "val_loss", TRAINING_KEYS)
    reason = search_study.insight_skip(one_axis)
    assert reason == "1 search axis varies (lr) across the finished trials; they need 2"
    assert search_study.insight_skip(search_study.trial_table(driven_grid(3), "val_loss", TRAINING_KEYS)) == \
        "3 finished trial(s); they need 4"
    single = search_study.trial_table(driven_grid(1), "val_loss", TRAINING_KEYS)
    assert search_study.insight_skip(single) == "no search axis varies across the finished trials; they need 2"
    flat = search_study.trial_table(driven_grid().assign(val_loss=0.3), "val_loss", TRAINING_KEYS)
    assert search_study.insight_skip(flat) == "every finished trial has the same objective"
    assert study_figures.search_history_figure(single, selected_run_id="t0").axes  # the history still draws


def test_after_successive_halving_every_trial_is_compared_at_the_first_rung() -> None:
    """9 trials, 3 finalists: too few alone, so importance reads all 9 at epoch 1, where each was measured."""
    import itertools

    rows, history = [], []
    for i, (lr, bs) in enumerate(itertools.product([0.1, 0.01, 0.001], [32, 64, 128])):
        finalist = i in (3, 4, 5)
        losses = [(0.4 + abs(math.log10(lr) + 2)) / e + 0.001 * i for e in range(1, 4 if finalist else 2)]
        rows.append({"run_id": f"h{i}", "run_name": f"h{i}", "lr": lr, "batch_size": bs,
                     "status": "finished" if finalist else "paused", "val_loss": min(losses), "pruned": not finalist})
        history += [{"run_id": f"h{i}", "epoch": e, "val_loss": v} for e, v in enumerate(losses, 1)]
    trials = search_study.trial_table(read_back(pd.DataFrame(rows)), "val_loss", TRAINING_KEYS)
    assert search_study.insight_skip(trials) is not None  # the 3 finalists alone (one lr) say nothing
    compared, basis = search_study.comparable_trials(trials, pd.DataFrame(history), "val_loss")
    assert basis.startswith("best up to epoch 1, halving's first rung")
    assert compared["candidate"].all() and search_study.insight_skip(compared) is None
    assert compared["objective"].tolist() == pytest.approx([h["val_loss"] for h in history if h["epoch"] == 1])
    found = search_study.param_importances(compared, "val_loss", basis)
    assert found.names[0] == "lr" and found.trials == 9 and found.basis == basis
    assert search_study.comparable_trials(search_study.trial_table(driven_grid(), "val_loss", TRAINING_KEYS),
                                          pd.DataFrame(history), "val_loss")[1] == search_study.BEST_EPOCH
