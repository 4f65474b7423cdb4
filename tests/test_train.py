"""End to end on tiny models: recipe -> run directory -> reload / evaluate / predict."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from conftest import text_recipe

from tuneforge import finetune
from tuneforge.cli import main as cli
from tuneforge.use.evaluate import evaluate_run, predict_run


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, tmp_path_factory):
    from conftest import sentiment_rows, write_tsv

    root = tmp_path_factory.mktemp("text-run")
    data = {"train": write_tsv(root / "train.tsv", sentiment_rows(96, seed=1)),
            "validation": write_tsv(root / "validation.tsv", sentiment_rows(32, seed=2)),
            "test": write_tsv(root / "test.tsv", sentiment_rows(32, seed=3))}
    recipe = text_recipe(tiny_bert_dir, data, root / "run", epochs=4)
    return finetune(recipe), data


def test_run_directory_has_everything(text_run):
    result, _ = text_run
    run = result.run_dir
    for name in ("recipe.yaml", "metrics.jsonl", "eval.json", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/tuneforge.json"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {record["type"] for record in records}
    assert {"train", "eval", "checkpoint", "final"} <= kinds
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 4  # one per epoch
    eval_json = json.loads((run / "eval.json").read_text())
    for key in ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_weighted", "auc_roc",
                "confusion_matrix", "per_class"):
        assert key in eval_json, key
    assert eval_json["report_split"] == "test"
    # The model was selected on validation: best_step is the step of the best validation accuracy.
    best = max(evals, key=lambda r: r["accuracy"])
    assert eval_json["best_step"] == best["step"]


def test_tiny_model_learns(text_run):
    result, _ = text_run
    assert result.metrics["accuracy"] >= 0.9  # the sentiment word decides the label


def test_export_reloads_with_transformers_and_reproduces_logits(text_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result, data = text_run
    folder = result.run_dir / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "0", 1: "1"}
    sentences = [line.split("\t")[0] for line in data["test"].read_text().splitlines()[1:]]
    with torch.no_grad():
        logits = model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits
    predictions = predict_run(result.run_dir, data["test"], result.run_dir / "predictions.jsonl")
    assert predictions == len(sentences)
    rows = [json.loads(line) for line in (result.run_dir / "predictions.jsonl").read_text().splitlines()]
    ours = torch.tensor([[row["probabilities"]["0"], row["probabilities"]["1"]] for row in rows])
    assert torch.allclose(logits.softmax(-1), ours, atol=1e-5)
    assert [row["label"] for row in rows] == [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


def test_evaluate_command_matches_final_metrics(text_run, capsys):
    result, data = text_run
    metrics = evaluate_run(result.run_dir, data["test"])
    assert metrics["accuracy"] == pytest.approx(result.metrics["splits"]["test"]["accuracy"])
    assert cli(["evaluate", str(result.run_dir), "--data", str(data["test"])]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(metrics["accuracy"])


def test_predict_writes_csv(text_run, tmp_path):
    result, data = text_run
    assert cli(["predict", str(result.run_dir), "--input", str(data["test"]), "--output", str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "row,label,p_0,p_1"
    assert len(lines) == 33


def test_existing_run_is_not_overwritten(text_run):
    from tuneforge.errors import RecipeError

    result, data = text_run
    recipe = text_recipe(result.run_dir.parent, data, result.run_dir)
    with pytest.raises(RecipeError, match="already holds a run"):
        finetune(recipe)


def test_image_model_end_to_end(tiny_vit_dir, image_data, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    recipe = {
        "model": {"name": str(tiny_vit_dir)},
        "data": {"train": str(image_data["train"]), "validation": str(image_data["validation"])},
        "train": {"epochs": 3, "batch_size": 8, "seed": 0},
        "optim": {"lr": 3e-3},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = finetune(recipe)
    assert result.metrics["accuracy"] >= 0.9  # red vs blue
    folder = result.run_dir / "model"
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    assert model.config.id2label == {0: "blue", 1: "red"}
    image = image_data["validation"] / "red" / "000.png"
    with torch.no_grad():
        logits = model(**processor(Image.open(image).convert("RGB"), return_tensors="pt")).logits
    predict_run(result.run_dir, image, tmp_path / "one.jsonl")
    row = json.loads((tmp_path / "one.jsonl").read_text())
    assert row["label"] == "red"
    assert torch.allclose(logits.softmax(-1)[0], torch.tensor(list(row["probabilities"].values())), atol=1e-5)


def test_evaluate_only_recipe_trains_nothing(tiny_bert_dir, text_data, tmp_path):
    from safetensors.torch import load_file

    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=0)
    result = finetune(recipe)
    assert result.metrics["steps"] == 0
    saved = load_file(str(result.run_dir / "model" / "model.safetensors"))
    backbone = load_file(str(tiny_bert_dir / "model.safetensors"))
    for key, value in backbone.items():
        assert torch.equal(saved["bert." + key], value), key


def test_an_image_model_on_text_data_is_a_clear_error(tiny_vit_dir, text_data, tmp_path):
    from tuneforge.errors import ModelError

    with pytest.raises(ModelError, match="takes image input but data.train is text data"):
        finetune(text_recipe(tiny_vit_dir, text_data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_runs_with_different_precision_follow_each_other(tiny_bert_dir, text_data, tmp_path):
    first = finetune(text_recipe(tiny_bert_dir, text_data, tmp_path / "fp32", epochs=1, max_steps=2))
    second = finetune(text_recipe(tiny_bert_dir, text_data, tmp_path / "bf16", epochs=1, max_steps=2,
                                  mixed_precision="bf16"))
    assert first.metrics["steps"] == second.metrics["steps"] == 2


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tiny_bert_no_dropout, text_data, tmp_path):
    runs = {}
    for compiled in (False, True):
        recipe = text_recipe(tiny_bert_no_dropout, text_data, tmp_path / str(compiled), compile=compiled, epochs=1)
        recipe["model"]["head_dropout"] = 0.0  # compiled code draws dropout masks from its own generator
        runs[compiled] = finetune(recipe)
    eager, compiled = (load_file(str(runs[c].run_dir / "model" / "model.safetensors")) for c in (False, True))
    assert eager.keys() == compiled.keys()  # compiling in place keeps the parameter names of the export
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], atol=1e-4), name
