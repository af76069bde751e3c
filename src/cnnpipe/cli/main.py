"""The ``cnnpipe`` command: what is not a DVC stage.

Subcommands import their heavy dependencies (torch, mlflow) only when they
run, so ``cnnpipe --help`` and ``cnnpipe validate`` answer in well under a
second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING
from cnnpipe.cli import commands
from cnnpipe.data.registry import get_dataset
from cnnpipe.models import torchvision_spec
from cnnpipe.models.checkpoint import load_checkpoint
from cnnpipe.models.spec import normalize_layers, summary_text
from cnnpipe.models.torchvision_spec import spec_of
from cnnpipe.serving.export import FORMATS, INPUT_NAME, export_checkpoint, sample_images
from cnnpipe.store import inventory
from cnnpipe.tracking.model_registry import describe_version, download_checkpoint
from cnnpipe.util.errors import CnnpipeError, ParamsError, run_entry_point

if TYPE_CHECKING:
    from cnnpipe.params.schema import Params


def _validate(args: argparse.Namespace) -> int:
    from cnnpipe.params.load import load_params
    from cnnpipe.search.space import TrialSpace, expand

    params = load_params(args.params)
    grid = params.grid
    try:
        if grid.strategy == "tpe":  # checks every range's ends: the sampler may suggest any value of a range
            space = TrialSpace(params)
            count, epochs, monitors = grid.samples, space.longest, space.monitors
        else:
            runs = expand(params)  # draws the sampled points: a drawn value can still break its key's rule
            count, epochs, monitors = len(runs), max(run.values.epochs for run in runs), {r.values.monitor for r in runs}
    except ParamsError as err:
        raise ParamsError(err.message, source=args.params) from None
    halving = f"successive halving (eta {grid.eta}, rungs at {', '.join(map(str, grid.rungs(epochs)))} epochs)"
    strategy = halving if grid.strategy == "halving" else "exhaustive"
    if grid.strategy == "tpe":
        strategy = f"tpe (Optuna TPE, batches of {grid.batch}, search_seed {grid.search_seed})"
        strategy += f", {halving} in each batch" if grid.prune == "halving" else ""
    print(f"{args.params}: ok — dataset {params.data.dataset}, {count} run(s) ({params.describe_grid()}), {strategy}")
    if params.select_cost:
        print(f"select_by {params.describe_selection()}")
    stops_on = sorted(monitors - {params.select_metric})
    if stops_on:
        print(f"note: monitor {', '.join(stops_on)} stops runs early on another metric than select_by "
              f"{params.select_metric} ranks them by (monitor: auto follows select_by)")
    return 0


def _show_model(args: argparse.Namespace) -> int:
    from cnnpipe.models.presets import PRESETS
    from cnnpipe.params.load import load_params

    params = load_params(args.params)
    if args.name.startswith("models:/"):
        return _show_registered(args.name, params)
    dataset = get_dataset(args.dataset) if args.dataset else params.data.spec()
    if dataset.is_folder and not dataset.classes:  # your own images: classes are counted by prepare
        dataset = _folder_classes(dataset)

    if torchvision_spec.is_name(args.name) and args.name not in params.models:
        try:
            torchvision_spec.check_arch(torchvision_spec.arch_of(args.name), "show-model")
        except ValueError as err:
            raise ParamsError(str(err), source="") from None
        from cnnpipe.models.torchvision_nets import model_summary

        arch = torchvision_spec.arch_of(args.name)
        spec = torchvision_spec.layer_spec(arch, "none", dataset.image_shape[0])[0]
        print(model_summary(f"{args.name} on {dataset.name} {'x'.join(map(str, dataset.image_shape))}", spec,
                            dataset.image_shape, dataset.num_classes))
        return 0
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


def _show_registered(uri: str, params: "Params") -> int:
    """``show-model models:/NAME@ALIAS``: the registered version, its links, and its layers."""
    from cnnpipe.tracking.connection import make_client as _make_client, resolve_store

    store = resolve_store(params.mlflow)
    header, sidecar = describe_version(_make_client(store.uri), uri, store.uri)
    shape = tuple(int(d) for d in sidecar["in_shape"])
    title = f"{sidecar.get('model', '?')} on {sidecar.get('dataset', '?')} {'x'.join(map(str, shape))}"
    print(header)

    spec = spec_of(sidecar["layers"])
    if spec is not None:
        from cnnpipe.models.torchvision_nets import model_summary

        print(model_summary(title, spec, shape, int(sidecar["num_classes"])))
        return 0
    infos = normalize_layers(f"{uri} model.json", list(sidecar["layers"]), shape, int(sidecar["num_classes"]))
    print(summary_text(title, infos, shape))
    return 0


def _export(args: argparse.Namespace) -> int:
    """``cnnpipe export``: ONNX and TorchScript files of a checkpoint, each verified before it is kept."""
    import tempfile
    from pathlib import Path

    from cnnpipe.params.load import load_params
    if args.count < 1:
        raise CnnpipeError(f"-n must be at least 1, got {args.count}")
    if not (Path(args.prepared) / "stats.json").is_file():
        raise CnnpipeError(f"{args.prepared} has no prepared data to verify the export on; run dvc repro prepare "
                           "or pass --prepared DIR")
    formats = FORMATS if args.format == "all" else (args.format,)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-export-") as tmp:
        folder = Path(args.model)
        if args.model.startswith("models:/"):
            from cnnpipe.tracking.connection import make_client as _make_client, resolve_store

            store = resolve_store(load_params(args.params).mlflow)
            folder = download_checkpoint(_make_client(store.uri), args.model, store.uri, tmp)
        checkpoint = load_checkpoint(folder)
        images = sample_images(args.prepared, args.count)
        for result in export_checkpoint(checkpoint, images, args.out, formats=formats):
            print(result.describe())
    print(f"input: {INPUT_NAME} uint8 N x {' x '.join(map(str, checkpoint.sidecar['in_shape']))} (raw 0-255, "
          f"normalization included); output: logits N x {checkpoint.sidecar['num_classes']}, classes in order: "
          f"{', '.join(checkpoint.sidecar.get('classes') or [])}")
    return 0


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
    p.add_argument("name", help="a preset, a name under models: in params.yaml, torchvision:NAME, or a registered model "
                                "(models:/cnnpipe-classifier@champion, models:/cnnpipe-classifier/3)")
    p.add_argument("--dataset", help="input shape and classes of this dataset (default: data.dataset)")
    p.set_defaults(func=_show_model)

    p = sub.add_parser("export", help="write the model as ONNX and TorchScript (raw pixels in), verified against PyTorch")
    p.add_argument("--model", default="models/best",
                   help="checkpoint folder or models:/NAME@ALIAS (default: models/best)")
    p.add_argument("--out", default="exports", help="folder to write model.onnx / model.torchscript.pt into (default: exports)")
    p.add_argument("--format", choices=("all", "onnx", "torchscript"), default="all", help="what to write (default: all)")
    p.add_argument("--prepared", default="data/prepared", help="prepared data whose test images check the export")
    p.add_argument("-n", "--count", type=int, default=256, help="test images to verify on (default: 256)")
    p.set_defaults(func=_export)

    inventory.register(sub)
    # predict, export-images, runs, ui: our own module, never guarded (a bug there must show, not hide them);
    # it imports its heavy dependencies inside each handler.

    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(0)
    run_entry_point(lambda: args.func(args))


if __name__ == "__main__":
    main(sys.argv[1:])
