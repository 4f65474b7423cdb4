"""Single-label classification: batch -> loss, logits -> predictions, predictions -> metrics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional import classification as tmf

from tuneforge.tasks.base import TaskBase


def balanced_class_weights(label_ids: list[int], num_classes: int) -> torch.Tensor:
    """n / (k * count_c): inversely proportional to class frequency, 1 for every class when balanced."""
    counts = torch.bincount(torch.tensor(label_ids), minlength=num_classes).float()
    return len(label_ids) / (num_classes * counts.clamp(min=1))


class ClassificationTask(TaskBase):
    name = "classification"
    summary_keys = ("accuracy", "f1_macro", "auc_roc", "loss")
    info: dict = {}  # nothing beyond the labels to save with the model

    def __init__(self, label_names: list[str], label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        self.label_names = label_names
        self.num_classes = len(label_names)
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss; `targets` are class indices, or class probabilities after mixup / cutmix.

        Cross-entropy in float32 even under bf16/fp16 autocast: the softmax needs the range.
        With class weights, the mean is weighted (each example counts by its class weight).
        """
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits.float(), targets, weight=weight, label_smoothing=self.label_smoothing)

    def predictions(self, logits: torch.Tensor) -> list[dict]:
        probabilities = logits.float().softmax(-1)
        return [
            {"label": self.label_names[int(row.argmax())],
             "probabilities": {name: round(float(p), 6) for name, p in zip(self.label_names, row)}}
            for row in probabilities
        ]

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        """All metrics by name; computed with torchmetrics on the full split at once."""
        logits, labels = logits.float(), labels.long()
        probabilities = logits.softmax(-1)
        predicted = probabilities.argmax(-1)
        k = self.num_classes
        result = {
            "num_examples": int(labels.numel()),
            "loss": float(F.cross_entropy(logits, labels)),
            "accuracy": float(tmf.multiclass_accuracy(predicted, labels, k, average="micro")),
        }
        for average in ("macro", "weighted"):
            result[f"precision_{average}"] = float(tmf.multiclass_precision(predicted, labels, k, average=average))
            result[f"recall_{average}"] = float(tmf.multiclass_recall(predicted, labels, k, average=average))
            result[f"f1_{average}"] = float(tmf.multiclass_f1_score(predicted, labels, k, average=average))
        result["auc_roc"] = self._auc_roc(probabilities, labels)
        result["confusion_matrix"] = tmf.multiclass_confusion_matrix(predicted, labels, k).tolist()
        per_class = zip(tmf.multiclass_precision(predicted, labels, k, average=None).tolist(),
                        tmf.multiclass_recall(predicted, labels, k, average=None).tolist(),
                        tmf.multiclass_f1_score(predicted, labels, k, average=None).tolist(),
                        torch.bincount(labels, minlength=k).tolist())
        result["per_class"] = {
            name: {"precision": p, "recall": r, "f1": f, "support": s}
            for name, (p, r, f, s) in zip(self.label_names, per_class)
        }
        return result

    def _auc_roc(self, probabilities: torch.Tensor, labels: torch.Tensor) -> float | None:
        """Binary AUC on the positive class; one-vs-rest macro AUC for more classes.

        Undefined (None) when a class has no examples in the split.
        """
        present = torch.bincount(labels, minlength=self.num_classes)
        if self.num_classes == 2:
            if (present == 0).any():
                return None
            return float(tmf.binary_auroc(probabilities[:, 1], labels))
        if (present == 0).any():
            return None
        value = float(tmf.multiclass_auroc(probabilities, labels, self.num_classes, average="macro"))
        return None if math.isnan(value) else value

    def csv_header(self) -> list[str]:
        return ["label", *(f"p_{name}" for name in self.label_names)]

    def csv_row(self, prediction: dict) -> list:
        return [prediction["label"], *prediction["probabilities"].values()]
