"""``cnnpipe predict | export-images | runs | ui``: the subcommands that need torch, pandas or mlflow.

Registered into the argparse tree by ``cnnpipe.cli.main``; every heavy import
happens inside the handler, so ``cnnpipe --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from cnnpipe.util.errors import CnnpipeError
from cnnpipe.models.checkpoint import load_checkpoint
from cnnpipe.serving.classify import probabilities

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files or folders with a trained checkpoint")
    p.add_argument("images", nargs="+", help="PNG/JPEG files or folders of them")
    p.add_argument("--model", default="models/best", help="checkpoint folder (default: models/best)")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export-images", help="write prepared images as PNG files (to try predict on)")
    p.add_argument("out", help="folder to write into (created if missing)")
    p.add_argument("--split", choices=("train", "val", "test", "all"), default="test",
                   help="which split (default: test; all: every split, with --layout folders)")
    p.add_argument("-n", "--count", type=int, default=None,
                   help="how many images per split, from the first (default: 8; with --layout folders: all)")
    p.add_argument("--layout", choices=("flat", "folders"), default="flat",
                   help="flat: <split>_<index>_<class>.png (default); folders: <split>/<NN-class>/<index>.png, "
                        "a class-per-folder tree that data.dataset: folder trains on with the same labels and order")
    p.add_argument("--prepared", default="data/prepared", help="prepared-data folder (default: data/prepared)")
    p.set_defaults(func=_export_images)

    p = sub.add_parser("runs", help="print the grid table of the last train stage")
    p.add_argument("--reports", default="reports", help="reports folder (default: reports)")
    p.add_argument("--all-columns", action="store_true", help="show every param column")
    p.set_defaults(func=_runs)

    p = sub.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1, this machine only)")
    p.add_argument("--workers", type=int, default=1, help="server processes (default: 1, enough for one user)")
    p.set_defaults(func=_ui)


# --------------------------------------------------------------------------- predict


def collect_images(paths: list[str]) -> list[Path]:
    """Expand folders (non-recursive, sorted); refuse missing paths and empty folders."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise CnnpipeError(f"{path}: folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); point at image files or another folder")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise CnnpipeError(f"{path}: no such file or folder")
    return found


def load_image(path: Path, shape: tuple[int, int, int], *, note_resize: bool = True) -> tuple[Any, list[str]]:
    """Read ``path`` as a uint8 C x H x W array matching ``shape``; return notes on conversions.

    Anything the model did not see in training (colour vs grayscale, another
    size, 16-bit depth, transparency) is converted *and said*, so a surprising
    prediction has a visible reason. The conversion is ``prepare``'s own
    (cnnpipe.data.images), so a folder-trained model sees what it trained on;
    such a model resized every training image, so resizing is not noted.
    """
    from cnnpipe.data.images import ImageProblem, to_array

    channels, height, width = shape
    try:
        return to_array(path, channels, (height, width), note_resize=note_resize)
    except ImageProblem as err:
        raise UnreadableImage(path, err.reason) from None


