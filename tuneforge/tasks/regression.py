"""Regression: one or more continuous targets per example, from text or images.

The model learns the targets scaled to mean 0 and standard deviation 1 (by the training
split; `task.normalize_targets`), so the new head starts at the right scale whatever the
units; predictions and metrics are in the data's own units. The scaling is saved with
the model (tuneforge.json) and folded into exported models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from tuneforge.config import DataSpec, Recipe, TaskSpec
from tuneforge.data.common import Split, TaskData, rows_listing
from tuneforge.data.tables import label_columns
from tuneforge.errors import ModelError
from tuneforge.tasks.base import torchmetrics_functions
from tuneforge.tasks.cards import number, table
from tuneforge.tasks.labels import LabelTask
from tuneforge.tasks.registry import register_task


class RegressionSpec(TaskSpec):
    normalize_targets: bool = Field(True, description="train on targets scaled to mean 0, std 1 (by the training "
                                                      "split); predictions come back in the data's units")

    @model_validator(mode="after")
    def _no_classes(self) -> RegressionSpec:
        if self.labels is not None:
            raise ValueError("task.labels names classes; a regression's targets are data.label_column")
        return self


@register_task
class RegressionTask(LabelTask):
    name = "regression"
    Spec = RegressionSpec
    description = "regression model"
    purpose = "Predicting the targets above for"
    metric_names = ("rmse", "mse", "mae", "r2", "loss")
    lower_is_better = frozenset({"loss", "mse", "rmse", "mae"})
    summary_keys = ("rmse", "mae", "r2", "baseline_rmse", "loss")
    card_metrics = ("rmse", "mae", "r2", "baseline_rmse", "baseline_r2", "loss")
    problem_type = "regression"
    probe_target = "number"  # tuneforge advise probes the frozen features for it
    has_classes = False
    multi_target = True

    # ---------------------------------------------------------------- data

    @classmethod
    def check_targets(cls, split: Split, data_spec) -> list[str]:
        """Every target a finite number."""
        def number_like(value) -> bool:
            try:
                return math.isfinite(float(value))
            except (TypeError, ValueError):
                return False
        bad = [row for row, value in zip(split.rows, split.labels)
               if not all(number_like(v) for v in (value if isinstance(value, tuple) else (value,)))]
        return [f"{split.name}: {len(bad)} target value(s) in column(s) {data_spec.label_column} are missing or not "
                f"numbers at {rows_listing(bad)}; fix or remove those rows"] if bad else []

    @classmethod
    def label_set(cls, splits: dict[str, Split], data_spec, spec, notes: list[str],
                  problems: list[str]) -> tuple[list[str], list[str]]:
        columns = label_columns(data_spec)  # one output per target column
        return columns, columns

    @classmethod
    def encode_targets(cls, values: list, labels: list[str], data_spec) -> list:
        return [[float(v) for v in (value if isinstance(value, tuple) else (value,))] for value in values]

    # ---------------------------------------------------------------- one run, or one saved model

    @classmethod
    def for_run(cls, recipe: Recipe, data: TaskData, preprocessor) -> RegressionTask:
        task = cls.fit(data.label_names, data.targets("train"), recipe.task.normalize_targets)
        return task.configured(recipe.model.max_length, recipe.data)

    @classmethod
    def from_info(cls, info, preprocessor) -> RegressionTask:
        state = info.task_state
        task = cls(info.label_names, state["target_mean"], state["target_std"],
                   state.get("target_train_mean", state["target_mean"]))
        return task.configured(info.max_length, DataSpec(**info.data))

    def __init__(self, target_names: list[str], mean: list[float], std: list[float], baseline: list[float]):
        """Outputs map to the data's units as output * std + mean; `baseline` is the training split's mean,
        the trivial predictor every metric is also reported for."""
        self.label_names = target_names
        self.mean, self.std, self.baseline = torch.tensor(mean), torch.tensor(std), torch.tensor(baseline)

    @classmethod
    def fit(cls, target_names: list[str], targets: list[list[float]], normalize: bool) -> RegressionTask:
        values = torch.tensor(targets, dtype=torch.float64)
        mean = values.mean(dim=0)
        if not normalize:
            return cls(target_names, [0.0] * len(target_names), [1.0] * len(target_names), mean.tolist())
        std = values.std(dim=0, unbiased=False) if len(values) > 1 else torch.ones(values.shape[1])
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant target: leave its scale alone
        return cls(target_names, mean.tolist(), std.tolist(), mean.tolist())

    @property
    def state(self) -> dict:
        return {"target_mean": self.mean.tolist(), "target_std": self.std.tolist(),
                "target_train_mean": self.baseline.tolist()}

    def values(self, outputs: torch.Tensor) -> torch.Tensor:
        """The model's outputs in the data's units."""
        return outputs.float() * self.std.to(outputs.device) + self.mean.to(outputs.device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the scaled targets, in float32 even under autocast."""
        scaled = (targets.float() - self.mean.to(targets.device)) / self.std.to(targets.device)
        return F.mse_loss(outputs.float(), scaled)

    def predictions(self, outputs: torch.Tensor) -> list[dict]:
        return [{"values": {name: round(float(v), 6) for name, v in zip(self.label_names, row)}}
                for row in self.values(outputs)]

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """MSE, RMSE, MAE and R² (torchmetrics) in the data's units, averaged over targets, and per target;
        `loss` is the training loss (on scaled targets). R² compares with predicting the split's own mean;
        the baseline_* figures are those of always predicting the training split's mean."""
        predicted, targets = self.values(outputs), targets.float()
        per_target = {name: _scores(predicted[:, i], targets[:, i]) for i, name in enumerate(self.label_names)}
        baseline = self.baseline.to(targets).expand_as(targets)
        trivial = [_scores(baseline[:, i], targets[:, i]) for i in range(len(self.label_names))]
        result = {"num_examples": int(targets.shape[0]), "loss": float(self.loss(outputs, targets))}
        for key in ("mse", "rmse", "mae", "r2"):
            result[key] = _mean([v[key] for v in per_target.values()])
        for key in ("rmse", "r2"):
            result[f"baseline_{key}"] = _mean([v[key] for v in trivial])
        return {**result, "per_target": per_target}

    def csv_header(self) -> list[str]:
        return list(self.label_names)

    def csv_row(self, prediction: dict) -> list:
        return list(prediction["values"].values())

    def fold_for_export(self, loaded, info):
        """The network learned its targets scaled to mean 0, std 1: fold that scaling into the head's last Linear,
        so every exported format outputs the data's units. Returns the ModelInfo to export with it."""
        head = [m for prefix in loaded.head_prefixes for m in loaded.model.get_submodule(prefix).modules()
                if isinstance(m, torch.nn.Linear)]
        if not head or head[-1].bias is None:
            raise ModelError(["this regression model's head does not end in a Linear layer with a bias, so its target "
                              "scaling cannot be folded into it for export"])
        with torch.no_grad():
            head[-1].weight.mul_(self.std[:, None].to(head[-1].weight.dtype))
            head[-1].bias.mul_(self.std.to(head[-1].bias.dtype)).add_(self.mean.to(head[-1].bias.dtype))
        outputs = len(self.label_names)
        return info.model_copy(update={"task_state": {**info.task_state, "target_mean": [0.0] * outputs,
                                                      "target_std": [1.0] * outputs}})

    # ---------------------------------------------------------------- the run's records and card

    def train_summary(self, data: TaskData) -> dict:
        targets = torch.tensor(data.targets("train"))
        return {"train_targets": {name: {"mean": float(column.mean()), "min": float(column.min()),
                                         "max": float(column.max())} for name, column in zip(data.label_names, targets.T)}}

    @classmethod
    def card_head(cls, info) -> str:
        return f"a new regression head with {len(info.label_names)} output(s), one per target"

    @classmethod
    def card_details(cls, info, recipe: dict | None) -> list[str]:
        state = info.task_state
        return ["### Targets", "", *table(["output", "column", "training mean", "training std"], [
            [i, name, number(mean), number(std)] for i, (name, mean, std)
            in enumerate(zip(info.label_names, state["target_mean"], state["target_std"]))]),
            "", "The network learned the targets scaled to mean 0 and std 1 by the values above; tuneforge and "
            "every exported format give predictions in the data's own units."]

    @classmethod
    def card_split_details(cls, split: str, metrics: dict) -> list[str]:
        per_target = metrics.get("per_target") or {}
        if len(per_target) < 2:
            return []
        return ["", f"Per target on {split}:", "", *table(["target", "RMSE", "MAE", "R²"], [
            [target, number(t["rmse"]), number(t["mae"]), number(t["r2"])] for target, t in per_target.items()])]

    @classmethod
    def card_limitations(cls, info, data_record: dict) -> list[str]:
        return ["- Targets in training ranged as listed under Training data; predictions outside that range are "
                "extrapolation and less reliable." if data_record.get("train_targets") else
                "- The training targets' range is unknown.",
                "- R² compares with always predicting the evaluation split's own mean; baseline_rmse and "
                "baseline_r2 are those of always predicting the training split's mean."]


def _scores(predicted: torch.Tensor, targets: torch.Tensor) -> dict:
    tmr = torchmetrics_functions("regression")
    mse = float(tmr.mean_squared_error(predicted, targets))
    r2 = float(tmr.r2_score(predicted, targets)) if len(targets) > 1 and targets.std() > 0 else None
    return {"mse": mse, "rmse": mse ** 0.5, "mae": float(tmr.mean_absolute_error(predicted, targets)), "r2": r2}


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)
