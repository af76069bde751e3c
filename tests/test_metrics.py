"""Metrics on hand-made logits whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cnnpipe.util.errors import CnnpipeError
from cnnpipe.engine.metrics import (
    class_scores,
    confusion_matrix,
    mean_loss,
    most_confident_mistakes,
    topk_accuracy,
)


def logits_from_ranks(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# 4 classes, 6 samples. Predictions (argmax): 0, 0, 1, 1, 1, 0; class 3 is never predicted.
LOGITS = logits_from_ranks([
    [5.0, 1.0, 0.0, 2.0],  # true 0, pred 0, top-2 {0,3}
    [3.0, 2.0, 1.0, 0.0],  # true 1, pred 0, top-2 {0,1}
    [0.0, 4.0, 3.0, 1.0],  # true 2, pred 1, top-2 {1,2}
    [1.0, 9.0, 0.0, 0.5],  # true 1, pred 1
    [0.0, 2.0, 0.5, 1.0],  # true 3, pred 1, top-2 {1,3}
    [6.0, 0.0, 1.0, 2.0],  # true 3, pred 0, top-2 {0,3}
])
LABELS = torch.tensor([0, 1, 2, 1, 3, 3])


def test_topk_known_answers() -> None:
    acc = topk_accuracy(LOGITS, LABELS, ks=(1, 2, 4))
    assert acc[1] == pytest.approx(2 / 6)  # samples 0 and 3
    assert acc[2] == pytest.approx(6 / 6)
    assert acc[4] == 1.0


def test_topk_refuses_k_above_class_count() -> None:
    with pytest.raises(CnnpipeError, match=r"top-5 accuracy needs 1 <= k <= 4.*eval.top_k"):
        topk_accuracy(LOGITS, LABELS, ks=(1, 5))


def test_topk_refuses_k_zero() -> None:
    with pytest.raises(CnnpipeError, match="top-0"):
        topk_accuracy(LOGITS, LABELS, ks=(0,))


def test_topk_empty_split_is_zero() -> None:
    assert topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ks=(1,)) == {1: 0.0}


def test_confusion_counts() -> None:
    cm = confusion_matrix(LOGITS.argmax(1), LABELS, 4)
    expected = torch.tensor([
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 0, 0],
        [1, 1, 0, 0],
    ])
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)
    assert int(cm.sum()) == len(LABELS)


def test_confusion_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)


def test_per_class_precision_recall_f1() -> None:
    scores = class_scores(confusion_matrix(LOGITS.argmax(1), LABELS, 4))
    assert scores.support.tolist() == [1, 2, 1, 2]
    assert scores.predicted.tolist() == [3, 3, 0, 0]
    # class 0: 1 correct of 3 predicted, 1 of 1 true
    assert scores.precision[0].item() == pytest.approx(1 / 3)
    assert scores.recall[0].item() == pytest.approx(1.0)
    assert scores.f1[0].item() == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    # class 1: 1 correct of 3 predicted, 1 of 2 true
    assert scores.precision[1].item() == pytest.approx(1 / 3)
    assert scores.recall[1].item() == pytest.approx(1 / 2)
    assert scores.f1[1].item() == pytest.approx(0.4)
    # per-class accuracy is recall for single-label classification
    assert torch.equal(scores.accuracy, scores.recall)


def test_class_never_predicted_has_precision_zero_not_nan() -> None:
    scores = class_scores(confusion_matrix(LOGITS.argmax(1), LABELS, 4))
    for cls in (2, 3):  # never predicted
        assert scores.precision[cls].item() == 0.0
        assert scores.recall[cls].item() == 0.0
        assert scores.f1[cls].item() == 0.0
    assert not torch.isnan(scores.precision).any()


def test_macro_averages_over_present_classes() -> None:
    scores = class_scores(confusion_matrix(LOGITS.argmax(1), LABELS, 4))
    macro = scores.macro()
    assert macro["macro_precision"] == pytest.approx((1 / 3 + 1 / 3 + 0 + 0) / 4)
    assert macro["macro_recall"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert macro["macro_f1"] == pytest.approx((0.5 + 0.4) / 4)


def test_macro_ignores_class_absent_from_labels_and_predictions() -> None:
    # 3 classes, class 2 neither occurs nor is predicted: perfect on the rest
    labels = torch.tensor([0, 1, 0, 1])
    cm = confusion_matrix(labels.clone(), labels, 3)
    macro = class_scores(cm).macro()
    assert macro == {"macro_precision": 1.0, "macro_recall": 1.0, "macro_f1": 1.0}


def test_class_absent_from_labels_but_predicted() -> None:
    labels = torch.tensor([0, 0, 1])
    predicted = torch.tensor([0, 2, 1])
    scores = class_scores(confusion_matrix(predicted, labels, 3))
    assert scores.support[2].item() == 0
    assert scores.recall[2].item() == 0.0  # no images: recall 0, not NaN
    assert scores.precision[2].item() == 0.0
    assert scores.macro()["macro_precision"] == pytest.approx((1 + 1 + 0) / 3)


def test_per_class_accuracy_is_the_share_of_each_class_predicted_correctly() -> None:
    """``accuracy`` is what per_class.csv and the per-class figure show (0 for a class with no images)."""
    acc = class_scores(confusion_matrix(LOGITS.argmax(1), LABELS, 4)).accuracy
    assert acc.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_mean_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = torch.tensor([0, 0])
    # -log(1/2) and -log(3/4)
    assert mean_loss(logits, labels) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)


def test_most_confident_mistakes_sorted_and_limited() -> None:
    mistakes = most_confident_mistakes(LOGITS, LABELS, n=3)
    assert len(mistakes) == 3
    probs = torch.softmax(LOGITS, 1).max(1).values
    wrong = [1, 2, 4, 5]
    expected = sorted(wrong, key=lambda i: -probs[i].item())[:3]
    assert mistakes.index.tolist() == expected
    assert mistakes.index.tolist()[0] == 5  # 6 vs 2 vs 1 vs 0: the most confident wrong answer
    assert mistakes.actual.tolist() == LABELS[expected].tolist()
    assert mistakes.predicted.tolist() == LOGITS.argmax(1)[expected].tolist()
    assert mistakes.confidence.tolist() == pytest.approx(probs[expected].tolist())
    assert all(a != p for a, p in zip(mistakes.actual.tolist(), mistakes.predicted.tolist()))


def test_most_confident_mistakes_fewer_than_requested_and_zero() -> None:
    assert len(most_confident_mistakes(LOGITS, LABELS, n=100)) == 4
    assert len(most_confident_mistakes(LOGITS, LABELS, n=0)) == 0
    perfect = most_confident_mistakes(LOGITS, LOGITS.argmax(1), n=5)
    assert len(perfect) == 0


def test_mistake_ties_keep_index_order() -> None:
    logits = torch.tensor([[0.0, 1.0]] * 4)
    labels = torch.tensor([0, 0, 1, 0])
    assert most_confident_mistakes(logits, labels, n=10).index.tolist() == [0, 1, 3]
