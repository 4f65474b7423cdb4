"""Single-label classification: batch -> loss, logits -> predictions, predictions -> metrics."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from tuneforge.config import DataSpec, Recipe, TaskSpec
from tuneforge.data.common import Split, TaskData, label_key, missing, natural, rows_listing
from tuneforge.errors import RecipeError
from tuneforge.tasks.base import torchmetrics_functions
from tuneforge.tasks.cards import per_class_table, rarest
from tuneforge.tasks.labels import LabelTask
from tuneforge.tasks.registry import register_task


def balanced_class_weights(label_ids: list[int], num_classes: int) -> torch.Tensor:
    """n / (k * count_c): inversely proportional to class frequency, 1 for every class when balanced."""
    counts = torch.bincount(torch.tensor(label_ids), minlength=num_classes).float()
    return len(label_ids) / (num_classes * counts.clamp(min=1))


class ClassificationSpec(TaskSpec):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None, description="loss weight per class: 'balanced' (n / (k * count)) or one weight per label")


@register_task
class ClassificationTask(LabelTask):
    """One label per example, from a softmax over the classes."""

    name = "classification"
    Spec = ClassificationSpec
    description = "classifier"
    purpose = "Assigning one of the labels above to"
    metric_names = ("accuracy", "loss", "f1_macro", "f1_weighted", "precision_macro", "precision_weighted",
                    "recall_macro", "recall_weighted", "auc_roc")
    summary_keys = ("accuracy", "f1_macro", "auc_roc", "loss")
    card_metrics = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "auc_roc", "loss")
    problem_type = "single_label_classification"
    probe_target = "class"  # tuneforge advise probes the frozen features for it
    balanced_sampling = True
    mixes_labels = True

    # ---------------------------------------------------------------- data

    @classmethod
    def check_targets(cls, split: Split, data_spec) -> list[str]:
        """Every example labelled; a list where one label belongs means the task is multilabel."""
        absent = [row for row, value in zip(split.rows, split.labels) if missing(value) or label_key(value) == ""]
        problems = [f"{split.name}: {len(absent)} missing label(s) in column '{data_spec.label_column}' at "
                    f"{rows_listing(absent)}"] if absent else []
        if any(isinstance(value, (list, tuple, np.ndarray)) for value in split.labels):
            problems.append(f"{split.name}: column '{data_spec.label_column}' holds lists of labels; for several labels "
                            "per example set task.type: multilabel")
        return problems

    @classmethod
    def label_set(cls, splits: dict[str, Split], data_spec, spec, notes: list[str],
                  problems: list[str]) -> tuple[list[str], list[str]]:
        """task.labels, or train's labels in natural order; validation and test may hold only known ones."""
        train_labels = sorted({label_key(v) for v in splits["train"].labels if not missing(v)}, key=natural)
        labels = list(spec.labels) if spec.labels else train_labels
        if spec.labels:
            unknown = sorted(set(train_labels) - set(labels))
            if unknown:
                problems.append(f"train: label(s) {unknown} are not in task.labels {labels}; add them to task.labels")
        elif len(labels) < 2 and splits["train"].labels:
            problems.append(f"train: only one label ({labels}) found in column '{data_spec.label_column}'; "
                            "classification needs at least two")
        for name in ("validation", "test"):
            if name in splits:
                problems += unknown_labels(splits[name], labels, "they never appear in train: fix them or list them "
                                                                 "in task.labels")
        return labels, list(spec.label_names) if spec.label_names else labels

    @classmethod
    def encode_targets(cls, values: list, labels: list[str], data_spec) -> list:
        index = {label: i for i, label in enumerate(labels)}
        return [index[label_key(value)] for value in values]

    @classmethod
    def check_known(cls, split: Split, info) -> list[str]:
        return unknown_labels(split, info.label_values, "the model cannot predict labels it was not trained on")

    # ---------------------------------------------------------------- one run, or one saved model

    @classmethod
    def for_run(cls, recipe: Recipe, data: TaskData, preprocessor) -> ClassificationTask:
        spec, weights = recipe.task, recipe.task.class_weights
        if weights == "balanced":
            weights = balanced_class_weights(data.targets("train"), len(data.labels))
        elif weights is not None:
            if len(weights) != len(data.labels):
                raise RecipeError([f"task.class_weights has {len(weights)} weights for {len(data.labels)} labels "
                                   f"{data.label_names}; give one per label, in that order"])
            weights = torch.tensor(weights, dtype=torch.float)
        return cls(data.label_names, spec.label_smoothing, weights).configured(recipe.model.max_length, recipe.data)

    @classmethod
    def from_info(cls, info, preprocessor) -> ClassificationTask:
        return cls(info.label_names).configured(info.max_length, DataSpec(**info.data))

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
        tmf = torchmetrics_functions("classification")
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
        tmf = torchmetrics_functions("classification")
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

    # ---------------------------------------------------------------- the run's records and card

    def train_summary(self, data: TaskData) -> dict:
        counts = torch.bincount(torch.tensor(data.targets("train")), minlength=len(data.labels))
        return {"train_class_counts": dict(zip(data.label_names, [int(c) for c in counts]))}

    @classmethod
    def card_head(cls, info) -> str:
        return f"a new classifier for {len(info.label_names)} labels"

    @classmethod
    def card_regularisation(cls, recipe: dict) -> list[str]:
        task = recipe["task"]
        return ([f"label smoothing {task['label_smoothing']}"] if task.get("label_smoothing") else []) + \
            ([f"class weights {task['class_weights']}"] if task.get("class_weights") else [])

    @classmethod
    def card_split_details(cls, split: str, metrics: dict) -> list[str]:
        return per_class_table(split, metrics)

    @classmethod
    def card_limitations(cls, info, data_record: dict) -> list[str]:
        return [rarest(data_record, "class"),
                "- The intervals above reflect only the size of each evaluation split (binomial, 95 %), not a shift "
                "between the data it was tested on and the data it will see.",
                "- It always answers with one of its labels, also for inputs that belong to none of them."]


def unknown_labels(split: Split, labels: list[str], fix: str) -> list[str]:
    unseen = [(row, label_key(v)) for row, v in zip(split.rows, split.labels) if not missing(v) and label_key(v) not in labels]
    if not unseen:
        return []
    values = sorted({value for _, value in unseen})
    return [f"{split.name}: label(s) {values} are not known to the model (known: {labels}) at "
            f"{rows_listing([row for row, _ in unseen])}; {fix}"]
