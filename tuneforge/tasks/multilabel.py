"""Multi-label classification: any number of labels per example, one sigmoid output per label.

A label is predicted when its probability exceeds the threshold. With `task.threshold: tune`
the threshold is chosen after training as the one that maximises micro F1 on the validation
split, then saved with the model and used for the final metrics and every prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional import classification as tmf

from tuneforge.tasks.base import TaskBase

THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]  # what `tune` tries: 0.05 ... 0.95


class MultiLabelTask(TaskBase):
    name = "multilabel"
    summary_keys = ("f1_micro", "f1_macro", "exact_match", "loss")

    def __init__(self, label_names: list[str], threshold: float = 0.5):
        self.label_names = label_names
        self.threshold = threshold

    @property
    def info(self) -> dict:
        return {"threshold": self.threshold}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy per label, averaged (float32 even under autocast)."""
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def predictions(self, logits: torch.Tensor) -> list[dict]:
        probabilities = logits.float().sigmoid()
        return [{"labels": [name for name, p in zip(self.label_names, row) if p > self.threshold],
                 "probabilities": {name: round(float(p), 6) for name, p in zip(self.label_names, row)}}
                for row in probabilities]

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor, threshold: float | None = None) -> dict:
        """Micro and macro F1, precision and recall, macro AUC (torchmetrics), exact match (every label of
        an example right), all at the task's threshold."""
        probabilities, targets = logits.float().sigmoid(), targets.long()
        k, t = len(self.label_names), self.threshold if threshold is None else threshold
        result = {"num_examples": int(targets.shape[0]), "loss": float(self.loss(logits, targets)), "threshold": t}
        for average in ("micro", "macro"):
            for metric, function in (("f1", tmf.multilabel_f1_score), ("precision", tmf.multilabel_precision),
                                     ("recall", tmf.multilabel_recall)):
                result[f"{metric}_{average}"] = float(function(probabilities, targets, k, threshold=t, average=average))
        result["exact_match"] = float(tmf.multilabel_exact_match(probabilities, targets, k, threshold=t))
        # AUC needs both outcomes of every label in the split; undefined (None) otherwise.
        present = targets.sum(0)
        both = bool(((present > 0) & (present < targets.shape[0])).all())
        result["auc_roc"] = float(tmf.multilabel_auroc(probabilities, targets, k, average="macro")) if both else None
        per_label = zip(tmf.multilabel_precision(probabilities, targets, k, threshold=t, average=None).tolist(),
                        tmf.multilabel_recall(probabilities, targets, k, threshold=t, average=None).tolist(),
                        tmf.multilabel_f1_score(probabilities, targets, k, threshold=t, average=None).tolist(),
                        present.tolist())
        result["per_class"] = {name: {"precision": p, "recall": r, "f1": f, "support": s}
                               for name, (p, r, f, s) in zip(self.label_names, per_label)}
        return result

    def tune(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The threshold with the best micro F1 on these examples (the lowest of equals); it becomes the task's."""
        probabilities, targets, k = logits.float().sigmoid(), targets.long(), len(self.label_names)
        scores = [(float(tmf.multilabel_f1_score(probabilities, targets, k, threshold=t, average="micro")), -t)
                  for t in THRESHOLDS]
        self.threshold = -max(scores)[1]
        return self.threshold

    def csv_header(self) -> list[str]:
        return ["labels", *(f"p_{name}" for name in self.label_names)]

    def csv_row(self, prediction: dict) -> list:
        return ["|".join(prediction["labels"]), *prediction["probabilities"].values()]
