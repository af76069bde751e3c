"""Classification metrics on logits: top-k, loss, confusion, per-class scores.

Computed with torch on whole tensors (no per-sample Python), so scoring the
60k-image training split costs a few milliseconds after the forward pass.

Conventions (the same as scikit-learn's ``zero_division=0``):

* ``confusion[i, j]`` counts images whose true class is ``i`` and predicted
  class is ``j`` (rows: actual, columns: predicted).
* A class nobody predicted has precision 0 (not NaN): "0 of 0 predictions
  were right" is reported as a failure, so it lowers the macro average
  instead of silently dropping out of it.
* A class absent from the labels has recall (= per-class accuracy) 0, and
  F1 is 0 whenever precision + recall is 0.
* Macro averages are plain means over the classes that occur in the labels
  or the predictions (a class seen by neither says nothing about the model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cnnpipe.util.errors import CnnpipeError


def _check_k(ks: list[int], num_classes: int) -> None:
    for k in ks:
        if k < 1 or k > num_classes:
            raise CnnpipeError(
                f"top-{k} accuracy needs 1 <= k <= {num_classes} (the number of classes); lower eval.top_k"
            )


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Share of samples whose label is among the ``k`` highest logits, per ``k``."""
    ks = list(ks)
    num_classes = logits.shape[1]
    _check_k(ks, num_classes)
    if labels.numel() == 0:
        return {k: 0.0 for k in ks}
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return {k: float(hits[:, :k].any(dim=1).double().mean()) for k in ks}


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy (no label smoothing: the loss users compare across runs)."""
    if labels.numel() == 0:
        return 0.0
    return float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="mean"))


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts; rows are true classes, columns predictions."""
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ in shape")
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class ClassScores:
    """Per-class scores (one entry per class, in class-index order)."""

    support: torch.Tensor  # int64: true images of the class
    predicted: torch.Tensor  # int64: images predicted as the class
    correct: torch.Tensor  # int64: diagonal of the confusion matrix
    accuracy: torch.Tensor  # correct / support (= recall for single-label classification)
    precision: torch.Tensor  # correct / predicted, 0 when nothing was predicted as the class
    recall: torch.Tensor  # correct / support, 0 when the class has no images
    f1: torch.Tensor  # harmonic mean of precision and recall, 0 when both are 0

    def macro(self) -> dict[str, float]:
        """Unweighted means over the classes present in the labels or the predictions."""
        present = (self.support > 0) | (self.predicted > 0)
        if not bool(present.any()):
            return {"macro_precision": 0.0, "macro_recall": 0.0, "macro_f1": 0.0}
        return {
            "macro_precision": float(self.precision[present].mean()),
            "macro_recall": float(self.recall[present].mean()),
            "macro_f1": float(self.f1[present].mean()),
        }


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def class_scores(confusion: torch.Tensor) -> ClassScores:
    """Per-class accuracy, precision, recall and F1 from a confusion matrix (zero-division -> 0)."""
    confusion = confusion.long()
    correct = confusion.diagonal()
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    precision = _safe_div(correct, predicted)
    recall = _safe_div(correct, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return ClassScores(
        support=support,
        predicted=predicted,
        correct=correct,
        accuracy=recall,
        precision=precision,
        recall=recall,
        f1=f1,
    )


@dataclass(frozen=True)
class Mistakes:
    """The most confident wrong predictions, most confident first."""

    index: torch.Tensor  # int64 positions in the evaluated split
    actual: torch.Tensor  # int64 true class
    predicted: torch.Tensor  # int64 predicted class
    confidence: torch.Tensor  # float softmax probability of the predicted class

    def __len__(self) -> int:
        return int(self.index.shape[0])


def most_confident_mistakes(logits: torch.Tensor, labels: torch.Tensor, n: int) -> Mistakes:
    """Up to ``n`` misclassified samples with the highest predicted-class probability.

    Ties keep the lower index first, so the list is deterministic.
    """
    probs = torch.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(dim=1)
    wrong = torch.nonzero(predicted.ne(labels), as_tuple=False).flatten()
    # stable sort on -confidence keeps equal-confidence mistakes in index order
    order = torch.sort(-confidence[wrong], stable=True).indices[: max(n, 0)]
    index = wrong[order]
    return Mistakes(index=index, actual=labels[index], predicted=predicted[index], confidence=confidence[index])
