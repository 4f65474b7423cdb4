"""Regression and multi-label classification: metrics equal hand-computed values, a training step
lowers the loss, and whole runs go through evaluate, predict, load and export with the task's outputs."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, text_recipe

from tuneforge import finetune, load
from tuneforge.errors import DataError, RecipeError
from tuneforge.use.evaluate import evaluate_run, predict_run
from tuneforge.tasks.multilabel import MultiLabelTask
from tuneforge.tasks.regression import RegressionTask


# ---------------------------------------------------------------- metrics by hand

def test_regression_metrics_equal_hand_computed_values():
    task = RegressionTask(["score"], mean=[2.0], std=[2.0], baseline=[2.0])
    outputs = torch.tensor([[0.0], [1.0], [-1.0]])  # in the data's units: 2, 4, 0
    targets = torch.tensor([[1.0], [4.0], [1.0]])  # errors 1, 0, -1
    metrics = task.metrics(outputs, targets)
    assert metrics["mse"] == pytest.approx(2 / 3) and metrics["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert metrics["mae"] == pytest.approx(2 / 3)
    assert metrics["r2"] == pytest.approx(1 - 2 / 6)  # residual 2, total 6 around the targets' mean 2
    assert metrics["baseline_rmse"] == pytest.approx(math.sqrt((1 + 4 + 1) / 3))  # always 2
    assert metrics["baseline_r2"] == pytest.approx(0.0)
    assert metrics["loss"] == pytest.approx((0.25 + 0 + 0.25) / 3)  # on scaled targets -0.5, 1, -0.5
    assert task.predictions(outputs)[1] == {"values": {"score": 4.0}}


def test_multilabel_metrics_equal_hand_computed_values():
    task = MultiLabelTask(["a", "b", "c"], threshold=0.5)
    probabilities = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.8, 0.4], [0.6, 0.6, 0.1]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0]])
    # predicted [1,0,1], [0,1,0], [1,1,0]: true positives 4, false positives 1, false negatives 1
    metrics = task.metrics(torch.logit(probabilities), targets)
    assert metrics["precision_micro"] == pytest.approx(4 / 5) and metrics["recall_micro"] == pytest.approx(4 / 5)
    assert metrics["f1_micro"] == pytest.approx(4 / 5)
    assert metrics["exact_match"] == pytest.approx(1 / 3)  # only the first example is all right
    # per label F1: a 1.0 (2 of 2), b 2/3 (1 right, 1 false alarm), c 2/3 (1 of 2 found)
    assert metrics["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert metrics["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert task.predictions(torch.logit(probabilities))[2]["labels"] == ["a", "b"]


def test_threshold_tuning_picks_the_best_micro_f1():
    task = MultiLabelTask(["a", "b"])
    probabilities = torch.tensor([[0.3, 0.1], [0.25, 0.35], [0.1, 0.05]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 0]])
    threshold = task.tune(torch.logit(probabilities), targets)
    assert 0.1 <= threshold < 0.25 and task.threshold == threshold  # catches all three positives, no false one
    assert task.metrics(torch.logit(probabilities), targets)["f1_micro"] == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["regression", "multilabel"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny_bert_no_dropout, kind):
    from tuneforge.api import load_model
    from tuneforge.config import ImageSpec, ModelSpec

    torch.manual_seed(0)
    loaded = load_model(ModelSpec(name=str(tiny_bert_no_dropout)), ["x", "y"], ImageSpec())
    loaded.model.eval()  # no dropout: the two losses see the same function
    batch = loaded.preprocessor(["good movie", "bad plot", "the film was superb", "dull"], padding=True,
                                return_tensors="pt")
    if kind == "regression":
        task, targets = RegressionTask(["x", "y"], [1.0, 10.0], [2.0, 5.0], [1.0, 10.0]), torch.tensor(
            [[3.0, 20.0], [-1.0, 0.0], [3.0, 15.0], [-1.0, 5.0]])
    else:
        task, targets = MultiLabelTask(["x", "y"]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    optimizer = torch.optim.SGD(loaded.model.parameters(), lr=0.05)  # a small gradient step must go downhill
    before = task.loss(loaded.model(**batch).logits, targets)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert task.loss(loaded.model(**batch).logits, targets) < before


# ---------------------------------------------------------------- whole runs

def _scored_rows(count: int, seed: int) -> list[tuple[str, int]]:
    """Sentences with k positive and 3 - k negative words: k is a target a model can learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        k = i % 4
        words = rng.sample(POSITIVE, k) + rng.sample(NEGATIVE, 3 - k) + rng.sample(FILLER, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), k))
    return rows


def _write(path, header, rows):
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(map(str, row)) for row in rows]) + "\n")
    return path


@pytest.fixture
def regression_data(tmp_path):
    # Two targets on different scales: k, and 100 + 10 k.
    return {split: _write(tmp_path / f"{split}.tsv", ("sentence", "k", "big"),
                          [(text, k, 100 + 10 * k) for text, k in _scored_rows(count, seed)])
            for split, count, seed in (("train", 96, 1), ("validation", 32, 2), ("test", 32, 3))}


