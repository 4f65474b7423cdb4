"""A task from outside tuneforge, in one file: ordinal classification (classes in an order, such as ratings 1 to 5).

The model gives one score per example, trained towards the class's position in the order; the prediction is
the class nearest to the score. Mistakes by one step cost less than mistakes by four, which the metrics show:
mean absolute error in steps beside plain accuracy. It registers under the name `ordinal` when imported; the
tests install it as a plug-in (an entry point in the group `tuneforge.tasks`) and use it through the CLI.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge import register_task
from tuneforge.config import DataSpec
from tuneforge.data.common import label_key, missing, natural, rows_listing
from tuneforge.tasks.labels import LabelTask


@register_task
class OrdinalTask(LabelTask):
    name = "ordinal"
    description = "ordinal classifier"
    purpose = "Placing on the ordered scale above"
    metric_names = ("mae", "accuracy", "loss")
    lower_is_better = frozenset({"mae", "loss"})
    summary_keys = ("mae", "accuracy", "within_one", "loss")
    problem_type = "regression"  # one score per example

    def __init__(self, label_names: list[str]):
        self.label_names = label_names

    # ---------------------------------------------------------------- data: the order is the labels' natural order

    @classmethod
    def check_targets(cls, split, data_spec) -> list[str]:
        absent = [row for row, value in zip(split.rows, split.labels) if missing(value)]
        return [f"{split.name}: {len(absent)} missing label(s) at {rows_listing(absent)}"] if absent else []

    @classmethod
    def label_set(cls, splits, data_spec, spec, notes, problems):
        labels = list(spec.labels) if spec.labels else sorted({label_key(v) for v in splits["train"].labels}, key=natural)
        for split in splits.values():
            unknown = sorted({label_key(v) for v in split.labels} - set(labels))
            if unknown:
                problems.append(f"{split.name}: label(s) {unknown} are not on the scale {labels}")
        return labels, list(spec.label_names or labels)

    @classmethod
    def check_known(cls, split, info) -> list[str]:
        unknown = [row for row, value in zip(split.rows, split.labels) if label_key(value) not in info.label_values]
        return [f"{split.name}: label(s) off the model's scale {info.label_values} at {rows_listing(unknown)}"] if unknown else []

    @classmethod
    def encode_targets(cls, values, labels, data_spec) -> list:
        return [float(labels.index(label_key(value))) for value in values]

    # ---------------------------------------------------------------- the model: one output, the position

    @classmethod
    def head_labels(cls, labels):
        return ["position"]

    @classmethod
    def load_model(cls, model_spec, labels, image_spec, factory=None):
        return super().load_model(model_spec, cls.head_labels(labels), image_spec, factory)

    @classmethod
    def for_run(cls, recipe, data, preprocessor):
        return cls(data.label_names).configured(recipe.model.max_length, recipe.data)

    @classmethod
    def from_info(cls, info, preprocessor):
        return cls(info.label_names).configured(info.max_length, DataSpec(**info.data))

    def positions(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().squeeze(-1).round().clamp(0, len(self.label_names) - 1).long()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs.float().squeeze(-1), targets.float())

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
        predicted, truth = self.positions(outputs), targets.long()
        steps = (predicted - truth).abs().float()
        return {"num_examples": int(truth.numel()), "loss": float(self.loss(outputs, targets)), "mae": float(steps.mean()),
                "accuracy": float((steps == 0).float().mean()), "within_one": float((steps <= 1).float().mean())}

    def predictions(self, outputs: torch.Tensor) -> list[dict]:
        return [{"label": self.label_names[int(p)], "score": round(float(s), 4)}
                for p, s in zip(self.positions(outputs), outputs.float().squeeze(-1))]

    def csv_header(self) -> list[str]:
        return ["label", "score"]

    def csv_row(self, prediction: dict) -> list:
        return [prediction["label"], prediction["score"]]
