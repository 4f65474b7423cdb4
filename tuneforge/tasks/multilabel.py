"""Multi-label classification: any number of labels per example, one sigmoid output per label.

A label is predicted when its probability exceeds the threshold. With `task.threshold: tune`
the threshold is chosen after training as the one that maximises micro F1 on the validation
split, then saved with the model and used for the final metrics and every prediction.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from tuneforge.config import DataSpec, Recipe, TaskSpec
from tuneforge.data.common import Split, TaskData, label_key, missing, natural, rows_listing
from tuneforge.tasks.base import predict_logits, torchmetrics_functions
from tuneforge.tasks.cards import label_table, per_class_table, rarest
from tuneforge.tasks.labels import LabelTask
from tuneforge.tasks.registry import register_task

THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]  # what `tune` tries: 0.05 ... 0.95


class MultiLabelSpec(TaskSpec):
    threshold: float | Literal["tune"] = Field(
        "tune", description="probability above which a label is predicted; tune: the one that maximises micro F1 on "
                            "the validation split (0.5 without one)")

    @field_validator("threshold")
    @classmethod
    def _probability(cls, value):
        if value != "tune" and not 0.0 < value < 1.0:
            raise ValueError("threshold must be between 0 and 1 (exclusive), or tune")
        return value


@register_task
class MultiLabelTask(LabelTask):
    name = "multilabel"
    Spec = MultiLabelSpec
    description = "multi-label classifier"
    purpose = "Assigning any of the labels above (none, one or several) to"
    metric_names = ("f1_micro", "f1_macro", "precision_micro", "recall_micro", "precision_macro", "recall_macro",
                    "auc_roc", "exact_match", "loss")
    summary_keys = ("f1_micro", "f1_macro", "exact_match", "loss")
    card_metrics = ("f1_micro", "f1_macro", "precision_micro", "recall_micro", "auc_roc", "exact_match", "loss")
    problem_type = "multi_label_classification"
    unit = "label"

    def __init__(self, label_names: list[str], threshold: float = 0.5, tune: bool = False):
        self.label_names = label_names
        self.threshold = threshold
        self.tune_threshold = tune  # choose the threshold on validation once training is done

    # ---------------------------------------------------------------- data

    @classmethod
    def check_targets(cls, split: Split, data_spec) -> list[str]:
        return []  # against the label set, once it is known (label_set)

    @classmethod
    def label_set(cls, splits: dict[str, Split], data_spec, spec, notes: list[str],
                  problems: list[str]) -> tuple[list[str], list[str]]:
        """task.labels, or every label train's cells hold; every split's labels known."""
        separator = data_spec.label_separator
        seen = sorted({label for value in splits["train"].labels for label in label_list(value, separator)}, key=natural)
        labels = list(spec.labels) if spec.labels else seen
        for split in splits.values():
            problems += unknown_labels(split, labels, separator)
        if len(labels) < 1:
            problems.append(f"train: no labels found in column '{data_spec.label_column}'; multilabel needs at least one")
        return labels, list(spec.label_names) if spec.label_names else labels

    @classmethod
    def encode_targets(cls, values: list, labels: list[str], data_spec) -> list:
        """A multi-hot list per example."""
        index = {label: i for i, label in enumerate(labels)}
        encoded = []
        for value in values:
            hot = [0.0] * len(labels)
            for label in label_list(value, data_spec.label_separator):
                hot[index[label]] = 1.0
            encoded.append(hot)
        return encoded

    @classmethod
    def check_known(cls, split: Split, info) -> list[str]:
        return unknown_labels(split, info.label_values, DataSpec(**info.data).label_separator)

    # ---------------------------------------------------------------- one run, or one saved model

    @classmethod
    def for_run(cls, recipe: Recipe, data: TaskData, preprocessor) -> MultiLabelTask:
        threshold = recipe.task.threshold
        task = cls(data.label_names, 0.5 if threshold == "tune" else threshold, tune=threshold == "tune")
        return task.configured(recipe.model.max_length, recipe.data)

    @classmethod
    def from_info(cls, info, preprocessor) -> MultiLabelTask:
        threshold = info.task_state["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold {threshold!r} is not a probability")
        return cls(info.label_names, float(threshold)).configured(info.max_length, DataSpec(**info.data))

    @property
    def state(self) -> dict:
        return {"threshold": self.threshold}

    def after_training(self, model, loaders: dict, accelerator) -> tuple[dict, str] | None:
        if not self.tune_threshold or "validation" not in loaders:
            return None
        threshold = self.tune(*predict_logits(model, loaders["validation"], accelerator))
        return {"type": "threshold", "value": threshold}, f"threshold: {threshold} (best micro F1 on validation)"

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
        tmf = torchmetrics_functions("classification")
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
        tmf = torchmetrics_functions("classification")
        probabilities, targets, k = logits.float().sigmoid(), targets.long(), len(self.label_names)
        scores = [(float(tmf.multilabel_f1_score(probabilities, targets, k, threshold=t, average="micro")), -t)
                  for t in THRESHOLDS]
        self.threshold = -max(scores)[1]
        return self.threshold

    def csv_header(self) -> list[str]:
        return ["labels", *(f"p_{name}" for name in self.label_names)]

    def csv_row(self, prediction: dict) -> list:
        return ["|".join(prediction["labels"]), *prediction["probabilities"].values()]

    # ---------------------------------------------------------------- the run's records and card

    def train_summary(self, data: TaskData) -> dict:
        counts = torch.tensor(data.targets("train")).sum(0)
        return {"train_class_counts": dict(zip(data.label_names, [int(c) for c in counts]))}

    @classmethod
    def card_head(cls, info) -> str:
        return f"a new head with one sigmoid output per label ({len(info.label_names)} labels)"

    @classmethod
    def card_details(cls, info, recipe: dict | None) -> list[str]:
        tuned = (recipe or {}).get("task", {}).get("threshold") == "tune"
        return [*label_table(info, "output index"), "",
                f"A label is predicted when its sigmoid probability exceeds {info.task_state['threshold']}"
                + (" (chosen for the best micro F1 on the validation split)." if tuned else ".")]

    @classmethod
    def card_split_details(cls, split: str, metrics: dict) -> list[str]:
        return per_class_table(split, metrics)

    @classmethod
    def card_limitations(cls, info, data_record: dict) -> list[str]:
        return [rarest(data_record, "label"), "- The threshold trades precision for recall for every label at once; a "
                "label-specific use may want its own."]


def label_list(value, separator: str) -> list[str]:
    """A multilabel cell as its labels: a JSON list as it is, text split at the separator; empty: none."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [label_key(v) for v in value]
    if missing(value):
        return []
    return [part.strip() for part in str(value).split(separator) if part.strip()]


def unknown_labels(split: Split, labels: list[str], separator: str) -> list[str]:
    unseen = [(row, label) for row, value in zip(split.rows, split.labels)
              for label in label_list(value, separator) if label not in labels]
    if not unseen:
        return []
    return [f"{split.name}: label(s) {sorted({label for _, label in unseen})} are not known (known: {labels}) at "
            f"{rows_listing(list(dict.fromkeys(row for row, _ in unseen)))}; fix them or list them in task.labels"]
