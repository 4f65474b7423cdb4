"""Classification metrics equal values computed by hand on small crafted inputs."""

from __future__ import annotations

import pytest
import torch

from tuneforge.tasks.classification import ClassificationTask


def _logits_for(predicted: list[int], k: int, confidence: list[float] | None = None) -> torch.Tensor:
    logits = torch.zeros(len(predicted), k)
    for row, label in enumerate(predicted):
        logits[row, label] = 2.0 if confidence is None else confidence[row]
    return logits


def test_binary_metrics_by_hand():
    # truth:     1 1 1 0 0 0 0 0
    # predicted: 1 1 0 1 0 0 0 0   -> TP=2 FN=1 FP=1 TN=4
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    predicted = [1, 1, 0, 1, 0, 0, 0, 0]
    m = ClassificationTask(["neg", "pos"]).metrics(_logits_for(predicted, 2), labels)
    assert m["accuracy"] == pytest.approx(6 / 8)
    p_pos, r_pos = 2 / 3, 2 / 3
    p_neg, r_neg = 4 / 5, 4 / 5
    f_pos, f_neg = 2 / 3, 4 / 5
    assert m["precision_macro"] == pytest.approx((p_pos + p_neg) / 2)
    assert m["recall_macro"] == pytest.approx((r_pos + r_neg) / 2)
    assert m["f1_macro"] == pytest.approx((f_pos + f_neg) / 2)
    assert m["f1_weighted"] == pytest.approx((3 * f_pos + 5 * f_neg) / 8)
    assert m["confusion_matrix"] == [[4, 1], [1, 2]]
    assert m["per_class"]["pos"] == pytest.approx({"precision": p_pos, "recall": r_pos, "f1": f_pos, "support": 3})


def test_binary_auc_by_hand():
    # Scores for the positive class: every positive outranks every negative but one pair.
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[0.0, 0.1], [0.0, 0.6], [0.0, 0.4], [0.0, 0.9]])
    m = ClassificationTask(["a", "b"]).metrics(logits, labels)
    assert m["auc_roc"] == pytest.approx(3 / 4)  # 3 of the 4 positive/negative pairs ordered right


def test_multiclass_one_vs_rest_auc_and_undefined_case():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    perfect = torch.nn.functional.one_hot(labels, 3).float() * 5
    m = ClassificationTask(["x", "y", "z"]).metrics(perfect, labels)
    assert m["auc_roc"] == pytest.approx(1.0) and m["accuracy"] == 1.0
    missing_class = ClassificationTask(["x", "y", "z"]).metrics(perfect[:2], labels[:2])
    assert missing_class["auc_roc"] is None  # a class without examples: AUC is undefined, not invented


def test_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    m = ClassificationTask(["a", "b"]).metrics(logits, labels)
    expected = (torch.log1p(torch.exp(torch.tensor(-2.0))) + torch.log1p(torch.exp(torch.tensor(1.0)))) / 2
    assert m["loss"] == pytest.approx(float(expected), rel=1e-5)
