"""Score the selected checkpoint: test metrics, per-class table, confusion, mistakes.

Glue between ``cnnpipe.models.checkpoint`` (the model), ``cnnpipe.data.prepared``
(the splits) and ``cnnpipe.engine.metrics`` (the numbers). The train and validation
splits are scored too, so the report shows over-fitting next to the test
score; the train split on a fixed seeded subset of ``TRAIN_SUBSET`` images
(its accuracy estimate moves by ~0.3 points at most, and evaluating 54k
images cost more than the rest of the stage), labelled as such in
``metrics.json`` (``train_images``) and the report. The test set is touched
here for the first time: nothing upstream (selection, early stopping) ever
saw it.

Test-time augmentation (``eval.tta``): ``flip`` averages each image's
predicted probabilities with its mirror image's; ``auto`` means flip when the
model was trained with flips (``augment`` crop_flip/flip, which ``auto``
gives photos and clothes) on a dataset that is not handwriting (a mirrored
digit is another glyph). A model that never saw a mirrored image is hurt by
it: on Fashion-MNIST after one epoch without augmentation, flip TTA
lowered test top-1 (all shoes face left there; figure in
benchmarks/README.md). It applies to every split scored, so train/val/test stay comparable.

The reports are a pure function of the weights, the prepared data, the
``eval`` params, the device kind and this code: ``evaluation_key`` names a
``report_store`` entry over all of them (``cnnpipe.store.outputs``, the API
every code-keyed store shares), and the stage copies a stored set back
(``reuse_reports``) instead of scoring again, rewriting only the run ids in
``metrics.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.store.outputs import OutputCache
from cnnpipe.util.errors import CheckpointError, ParamsError
from cnnpipe.util.files import atomic_write_json
from cnnpipe.util.tables import write_csv
from cnnpipe.compute.device import resolve_device
from cnnpipe.data.registry import DATASETS
from cnnpipe.models.checkpoint import load_checkpoint, read_sidecar, WEIGHTS_FILE
from cnnpipe.util.hashing import sha256_file

if TYPE_CHECKING:
    import torch

    from cnnpipe.engine.metrics import ClassScores, Mistakes

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion.csv"
MISTAKES_FILE = "mistakes.csv"
PER_CLASS_COLUMNS = ("class", "support", "accuracy", "precision", "recall", "f1", "train_accuracy")
MISTAKES_COLUMNS = ("index", "actual", "predicted", "confidence")
SUBSET_GATHER_BYTES = 256 * 1024 * 1024  # the train subset is gathered (copied) at most this much at a time
GATHER_PAGES_BYTES = 16 * 1024 * 1024  # ... in gathers of at most this many image bytes (a folio mapped per row)
TRAIN_SUBSET = 10_000  # train-split images scored (a fixed seeded subset; all when the split is smaller)
SUBSET_SEED = 0
SIDECAR_IDS = ("run_id", "run_name", "mlflow_run_id", "mlflow_parent_run_id", "mlflow_experiment_id")
REPORT_FILES = (METRICS_FILE, PER_CLASS_FILE, CONFUSION_FILE, MISTAKES_FILE)
# What scores a checkpoint: this module and everything it may import (codegraph.code_identity).
CODE_ENTRY = "cnnpipe.evaluation.score"
LIBRARIES = ("torch",)  # its version is part of the code that scores
CACHE_KIND = "eval"


@dataclass(frozen=True)
class Evaluation:
    """Everything the evaluate stage writes, in memory."""

    classes: list[str]
    metrics: dict[str, Any]  # metrics.json: floats, then ids (strings or None)
    test_scores: "ClassScores"
    train_accuracy: "torch.Tensor"  # per class, train split
    confusion: "torch.Tensor"  # test, rows actual / columns predicted
    test_labels: "torch.Tensor"
    test_predicted: "torch.Tensor"
    mistakes: "Mistakes"

    @property
    def numeric_metrics(self) -> dict[str, float]:
        return numeric_metrics(self.metrics)

    def per_class_rows(self) -> list[dict[str, Any]]:
        s = self.test_scores
        return [
            {
                "class": name,
                "support": int(s.support[i]),
                "accuracy": float(s.accuracy[i]),
                "precision": float(s.precision[i]),
                "recall": float(s.recall[i]),
                "f1": float(s.f1[i]),
                "train_accuracy": float(self.train_accuracy[i]),
            }
            for i, name in enumerate(self.classes)
        ]


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The float metrics only (what MLflow logs)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_compatible(sidecar: dict[str, Any], stats: Any, checkpoint_dir: Path, prepared_dir: Path) -> None:
    """Refuse to score a model on data it was not trained for (stale ``models/best``)."""
    classes = list(sidecar.get("classes") or [])
    in_shape = [int(v) for v in sidecar.get("in_shape") or []]
    if classes != list(stats.classes) or in_shape != [int(v) for v in stats.image_shape]:
        raise CheckpointError(
            f"{checkpoint_dir} was trained on {sidecar.get('dataset')!r} ({len(classes)} classes, shape {in_shape}) "
            f"but {prepared_dir} holds {stats.dataset!r} ({stats.num_classes} classes, shape {list(stats.image_shape)}); "
            "re-run training (dvc repro train)"
        )
    fingerprint = sidecar.get("data_fingerprint")
    if fingerprint and fingerprint != stats.fingerprint:
        raise CheckpointError(
            f"{checkpoint_dir} was trained on prepared data {fingerprint} but {prepared_dir} is {stats.fingerprint}; "
            "re-run training (dvc repro train) so the model matches the data"
        )


def resolve_tta(tta: str, dataset: str, trained_augment: str | None) -> str:
    """``auto`` -> ``flip`` for a model trained with flips on photos or clothes; else ``none``."""
    if tta != "auto":
        return tta

    spec = DATASETS.get(dataset)
    flipped = trained_augment in ("flip", "crop_flip")
    return "flip" if flipped and spec is not None and not spec.digits else "none"


def train_subset(n: int, size: int = TRAIN_SUBSET, seed: int = SUBSET_SEED) -> "torch.Tensor | None":
    """Sorted indices of a fixed seeded subset of ``size`` of ``n`` images; None when all are scored."""
    import torch

    if n <= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


def report_store(root: str | os.PathLike[str] | None = None) -> OutputCache:
    """Evaluate's stored reports, ``.cnnpipe-cache/eval/<key>/`` (``root``: another folder for every store)."""
    return OutputCache(CACHE_KIND, root, code_entry=CODE_ENTRY, libraries=LIBRARIES)


