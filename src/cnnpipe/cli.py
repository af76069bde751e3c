"""The ``cnnpipe`` command: what is not a DVC stage.

Subcommands import their heavy dependencies (torch, mlflow) only when they
run, so ``cnnpipe --help`` and ``cnnpipe validate`` answer in well under a
second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _validate(args: argparse.Namespace) -> int:
    from cnnpipe.errors import ParamsError
    from cnnpipe.params import load_params
    from cnnpipe.search.space import expand

    params = load_params(args.params)
    try:
        runs = expand(params)  # draws the sampled points: a drawn value can still break its key's rule
    except ParamsError as err:
        raise ParamsError(err.message, source=args.params) from None
    grid = params.grid
    if grid.strategy == "halving":
        epochs = max(run.values.epochs for run in runs)
        rungs = ", ".join(map(str, grid.rungs(epochs)))
        strategy = f"successive halving (eta {grid.eta}, rungs at {rungs} epochs)"
    else:
        strategy = "exhaustive"
    print(f"{args.params}: ok — dataset {params.data.dataset}, {len(runs)} run(s) ({params.describe_grid()}), {strategy}")
    stops_on = sorted({run.values.monitor for run in runs} - {params.select_by})
    if stops_on:
        print(f"note: monitor {', '.join(stops_on)} stops runs early on another metric than select_by "
              f"{params.select_by} ranks them by (monitor: auto follows select_by)")
    return 0


def _show_model(args: argparse.Namespace) -> int:
    from cnnpipe.data.registry import get_dataset
    from cnnpipe.errors import ParamsError
    from cnnpipe.models.presets import PRESETS
    from cnnpipe.models.spec import normalize_layers, summary_text
    from cnnpipe.params import load_params

    params = load_params(args.params)
    dataset = get_dataset(args.dataset) if args.dataset else params.data.spec()
    if dataset.is_folder and not dataset.classes:  # your own images: classes are counted by prepare
        dataset = _folder_classes(dataset)
    if args.name in params.models:
        layers, where = list(params.models[args.name]), f"models.{args.name}"
    elif args.name in PRESETS:
        layers, where = list(PRESETS[args.name]), f"preset {args.name}"
    else:
        known = ", ".join([*params.models, *PRESETS])
        raise ParamsError(f"no model named {args.name!r}; known: {known}", source="")
    infos = normalize_layers(where, layers, dataset.image_shape, dataset.num_classes)
    print(summary_text(f"{args.name} on {dataset.name} {'x'.join(map(str, dataset.image_shape))}", infos, dataset.image_shape))
    return 0


def _folder_classes(dataset):  # type: ignore[no-untyped-def]
    """The folder dataset with the prepared classes when ``data/prepared`` holds it, else 2 placeholders."""
    import json
    from dataclasses import replace
    from pathlib import Path

    try:
        stats = json.loads(Path("data/prepared/stats.json").read_text())
        classes = tuple(stats["classes"]) if stats.get("dataset") == "folder" else ()
    except (OSError, ValueError, KeyError):
        classes = ()
    return replace(dataset, classes=classes or ("class 0", "class 1"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnpipe",
        description="cnnpipe: train, compare and ship CNN image classifiers (the pipeline itself runs with `dvc repro`).",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check params.yaml and print the grid size")
    p.set_defaults(func=_validate)

    p = sub.add_parser("show-model", help="print a model's layers, output shapes and parameter counts")
    p.add_argument("name", help="a preset or a name under models: in params.yaml")
    p.add_argument("--dataset", help="input shape and classes of this dataset (default: data.dataset)")
    p.set_defaults(func=_show_model)

    from cnnpipe import cachectl

    cachectl.register(sub)
    # predict, export-images, runs, ui: our own module, never guarded (a bug there must show, not hide them);
    # it imports its heavy dependencies inside each handler.
    from cnnpipe import commands

    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from cnnpipe.errors import run_entry_point

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(0)
    run_entry_point(lambda: args.func(args))


if __name__ == "__main__":
    main(sys.argv[1:])
