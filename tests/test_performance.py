"""What makes training fast must not change what it computes; and the benchmarks must run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires_shared_data, sentiment_rows

ROOT = Path(__file__).resolve().parents[1]


def _text_dataset(model_dir: Path, texts: list[str], max_length: int = 16):
    from tuneforge.data.datasets import TextDataset
    from tuneforge.data.common import Split
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = Split("train", "memory", [0] * len(texts), [str(i) for i in range(len(texts))], texts=texts)
    return TextDataset(split, [i % 2 for i in range(len(texts))], tokenizer, max_length), tokenizer


def test_dynamic_padding_gives_the_same_loss_as_full_padding(tiny_bert_no_dropout):
    from tuneforge.api import load_model
    from tuneforge.config import ImageSpec, ModelSpec
    from tuneforge.tasks.classification import ClassificationTask

    texts = [text for text, _ in sentiment_rows(12)] + ["good", "the movie was not very good but the plot was fine"]
    dataset, tokenizer = _text_dataset(tiny_bert_no_dropout, texts)
    items = [dataset[i] for i in range(len(dataset))]
    dynamic = dataset.collate(items)
    full = tokenizer.pad([{k: v.tolist() for k, v in item["features"].items()} for item in items],
                         padding="max_length", max_length=16, return_tensors="pt")
    assert dynamic["inputs"]["input_ids"].shape[1] < full["input_ids"].shape[1] == 16
    # tuneforge's own padding puts the same values where the tokenizer's would.
    longest = tokenizer.pad([{k: v.tolist() for k, v in item["features"].items()} for item in items], return_tensors="pt")
    assert all(torch.equal(dynamic["inputs"][key], longest[key]) for key in longest)

    model = load_model(ModelSpec(name=str(tiny_bert_no_dropout), head_dropout=0.0), ["neg", "pos"], ImageSpec()).model
    model.eval()
    task = ClassificationTask(["neg", "pos"], 0.0, None)
    with torch.no_grad():
        dynamic_loss = task.loss(model(**dynamic["inputs"]).logits, dynamic["labels"])
        full_loss = task.loss(model(**dict(full)).logits, dynamic["labels"])
    assert torch.allclose(dynamic_loss, full_loss, atol=1e-6)


def test_tokens_are_stored_once_as_compact_memory_mapped_arrays(tiny_bert_dir):
    import numpy as np

    texts = [text for text, _ in sentiment_rows(30)]
    dataset, tokenizer = _text_dataset(tiny_bert_dir, texts)
    assert all(values.dtype.name == "int32" and values.ndim == 1 for values in dataset.tokens.values())
    assert all(isinstance(values, np.memmap) and not values.flags.writeable for values in dataset.tokens.values())
    for index in (0, 7, 29):
        expected = tokenizer(texts[index], truncation=True, max_length=16)
        assert {key: values.tolist() for key, values in dataset[index]["features"].items()} == dict(expected)
    assert dataset.lengths() == [len(tokenizer(t)["input_ids"]) for t in texts]


def test_long_texts_are_tokenised_in_chunks_with_the_same_result(tiny_bert_dir, monkeypatch):
    from tuneforge.data.datasets import TextDataset

    texts = [text for text, _ in sentiment_rows(25)]
    whole, _ = _text_dataset(tiny_bert_dir, texts)
    monkeypatch.setattr(TextDataset, "CHUNK", 4)
    chunked, _ = _text_dataset(tiny_bert_dir, texts)
    assert all((whole.tokens[k] == chunked.tokens[k]).all() for k in whole.tokens)
    assert (whole.offsets == chunked.offsets).all()


def test_image_loaders_get_workers_and_text_loaders_do_not(tiny_bert_dir, image_data, monkeypatch):
    from tuneforge.data.datasets import ImageDataset
    from tuneforge.data.loaders import loader_workers

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    text, _ = _text_dataset(tiny_bert_dir, ["good movie"])
    image = ImageDataset.__new__(ImageDataset)
    assert loader_workers("auto", text) == 0
    assert loader_workers("auto", image) == 4
    assert loader_workers(2, text) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert loader_workers("auto", image) == 0  # one core: a worker would only compete with training


@pytest.mark.slow
@requires_shared_data("sst2", "train.tsv")
@requires_shared_data("hymenoptera", "train")
def test_benchmarks_run_on_a_tiny_configuration(tmp_path):
    report = tmp_path / "performance.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "performance.py"), "--quick", "--output", str(report)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text()
    for number in range(1, 6):
        assert f"## {number}." in text
    assert "| tuneforge | " in text and "| Hugging Face Trainer | " in text  # benchmark 1 has every contender
    assert "cache on" in text and "16x" in text and "bf16 autocast" in text