class UnreadableImage(CnnpipeError):
    """One input file that is not a usable image; ``predict`` reports it and goes on with the others."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: not a readable image ({reason}); give a PNG or JPEG file")


def predict_files(model_dir: str, files: list[Path], top_k: int) -> list[dict[str, Any]]:
    """Top-k classes per image, with the checkpoint's own normalization and class names.

    One entry per file, in order. A file that cannot be read gets an entry
    with an ``error`` field instead of ``predictions``: one truncated photo
    among a thousand must not cost the answer for the other 999.
    """
    import numpy as np
    import torch

    checkpoint = load_checkpoint(model_dir)
    sidecar = checkpoint.sidecar
    classes = list(sidecar["classes"])
    shape = tuple(sidecar["in_shape"])
    trained_resized = sidecar.get("dataset") == "folder"  # prepare resized every training image to in_shape
    if not 1 <= top_k <= len(classes):
        raise CnnpipeError(f"--top-k must be between 1 and {len(classes)} (the number of classes), got {top_k}")
    results: list[dict[str, Any]] = []
    arrays, readable = [], []
    for path in files:
        try:
            array, note = load_image(path, shape, note_resize=not trained_resized)  # type: ignore[arg-type]
        except UnreadableImage as err:
            results.append({"image": str(path), "error": f"not a readable image ({err.reason})"})
            continue
        arrays.append(array)
        readable.append({"image": str(path), "predictions": [], "notes": note})
        results.append(readable[-1])
    if arrays:
        probs = torch.from_numpy(probabilities(checkpoint, np.stack(arrays)))  # the pyfunc model's numbers too
        values, indices = probs.topk(top_k, dim=1)
        for result, vals, idxs in zip(readable, values.tolist(), indices.tolist()):
            result["predictions"] = [{"class": classes[i], "index": i, "probability": round(v, 6)}
                                     for v, i in zip(vals, idxs)]
    return results


SHOWN_UNREADABLE = 5  # unreadable files named on the error line; the rest are counted


def unreadable_line(results: list[dict[str, Any]]) -> str | None:
    """One line naming the first unreadable files and counting all of them (None when every file was read)."""
    bad = [r for r in results if "error" in r]
    if not bad:
        return None
    if len(results) == 1:
        return f"error: {bad[0]['image']}: {bad[0]['error']}; give a PNG or JPEG file"
    named = ", ".join(f"{r['image']} ({r['error'].removeprefix('not a readable image ').strip('()')})"
                      for r in bad[:SHOWN_UNREADABLE])
    more = f" and {len(bad) - SHOWN_UNREADABLE} more" if len(bad) > SHOWN_UNREADABLE else ""
    return (f"error: {len(bad)} of {len(results)} images are unreadable and were not predicted: {named}{more}; "
            "replace or remove them (the others were predicted)")


def _predict(args: argparse.Namespace) -> int:
    files = collect_images(args.images)
    results = predict_files(args.model, files, args.top_k)
    for result in results:
        for note in result.get("notes", ()):
            print(f"warning: {result['image']}: {note}", file=sys.stderr)
    if args.json:
        for result in results:
            print(json.dumps(result))
    else:
        predicted = [r for r in results if "error" not in r]
        width = max((len(r["image"]) for r in predicted), default=0)
        for result in predicted:
            best = "  ".join(f"{p['class']} {p['probability']:.1%}" for p in result["predictions"])
            print(f"{result['image']:<{width}}  {best}")
    problem = unreadable_line(results)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- export-images


def _pil_image(array: Any) -> Any:
    from PIL import Image

    return Image.fromarray(array[0], mode="L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), mode="RGB")


def _safe_name(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label).strip("-") or "class"


def class_folder_names(classes: list[str]) -> list[str]:
    """``03-Dress``: the index prefix makes sorted folder order the label order (and keeps names unique)."""
    width = len(str(len(classes) - 1))
    return [f"{index:0{width}d}-{_safe_name(name)}" for index, name in enumerate(classes)]


def export_images(prepared: str, split: str, count: int | None, out: Path, layout: str = "flat") -> list[Path]:
    """Write prepared images as PNGs.

    ``flat``: the first ``count`` images of ``split`` as ``<split>_<index>_<class>.png``.
    ``folders``: ``<out>/<split>/<NN-class>/<index>.png`` (every split for ``all``); file names
    are the position in the split, which the folder dataset sorts by, so preparing the tree
    with ``data.dataset: folder`` gives back the same splits, labels and order.
    """
    from cnnpipe.data.prepared import SPLITS, load_split, load_stats

    if count is not None and count < 1:
        raise CnnpipeError(f"-n must be at least 1, got {count}")
    if split == "all" and layout != "folders":
        raise CnnpipeError("--split all needs --layout folders (a flat folder would mix the splits)")
    stats = load_stats(prepared)
    folders = class_folder_names(stats.classes)
    written = []
    for name in (SPLITS if split == "all" else (split,)):
        data = load_split(prepared, name)
        limit = len(data) if count is None and layout == "folders" else min(count or 8, len(data))
        width = max(5, len(str(len(data))))
        if layout == "folders":
            for folder in folders:
                (out / name / folder).mkdir(parents=True, exist_ok=True)
        else:
            out.mkdir(parents=True, exist_ok=True)
        for index in range(limit):
            label = int(data.labels[index])
            if layout == "folders":
                path = out / name / folders[label] / f"{index:0{width}d}.png"
            else:
                path = out / f"{name}_{index:05d}_{_safe_name(stats.classes[label])}.png"
            _pil_image(data.images[index].numpy()).save(path)
            written.append(path)
    return written


def _export_images(args: argparse.Namespace) -> int:
    if not (Path(args.prepared) / "stats.json").is_file():
        raise CnnpipeError(f"{args.prepared} has no prepared data; run the prepare stage first (dvc repro prepare)")
    written = export_images(args.prepared, args.split, args.count, Path(args.out), args.layout)
    if args.layout == "folders":
        print(f"wrote {len(written)} image(s) to {args.out}/ as a class-per-folder tree "
              f"(train it: data.dataset: folder, data.source: {args.out})")
    else:
        print(f"wrote {len(written)} {args.split} image(s) to {args.out}/ (true class in each file name)")
    return 0


# --------------------------------------------------------------------------- runs


def _runs(args: argparse.Namespace) -> int:
    import pandas as pd

    path = Path(args.reports) / "grid.csv"
    if not path.is_file():
        raise CnnpipeError(f"{path} not found; run the train stage first (dvc repro train)")
    # ids are hex strings: an all-digit one ("0123456789") must not become the number 123456789
    table = pd.read_csv(path, dtype={"run_id": str, "run_name": str, "mlflow_run_id": str})
    train_json = Path(args.reports) / "train.json"
    selected = json.loads(train_json.read_text()).get("run_id") if train_json.is_file() else None
    table.insert(0, "best", ["*" if run == selected else "" for run in table["run_id"]])
    if not args.all_columns:
        axes = [c for c in table.columns if c in _training_keys() and table[c].nunique() > 1]
        keep = ["best", "run_id", "run_name", *axes, "status", "best_epoch", "epochs_run", "val_loss", "val_top1", "val_top5", "seconds"]
        table = table[[c for c in keep if c in table.columns]]
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def _training_keys() -> tuple[str, ...]:
    from cnnpipe.params.values import TRAINING_KEYS

    return TRAINING_KEYS


# --------------------------------------------------------------------------- ui


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ui_command(tracking_uri: str, artifact_root: str | None, host: str, port: int, workers: int) -> list[str]:
    """The ``mlflow ui`` command line for a local store (this venv's mlflow)."""
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    if not Path(mlflow_bin).is_file():
        mlflow_bin = shutil.which("mlflow") or mlflow_bin
    command = [mlflow_bin, "ui", "--backend-store-uri", tracking_uri]
    if artifact_root:
        command += ["--default-artifact-root", artifact_root]
    return command + ["--host", host, "--port", str(port), "--workers", str(workers)]


def _ui(args: argparse.Namespace) -> int:
    from cnnpipe.params.load import load_params
    from cnnpipe.tracking.connection import resolve_store, ui_url

    params = load_params(args.params)
    store = resolve_store(params.mlflow)
    if store.is_remote:
        print(f"MLflow runs are on the tracking server {store.tracking_uri} ({store.origin}): open it in a browser")
        return 0
    if store.tracking_uri.startswith("sqlite:///"):
        db = Path(store.tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise CnnpipeError(f"no MLflow store at {db} yet; run the pipeline first (dvc repro), "
                               "or set MLFLOW_TRACKING_URI to your tracking server")
    if not _port_free(args.host, args.port):
        raise CnnpipeError(f"port {args.port} on {args.host} is in use (another MLflow UI?); "
                           f"open http://{args.host}:{args.port} or pass --port N")
    command = ui_command(store.tracking_uri, store.artifact_location, args.host, args.port, args.workers)
    url = ui_url(store, params.mlflow.experiment, f"http://{args.host}:{args.port}")  # opens on the runs table
    print(f"MLflow UI for {store.tracking_uri}: {url}  (Ctrl-C or kill {os.getpid()} to stop; it answers after ~25 s)",
          flush=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return serve_group(command, env)


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
STOP_GRACE_S = 10.0  # mlflow's own graceful shutdown, before the group is killed


def serve_group(command: list[str], env: dict[str, str]) -> int:
    """Run ``command`` (``mlflow ui``) in a process group of its own until it exits or we are signalled.

    ``mlflow ui`` starts uvicorn workers and job-runner consumers that outlive
    it: an ``exec`` into mlflow let ``kill PID`` end mlflow alone and leave
    them serving on the port. So Ctrl-C, ``kill PID`` or a closed terminal
    (SIGINT / SIGTERM / SIGHUP) is forwarded to the whole group, and whatever
    is still in it when mlflow has exited gets SIGTERM, then SIGKILL.
    """
    import signal
    import subprocess

    try:
        proc = subprocess.Popen(command, env=env, start_new_session=True)
    except OSError as err:
        raise CnnpipeError(f"cannot start {command[0]} ({err.strerror}); reinstall mlflow (make setup)") from None
    stopped: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        stopped.append(signum)
        _signal_group(proc.pid, signum)

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), forward)
    try:
        code = proc.wait()
    finally:
        stop_group(proc.pid)
    return 0 if stopped else code


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False when the group is gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def stop_group(pgid: int, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every process left in group ``pgid``; SIGKILL what is still there after ``grace`` seconds."""
    import signal
    import time

    for signum in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        if not _signal_group(pgid, signum):
            return
        while time.monotonic() < deadline:
            if not _signal_group(pgid, 0):
                return
            time.sleep(0.1)