def test_regression_run_predicts_in_the_data_units_and_exports_them(tiny_bert_dir, regression_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tuneforge.use.export import export_run

    recipe = text_recipe(tiny_bert_dir, regression_data, tmp_path / "run", epochs=3)
    recipe["task"] = {"type": "regression"}
    recipe["data"]["label_column"] = ["k", "big"]
    result = finetune(recipe)
    assert result.metrics["report_split"] == "test" and result.metrics["rmse"] is not None
    assert set(result.metrics["per_target"]) == {"k", "big"} and "baseline_r2" in result.metrics
    info = json.loads((result.run_dir / "model" / "tuneforge.json").read_text())
    train_k = [k for _, k in _scored_rows(96, 1)]
    state = info["task_state"]  # what training decided: the target scaling
    assert state["target_mean"][0] == pytest.approx(np.mean(train_k)) and state["target_std"][0] == pytest.approx(np.std(train_k))
    assert state["target_std"][1] == pytest.approx(10 * np.std(train_k))  # each target scaled by its own spread

    # evaluate gives the run's own test figures; predict and load give values in the data's units
    evaluated = evaluate_run(result.run_dir, regression_data["test"])
    assert evaluated["rmse"] == pytest.approx(result.metrics["rmse"], rel=1e-5)
    texts = ["good great fine movie", "bad awful poor plot"]
    predicted = load(result.run_dir).predict(texts)
    assert set(predicted[0]["values"]) == {"k", "big"}
    assert predict_run(result.run_dir, regression_data["test"], tmp_path / "out.csv") == 32
    assert (tmp_path / "out.csv").read_text().splitlines()[0] == "row,k,big"

    # every export outputs the data's units: the scaling is folded into the head
    folder = export_run(result.run_dir, "hf", tmp_path / "hf").folder
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = load(result.run_dir).loaded.preprocessor
    with torch.no_grad():
        exported = plain(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    expected = torch.tensor([[p["values"]["k"], p["values"]["big"]] for p in predicted])
    assert torch.allclose(exported, expected, atol=1e-4) and plain.config.problem_type == "regression"
    assert "regression model" in (folder / "README.md").read_text()
    assert export_run(result.run_dir, "onnx", tmp_path / "onnx").max_abs_diff < 1e-4


def test_multilabel_run_tunes_its_threshold_and_predicts_label_lists(tiny_bert_dir, tmp_path, monkeypatch):
    rows = {}
    for split, count, seed in (("train", 96, 1), ("validation", 32, 2), ("test", 32, 3)):
        # labels: "pos" if a positive word, "neg" if a negative word, "film" if the word film; JSON lists
        rng, lines = random.Random(seed), []
        for i in range(count):
            words = rng.sample(FILLER, 2) + ([rng.choice(POSITIVE)] if i % 2 else []) + \
                ([rng.choice(NEGATIVE)] if i % 3 else [])
            labels = (["pos"] if i % 2 else []) + (["neg"] if i % 3 else []) + (["film"] if "film" in words else [])
            lines.append(json.dumps({"text": " ".join(words), "tags": labels}))
        rows[split] = tmp_path / f"{split}.jsonl"
        rows[split].write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("TAGS_DATA", str(tmp_path))  # the shipped template recipe, on this data and the tiny model
    result = finetune("recipes/multilabel-tags.yaml", [f"model.name={tiny_bert_dir}", "model.max_length=16",
                                                       "train.batch_size=8", "optim.lr=5.0e-3"],
                      output_dir=tmp_path / "run")
    info = json.loads((result.run_dir / "model" / "tuneforge.json").read_text())
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    tuned = next(r["value"] for r in records if r["type"] == "threshold")
    assert info["task_state"]["threshold"] == tuned and result.metrics["threshold"] == tuned
    assert info["label_values"] == ["film", "neg", "pos"]
    assert {"f1_micro", "f1_macro", "exact_match", "auc_roc"} <= set(result.metrics)
    prediction = load(result.run_dir).predict("good movie")
    assert set(prediction) == {"labels", "probabilities"} and set(prediction["probabilities"]) == {"film", "neg", "pos"}
    assert evaluate_run(result.run_dir, rows["test"])["f1_micro"] == pytest.approx(result.metrics["f1_micro"])


def test_image_regression_from_a_table_of_image_paths(tiny_vit_dir, tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    lines = ["file,redness"]
    generator = np.random.default_rng(0)
    for i in range(24):
        red = int(generator.integers(0, 255))
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        pixels[..., 0] = red
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,{red / 255:.4f}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    recipe = {"model": {"name": str(tiny_vit_dir)}, "task": {"type": "regression"},
              "data": {"train": str(tmp_path / "train.csv"), "validation_fraction": 0.25, "image_column": "file",
                       "label_column": "redness"},
              "train": {"epochs": 1, "batch_size": 6}, "output": {"dir": str(tmp_path / "run")}}
    result = finetune(recipe)
    assert result.metrics["report_split"] == "validation" and result.metrics["num_examples"] == 6
    assert load(result.run_dir).predict(Image.open(tmp_path / "images" / "0.png"))["values"].keys() == {"redness"}


# ---------------------------------------------------------------- bad input

def test_bad_targets_are_reported_before_training(tiny_bert_dir, regression_data, tmp_path):
    broken = tmp_path / "broken.tsv"
    broken.write_text("sentence\tk\tbig\ngood movie\t1\t110\nbad plot\tlots\t100\ndull\t\t100\n")
    recipe = text_recipe(tiny_bert_dir, {**regression_data, "train": broken}, tmp_path / "run")
    recipe["task"] = {"type": "regression"}
    recipe["data"]["label_column"] = ["k", "big"]
    with pytest.raises(DataError, match=r"2 target value\(s\) in column\(s\) \['k', 'big'\] are missing or not "
                                        r"numbers at .*broken.tsv:3, .*broken.tsv:4"):
        finetune(recipe)
    assert not (tmp_path / "run").exists()

    tags = {name: tmp_path / f"{name}.jsonl" for name in ("train", "validation")}
    tags["train"].write_text('{"sentence": "good", "tags": ["pos"]}\n{"sentence": "bad", "tags": ["neg"]}\n')
    tags["validation"].write_text('{"sentence": "good", "tags": ["pos", "happy"]}\n')
    recipe = text_recipe(tiny_bert_dir, tags, tmp_path / "run")
    recipe["task"] = {"type": "multilabel"}
    recipe["data"]["label_column"] = "tags"
    with pytest.raises(DataError, match=r"validation: label\(s\) \['happy'\] are not known .*validation.jsonl:1"):
        finetune(recipe)
    recipe["task"] = {"type": "classification"}
    with pytest.raises(DataError, match="holds lists of labels; for several labels per example set task.type: multilabel"):
        finetune(recipe)


@pytest.mark.parametrize("change, message", [
    ({"task": {"type": "regression"}, "eval": {"metric": "accuracy"}}, "eval.metric accuracy is not computed for task.type regression"),
    ({"task": {"type": "regression", "label_smoothing": 0.1}}, "label_smoothing applies to task.type classification"),
    ({"task": {"type": "multilabel"}, "data": {"sampler": "balanced"}}, "data.sampler balanced"),
    ({"task": {"type": "multilabel", "threshold": 1.5}}, "threshold must be between 0 and 1"),
    ({"data": {"label_column": ["a", "b"]}}, "only task.type regression reads"),
])
def test_task_settings_that_do_not_fit_are_refused(change, message):
    from tuneforge.config import load_recipe

    raw = {"model": {"name": "m"}, "data": {"train": "t.tsv"}}
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(RecipeError, match=message):
        load_recipe(raw)


def test_defaults_follow_the_task():
    from tuneforge.config import load_recipe

    regression = load_recipe({"model": {"name": "m"}, "data": {"train": "t"}, "task": {"type": "regression"}})
    assert (regression.eval.metric, regression.eval.mode) == ("rmse", "min")
    multilabel = load_recipe({"model": {"name": "m"}, "data": {"train": "t"}, "task": {"type": "multilabel"}})
    assert (multilabel.eval.metric, multilabel.eval.mode) == ("f1_micro", "max")
    loss = load_recipe({"model": {"name": "m"}, "data": {"train": "t"}, "eval": {"metric": "loss"}})
    assert loss.eval.mode == "min"


def test_label_text_lines_are_read_like_sst5(tmp_path):
    from tuneforge.data.tables import read_split
    from tuneforge.config import DataSpec

    path = tmp_path / "stsa.fine.train"
    path.write_text("3 a gripping , funny film\n0 dull\n\n4 superb  acting\n")
    split = read_split("train", str(path), DataSpec(format="label-text"))
    blank = lambda value: value is None or value != value  # a blank line: no label, no text (reported as missing)
    assert split.labels[:2] + split.labels[3:] == ["3", "0", "4"] and blank(split.labels[2]) and blank(split.texts[2])
    assert split.texts[:2] + split.texts[3:] == ["a gripping , funny film", "dull", "superb  acting"]
    assert split.rows[3].endswith(":4")  # the file's own line numbers


def test_multilabel_text_cells_are_split_at_the_separator(tmp_path):
    from tuneforge.api import load_task_data
    from tuneforge.config import DataSpec, TaskSpec

    train = tmp_path / "train.tsv"
    train.write_text("text\ttags\ngood film\tpos; film\nbad\tneg\nnothing\t\n")
    data = load_task_data(DataSpec(train=str(train), label_column="tags", label_separator=";"), TaskSpec(type="multilabel"))
    assert data.labels == ["film", "neg", "pos"]
    assert data.targets("train") == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # an empty cell: no label