def check_top_k(top_k: Sequence[int], prepared_dir: str | os.PathLike[str]) -> None:
    """``eval.top_k`` against the prepared data's classes: one ``ParamsError`` line before anything is scored.

    The evaluate stage validates only the ``eval`` section (it never loads the
    model tables), so this cross-check is made here, from ``stats.json``.
    """
    from cnnpipe.data.prepared import load_stats  # numpy: off the reports-reused path

    stats = load_stats(prepared_dir)
    k = max(top_k)
    if k > stats.num_classes:
        raise ParamsError(f"eval.top_k has {k}, more than the {stats.num_classes} classes of {stats.dataset}; "
                          f"use k <= {stats.num_classes}")


def evaluation_key(checkpoint_dir: str | os.PathLike[str], prepared_dir: str | os.PathLike[str], *,
                   settings: Mapping[str, Any], device: str) -> str:
    """Hash of everything the reports depend on; raises the stage's one-line errors for a bad checkpoint or data.

    The checkpoint's sidecar counts whole (architecture, normalization,
    training params), except its ids and time stamp, which ``reuse_reports``
    rewrites; so does the weights file's own hash (not the one the sidecar
    claims: altered weights are scored, and refused, never matched).
    ``device`` is the ``device`` param; anything but ``cpu`` may resolve to a
    GPU, whose float results are its own, so its entries are also per
    machine. The store adds the code (``CODE_ENTRY``'s identity and the torch
    version, read from the installed metadata): a reused evaluation costs no
    torch start-up.
    """
    import platform

    from cnnpipe.data.prepared import load_stats
    checkpoint_dir, prepared_dir = Path(checkpoint_dir), Path(prepared_dir)
    sidecar = read_sidecar(checkpoint_dir)
    stats = load_stats(prepared_dir)
    check_compatible(sidecar, stats, checkpoint_dir, prepared_dir)
    return report_store().key({
        "model": {k: v for k, v in sidecar.items() if k not in SIDECAR_IDS and k != "created"},
        "weights": sha256_file(checkpoint_dir / WEIGHTS_FILE) if (checkpoint_dir / WEIGHTS_FILE).is_file() else None,
        "data": stats.fingerprint,
        "settings": dict(settings),
        "tta": resolve_tta(str(settings.get("tta", "none")), stats.dataset, (sidecar.get("params") or {}).get("augment")),
        "device": device if device == "cpu" else f"{device}@{platform.node()}",
    })


