"""DVC stage ``train``: train the hyperparameter grid, keep the best run.

Reads ``params.yaml``, ``data/prepared/`` and ``data/weights/`` (pretrained torchvision weights); writes ``models/best/`` (the
selected run's checkpoint) and ``reports/{grid,history,curves,pareto_front}.csv``,
``reports/grid.json``, ``reports/train.json``. With ``select_by: [METRIC, COST]``
the selection is on the Pareto front of the two (``cnnpipe.search.pareto``). Every run is tracked in MLflow
(one parent run, one child per grid point) unless ``mlflow.enabled: false``.
Runs execute in parallel worker processes or on Ray per ``grid:``, and a
run whose config, data and code are unchanged is reused from the run cache
(``.cnnpipe-cache/`` at the project root) instead of trained again.
Paths are cwd-relative (a queued experiment runs in a temp copy); the MLflow
store and the run cache are anchored at the project root.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from cnnpipe.codegraph.stage_deps import check_code_deps
from cnnpipe.util.errors import run_entry_point

PREPARED = Path("data/prepared")
WEIGHTS = Path("data/weights")  # the weights stage's output: pretrained torchvision weights, pinned
BEST_DIR = Path("models/best")
REPORTS = Path("reports")
SAMPLES = REPORTS / "samples.png"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="stages/train.py",
        description="Train every grid point of params.yaml, log them to MLflow, write models/best/ and reports/. "
                    "Normally run by `dvc repro`.",
    )
    parser.add_argument("--no-cache", action="store_true",
                        help="retrain every run instead of reusing cached ones (fresh results are still cached; "
                             "same as CNNPIPE_NO_CACHE=1; grid.cache: false turns the cache off)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    check_code_deps(__file__)  # dvc.yaml must declare every package this stage runs
    from cnnpipe.tracking import runs as tracking_runs
    from cnnpipe.tracking import connection as tracking_store
    from cnnpipe.reports import train_files
    from cnnpipe.serving import publish
    from cnnpipe.store import run_cache as runs
    from cnnpipe.params.load import load_params
    from cnnpipe.search import ask_tell, payloads, runner, space, strategies
    from cnnpipe.store.states import RunStateStore
    from cnnpipe.search.pareto import choose
    from cnnpipe.search.trial import TrainContext

    params = load_params()
    tpe = params.grid.strategy == "tpe"
    if tpe:  # trials are suggested batch by batch; a range end that breaks its key's rule stops here
        trial_space = space.TrialSpace(params, weights_dir=WEIGHTS)
        planned, at_once = params.grid.samples, min(params.grid.batch, params.grid.samples)
    else:
        configs = space.expand(params, weights_dir=WEIGHTS)  # pins pretrained weights by SHA-256 (never downloads)
        planned = at_once = len(configs)
    target = tracking_store.preflight(params.mlflow)  # one-line TrackingError before any training

    from cnnpipe.compute.device import describe, resolve_device
    from cnnpipe.engine.data import TrainData
    from cnnpipe.search.backend_choice import make_executor

    device = resolve_device(params.device)
    executor = make_executor(params.grid, at_once, device=device)  # ray missing: fail now
    executor.start()  # a Ray cluster that is unreachable or refuses us: one line, before any data or MLflow run
    data = TrainData.load(PREPARED, splits=("train", "val"))
    runner.check_dataset(data, params)
    print(f"train: {planned} run(s) on {describe(device)}, {data.dataset} "
          f"({len(data.train)} train / {len(data.val)} val images), select_by {params.describe_selection()}", flush=True)

    cache = runs.open_grid_cache(params.grid, no_cache=args.no_cache)
    from cnnpipe.data.registry import get_dataset

    source = params.data.source if get_dataset(params.data.dataset).is_folder else str(PREPARED)
    tracker = tracking_runs.open_tracker(params.mlflow, target=target, params=payloads.search_definition(params),
                                         tags=payloads.parent_tags(params, data, device),
                                         dataset=(params.data.dataset, data.fingerprint, source))
    strategy = strategies.make_strategy(params.grid)
    with tracker.running():
        layer_stats = params.mlflow.enabled and params.mlflow.log_layer_stats
        states = RunStateStore()
        ctx = TrainContext(data=data, tracker=tracker, device=device, layer_stats=layer_stats, progress=True,
                           prepared_dir=PREPARED.resolve(), state_root=states.root,
                           samples=SAMPLES if SAMPLES.is_file() else None)
        say = lambda line: print(line, flush=True)  # noqa: E731
        if tpe:
            records = ask_tell.run_tpe(params, ctx, space=trial_space, executor=executor, cache=cache, states=states,
                                       report=say)
        else:
            records = runner.run_search(configs, ctx, strategy=strategy, executor=executor,
                                        select_by=params.select_metric, cache=cache, states=states, report=say)
        metric, cost, max_cost = params.select_metric, params.select_cost, params.max_cost
        best = choose([rec for rec in records if not rec.pruned], metric, cost, max_cost,
                      in_shape=data.image_shape, num_classes=data.num_classes)
        published = publish.publish(records, best, data, tracker, select_by=metric, select_cost=cost,
                                    max_cost=max_cost, best_dir=BEST_DIR, reports_dir=REPORTS, prepared_dir=PREPARED)

    print(train_files.summary_table(records, best, metric, cost, max_cost))
    print(published.describe(), flush=True)
    if tracker.lost:  # outputs are written, but MLflow's record is partial: fail so DVC does not lock it as done
        from cnnpipe.util.errors import TrackingError

        raise TrackingError(f"{tracker.lost}; training finished and {BEST_DIR}/ and {REPORTS}/ were written, but MLflow "
                            "logging stopped part-way; restart the store and re-run dvc repro")
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    run_entry_point(lambda: main(arguments))
