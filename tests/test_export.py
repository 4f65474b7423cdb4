"""tuneforge export: each format reloads to the run's own logits, and the model card tells the run's facts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import text_recipe

from tuneforge import finetune
from tuneforge.cli import main as cli
from tuneforge.errors import StorageError
from tuneforge.use.export import TOLERANCE, export_run
from tuneforge.api import load_model_folder

TEXTS = ["good movie", "bad", "the plot was dull but the actor was fine and the film was long", "great", "awful film"]


@pytest.fixture
def trained_run(small_text_run):
    return small_text_run[0]


def _logits(model, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_hf_export_loads_with_transformers_and_gives_the_same_logits(trained_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = export_run(trained_run.run_dir, "hf", tmp_path / "hf")
    assert result.max_abs_diff is None
    exported = AutoModelForSequenceClassification.from_pretrained(result.folder)
    tokenizer = AutoTokenizer.from_pretrained(result.folder)
    run_model, _ = load_model_folder(trained_run.run_dir / "model")
    assert torch.equal(_logits(exported, tokenizer), _logits(run_model.model, tokenizer))


def test_onnx_export_matches_pytorch_on_new_batch_and_sequence_sizes(trained_run, tmp_path):
    import onnxruntime
    from transformers import AutoTokenizer

    result = export_run(trained_run.run_dir, "onnx", tmp_path / "onnx")
    assert result.max_abs_diff < TOLERANCE
    tokenizer = AutoTokenizer.from_pretrained(result.folder)
    session = onnxruntime.InferenceSession(str(result.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for texts in (TEXTS, TEXTS[:1], TEXTS * 3):  # batch 5, 1 and 15, each with its own padded length
        batch = tokenizer(texts, padding=True, return_tensors="np")
        onnx_logits = session.run(["logits"], {name: batch[name] for name in names})[0]
        run_model, _ = load_model_folder(trained_run.run_dir / "model")
        reference = _logits(run_model.model, tokenizer, texts).numpy()
        assert np.abs(onnx_logits - reference).max() < TOLERANCE


def test_torch_export_program_reloads_to_the_same_logits(trained_run, tmp_path):
    from transformers import AutoTokenizer

    result = export_run(trained_run.run_dir, "torch-export", tmp_path / "pt2")
    program = torch.export.load(str(result.folder / "model.pt2")).module()
    tokenizer = AutoTokenizer.from_pretrained(result.folder)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    run_model, _ = load_model_folder(trained_run.run_dir / "model")
    with torch.no_grad():
        exported = program(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert torch.allclose(exported, _logits(run_model.model, tokenizer), atol=TOLERANCE)


def test_model_card_is_written_from_the_run_records(trained_run, tmp_path):
    result = export_run(trained_run.run_dir, "hf", tmp_path / "hf")
    card = (result.folder / "README.md").read_text()
    run = trained_run.run_dir
    outcome = json.loads((run / "eval.json").read_text())
    for expected in (
        "tiny-bert",  # the base model's folder
        "train.tsv` | 64", "validation.tsv` | 32", "test.tsv` | 24",  # data sources and sizes
        "| 0 | 0 | 0 |", "| 1 | 1 | 1 |",  # the label map
        "Freezing plan: `full`", "Adapter: none", "learning rate 0.005", "schedule `linear` with warmup 0.1",
        f"{outcome['steps']} optimizer steps", f"{outcome['train_seconds']} s on cpu",
        f"| test | 24 | {outcome['splits']['test']['accuracy']:.4f} |",
        f"| validation | 32 | {outcome['splits']['validation']['accuracy']:.4f} |",
        "Per class on test", "## Intended use", "## Known limitations",
    ):
        assert expected in card, expected
    assert "unknown" not in card.split("## Model")[1].split("## Fine-tuning")[0].lower()  # the run recorded it all


def test_an_adapter_run_exports_merged_and_loads_without_peft(tiny_bert_no_dropout, text_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    recipe = text_recipe(tiny_bert_no_dropout, text_data, tmp_path / "run", epochs=1)
    recipe["adapter"] = {"method": "lora", "rank": 4}
    run = finetune(recipe)
    result = export_run(run.run_dir, "hf", tmp_path / "hf")
    exported = AutoModelForSequenceClassification.from_pretrained(result.folder)
    assert not any("lora" in name for name in exported.state_dict())
    adapted, _ = load_model_folder(run.run_dir / "model")
    assert torch.allclose(_logits(exported, adapted.preprocessor), _logits(adapted.model, adapted.preprocessor), atol=1e-5)
    assert "Adapter: lora, rank 4" in (result.folder / "README.md").read_text()


def test_image_model_exports_to_onnx_with_a_dynamic_batch(tiny_vit_dir, image_data, tmp_path):
    recipe = {"model": {"name": str(tiny_vit_dir)}, "data": {"train": str(image_data["train"]),
                                                            "validation": str(image_data["validation"])},
              "train": {"epochs": 1, "batch_size": 4}, "output": {"dir": str(tmp_path / "run")}}
    run = finetune(recipe)
    result = export_run(run.run_dir, "onnx", tmp_path / "onnx")
    assert result.max_abs_diff < TOLERANCE and (result.folder / "preprocessor_config.json").is_file()


def test_export_refuses_to_overwrite_and_the_cli_reports_bad_requests(trained_run, tmp_path, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match="not empty"):
        export_run(trained_run.run_dir, "hf", target)
    assert (target / "keep.txt").read_text() == "mine"
    assert cli(["export", str(tmp_path / "no-run"), "--format", "hf", "--output", str(tmp_path / "x")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert cli(["export", str(trained_run.run_dir), "--format", "onnx", "--output", str(tmp_path / "cli")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