def report_paths(reports_dir: str | os.PathLike[str]) -> dict[str, Path]:
    return {name: Path(reports_dir) / name for name in REPORT_FILES}


def reuse_reports(key: str, checkpoint_dir: str | os.PathLike[str], reports_dir: str | os.PathLike[str],
                  cache: OutputCache | None = None) -> dict[str, Any] | None:
    """Copy the stored reports of ``key`` into ``reports_dir`` and return their metrics; None when not stored.

    ``metrics.json`` gets this checkpoint's run ids (a new MLflow parent each
    execution); every other byte is the stored one.
    """
    cache = cache or report_store()
    entry = cache.get(key, REPORT_FILES)
    if entry is None:
        return None
    try:
        metrics = json.loads((entry / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable entry: score again (and replace it)
    if not isinstance(metrics, dict):
        return None
    sidecar = read_sidecar(checkpoint_dir)
    for name in SIDECAR_IDS:
        metrics[name] = sidecar.get(name)
    paths = report_paths(reports_dir)
    for name in (PER_CLASS_FILE, CONFUSION_FILE, MISTAKES_FILE):
        cache.restore(entry / name, paths[name])
    atomic_write_json(paths[METRICS_FILE], metrics)
    return metrics


def store_reports(key: str, paths: Mapping[str, Path], cache: OutputCache | None = None) -> Path | None:
    """Keep the reports just written under ``key`` (best effort: a full disk costs a re-score next time)."""
    return (cache or report_store()).put(key, {name: paths[name] for name in REPORT_FILES})


def evaluate_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    prepared_dir: str | os.PathLike[str],
    *,
    top_k: list[int] | tuple[int, ...] = (1, 5),
    batch_size: int = 1000,
    mistakes: int = 25,
    device: str = "auto",
    tta: str = "none",
    train_images: int = TRAIN_SUBSET,
) -> Evaluation:
    """Load the checkpoint (safetensors only) and score it on the test, val and (a subset of the) train splits.

    ``tta`` is ``none`` | ``flip`` | ``auto`` (see the module docstring);
    ``train_images`` caps the train split scored.
    """
    import torch

    from cnnpipe.data.prepared import load_split, load_stats
    from cnnpipe.data.resident_pages import ResidentCap
    from cnnpipe.engine.inference import evaluate_logits
    from cnnpipe.engine.metrics import class_scores, confusion_matrix, mean_loss, most_confident_mistakes, topk_accuracy

    checkpoint_dir, prepared_dir = Path(checkpoint_dir), Path(prepared_dir)
    stats = load_stats(prepared_dir)
    checkpoint = load_checkpoint(checkpoint_dir)
    sidecar = dict(checkpoint.sidecar)
    check_compatible(sidecar, stats, checkpoint_dir, prepared_dir)
    classes = list(stats.classes)
    num_classes = len(classes)
    top_k = sorted(set(int(k) for k in top_k))
    mean = sidecar.get("mean") or stats.mean
    std = sidecar.get("std") or stats.std
    dev = resolve_device(device)
    model = checkpoint.model.to(dev)
    tta = resolve_tta(tta, stats.dataset, (sidecar.get("params") or {}).get("augment"))
    scored: dict[str, int] = {}

    def score(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = load_split(prepared_dir, split)
        images, labels = data.images, data.labels
        subset = train_subset(len(labels), train_images) if split == "train" else None
        if subset is None:
            logits = evaluate_logits(model, images, mean=mean, std=std, batch_size=batch_size, device=dev, tta=tta)
        else:  # gathered from the mapped split a few batches at a time, never the whole subset at once
            labels = labels[subset]
            row = max(1, int(images[0].numel())) if len(images) else 1
            step = batch_size * max(1, min(8192, SUBSET_GATHER_BYTES // row) // batch_size)
            # Random rows of a large mapped split map a page-cache folio (up to 2 MB) each: gathered a few
            # at a time, so the resident-page cap acts before a whole step of them is mapped.
            pages, few = ResidentCap(images), max(1, GATHER_PAGES_BYTES // row)
            parts = []
            for i in range(0, len(subset), step):
                chunks = []
                for j in range(i, min(i + step, len(subset)), few):
                    chunks.append(images[subset[j:min(j + few, i + step)]])
                    pages.read(int(chunks[-1].shape[0]))
                rows = torch.cat(chunks)
                parts.append(evaluate_logits(model, rows, mean=mean, std=std, batch_size=batch_size, device=dev,
                                             tta=tta))
            logits = torch.cat(parts)
        scored[split] = int(len(labels))
        if logits.numel() == 0:
            logits = torch.zeros(0, num_classes)
        return logits, labels

    metrics: dict[str, Any] = {}
    test_logits, test_labels = score("test")
    metrics["test_loss"] = mean_loss(test_logits, test_labels)
    for k, value in topk_accuracy(test_logits, test_labels, top_k).items():
        metrics[f"test_top{k}"] = value
    test_predicted = test_logits.argmax(dim=1) if len(test_labels) else test_labels.clone()
    confusion = confusion_matrix(test_predicted, test_labels, num_classes)
    scores = class_scores(confusion)
    metrics.update(scores.macro())

    train_accuracy = torch.zeros(num_classes, dtype=torch.float64)
    for split in ("train", "val"):
        logits, labels = score(split)
        metrics[f"{split}_loss"] = mean_loss(logits, labels)
        metrics[f"{split}_top1"] = topk_accuracy(logits, labels, (1,))[1]
        if split == "train":
            predicted = logits.argmax(dim=1) if len(labels) else labels.clone()
            train_accuracy = class_scores(confusion_matrix(predicted, labels, num_classes)).accuracy
        del logits, labels

    # 6 decimals: float32 noise (0.8173999786) would only clutter `dvc metrics diff`
    metrics = {key: round(value, 6) for key, value in metrics.items()}
    metrics["test_images"] = int(len(test_labels))
    metrics["train_images"] = scored["train"]  # scored: a seeded subset when the split is larger
    metrics["tta"] = tta
    for key in SIDECAR_IDS:
        metrics[key] = sidecar.get(key)
    return Evaluation(
        classes=classes,
        metrics=metrics,
        test_scores=scores,
        train_accuracy=train_accuracy,
        confusion=confusion,
        test_labels=test_labels,
        test_predicted=test_predicted,
        mistakes=most_confident_mistakes(test_logits, test_labels, mistakes),
    )


def write_reports(evaluation: Evaluation, reports_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write metrics.json, per_class.csv, confusion.csv and mistakes.csv atomically."""
    out = Path(reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = evaluation.classes
    paths = {
        METRICS_FILE: out / METRICS_FILE,
        PER_CLASS_FILE: out / PER_CLASS_FILE,
        CONFUSION_FILE: out / CONFUSION_FILE,
        MISTAKES_FILE: out / MISTAKES_FILE,
    }
    atomic_write_json(paths[METRICS_FILE], evaluation.metrics)
    write_csv(paths[PER_CLASS_FILE], evaluation.per_class_rows(), columns=PER_CLASS_COLUMNS, float_format="%.6g")
    confusion_rows = [
        {"actual": names[a], "predicted": names[p]}
        for a, p in zip(evaluation.test_labels.tolist(), evaluation.test_predicted.tolist())
    ]
    write_csv(paths[CONFUSION_FILE], confusion_rows, columns=("actual", "predicted"), float_format="%.6g")
    m = evaluation.mistakes
    mistake_rows = [
        {"index": i, "actual": names[a], "predicted": names[p], "confidence": c}
        for i, a, p, c in zip(m.index.tolist(), m.actual.tolist(), m.predicted.tolist(), m.confidence.tolist())
    ]
    write_csv(paths[MISTAKES_FILE], mistake_rows, columns=MISTAKES_COLUMNS, float_format="%.6g")
    return paths


def summary_line(metrics: Mapping[str, Any]) -> str:
    m = metrics
    tops = ", ".join(f"top-{key[len('test_top'):]} {m[key]:.2%}" for key in m if key.startswith("test_top"))
    return (f"evaluate: test {tops}, loss {m['test_loss']:.4f}, macro F1 {m['macro_f1']:.2%} "
            f"({m['test_images']} images, tta {m.get('tta', 'none')}); train top-1 {m['train_top1']:.2%} "
            f"(on {m.get('train_images', '?')} images), val top-1 {m['val_top1']:.2%}")
