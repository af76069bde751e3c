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
    from cnnpipe.params import expand_grid, load_params

    params = load_params(args.params)
    runs = expand_grid(params)
    axes = " x ".join(f"{key}({len(params.training[key])})" for key in params.axes) or "no grid axes"
    print(f"{args.params}: ok — dataset {params.data.dataset}, {len(runs)} run(s) ({axes})")
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

    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction) -> None:
    """Subcommands that live in their own modules (predict, runs, ui)."""
    try:
        from cnnpipe import commands
    except ImportError:
        return
    commands.register(sub)


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
