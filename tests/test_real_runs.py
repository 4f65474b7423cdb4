"""The shipped recipes on real data from ../shared/data, with quality bars only real learning clears.

These take minutes on 2 CPU cores (marked slow); CI runs them.
"""

from __future__ import annotations

import json

import pytest
from conftest import requires_shared_data
from transformers import AutoModelForSequenceClassification

from tuneforge import finetune

pytestmark = pytest.mark.slow


@requires_shared_data("sst2", "train.tsv")
def test_sst2_minilm_recipe(tmp_path):
    result = finetune("recipes/sst2-minilm.yaml", output_dir=tmp_path / "sst2")
    metrics = result.metrics
    assert metrics["report_split"] == "test" and metrics["num_examples"] == 872  # the whole GLUE validation set
    assert metrics["accuracy"] >= 0.85, metrics["accuracy"]
    assert metrics["train_seconds"] < 600  # the recipe's budget: at most 10 minutes of training
    model = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    print(json.dumps({k: metrics[k] for k in ("accuracy", "f1_macro", "auc_roc", "train_seconds")}))


@requires_shared_data("cifar10", "test")
def test_pretrained_cifar10_resnet20_without_training(tmp_path):
    result = finetune("recipes/cifar10-resnet20-eval.yaml", output_dir=tmp_path / "cifar")
    assert result.metrics["steps"] == 0
    assert result.metrics["num_examples"] == 10_000
    assert result.metrics["accuracy"] >= 0.80, result.metrics["accuracy"]


@requires_shared_data("hymenoptera", "train")
def test_hymenoptera_pretrained_beats_random_init(tmp_path):
    pretrained = finetune("recipes/hymenoptera-resnet20.yaml", output_dir=tmp_path / "pretrained").metrics
    scratch = finetune("recipes/hymenoptera-resnet20.yaml", ["model.pretrained=false"], output_dir=tmp_path / "scratch").metrics
    print(f"ants vs bees test accuracy: pretrained {pretrained['accuracy']:.3f}, random init {scratch['accuracy']:.3f}")
    assert pretrained["num_examples"] == scratch["num_examples"] == 153
    assert pretrained["accuracy"] >= scratch["accuracy"] + 0.03


@requires_shared_data("sst5", "train.txt")
def test_sst5_regression_beats_predicting_the_mean(tmp_path):
    # A shorter budget than the recipe's (3,000 sentences, one epoch); the full recipe reaches R² 0.62.
    result = finetune("recipes/sst5-regression-minilm.yaml", ["data.max_train_examples=3000", "train.epochs=1"],
                      output_dir=tmp_path / "sst5")
    metrics = result.metrics
    print(json.dumps({k: metrics[k] for k in ("rmse", "mae", "r2", "baseline_rmse", "baseline_r2", "train_seconds")}))
    assert metrics["report_split"] == "test" and metrics["num_examples"] == 2210
    assert abs(metrics["baseline_r2"]) < 0.01  # the training mean is about the test mean: R² 0 is the bar
    assert metrics["r2"] >= 0.35 and metrics["rmse"] <= metrics["baseline_rmse"] - 0.2, metrics
