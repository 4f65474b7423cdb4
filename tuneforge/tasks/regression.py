"""Regression: one or more continuous targets per example, from text or images.

The model learns the targets scaled to mean 0 and standard deviation 1 (by the training
split; `task.normalize_targets`), so the new head starts at the right scale whatever the
units; predictions and metrics are in the data's own units. The scaling is saved with
the model (tuneforge.json) and folded into exported models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional import regression as tmr

from tuneforge.tasks.base import TaskBase


class RegressionTask(TaskBase):
    name = "regression"
    summary_keys = ("rmse", "mae", "r2", "baseline_rmse", "loss")

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
    def info(self) -> dict:
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


def _scores(predicted: torch.Tensor, targets: torch.Tensor) -> dict:
    mse = float(tmr.mean_squared_error(predicted, targets))
    r2 = float(tmr.r2_score(predicted, targets)) if len(targets) > 1 and targets.std() > 0 else None
    return {"mse": mse, "rmse": mse ** 0.5, "mae": float(tmr.mean_absolute_error(predicted, targets)), "r2": r2}


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)
