"""Shared fixtures: tiny Hugging Face models saved with save_pretrained, and small data files.

Tiny models (2 layers, width 32) go through the same loading path as real ones.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Tests never touch the network. huggingface_hub reads these once, at import, so set them
# before anything imports it (the fixtures below do).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

WORDS = ("good great fine lovely superb wonderful excellent bad awful poor terrible boring dull worse "
         "movie film plot actor story scene the a is was and but not very").split()
POSITIVE = WORDS[:7]
NEGATIVE = WORDS[7:14]
FILLER = WORDS[14:]


def shared_data_dir() -> Path:
    from tuneforge.config import default_data_dir

    return Path(default_data_dir())


def requires_shared_data(*parts: str):
    """Skip on a machine without the shared data, but never in CI, where a missing folder is a failure."""
    path = shared_data_dir().joinpath(*parts)
    return pytest.mark.skipif(not path.exists() and not os.environ.get("CI"),
                              reason=f"shared data not found at {path} (set TUNEFORGE_DATA)")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, width-32 BERT with its own word-level vocabulary, saved like a Hub model."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    assert tokenizer("good movie")["input_ids"] == [2, vocab.index("good"), vocab.index("movie"), 3]
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)  # a backbone without a task head, like the packaged MiniLM
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT without dropout, for comparisons that must not depend on random masks."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    for file in tiny_bert_dir.iterdir():
        shutil.copy(file, folder / file.name)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def sentiment_rows(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """Toy sentences whose label a model can learn from the sentiment word they contain."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        words = rng.sample(FILLER, 3) + [word]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    lines = ["\t".join(header)] + [f"{text}\t{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def text_data(tmp_path) -> dict[str, Path]:
    return {
        "train": write_tsv(tmp_path / "train.tsv", sentiment_rows(96, seed=1)),
        "validation": write_tsv(tmp_path / "validation.tsv", sentiment_rows(32, seed=2)),
        "test": write_tsv(tmp_path / "test.tsv", sentiment_rows(32, seed=3)),
    }


def write_image_folder(root: Path, per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """Two classes a model can tell apart: reddish and bluish noisy squares."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(150, 255, size=(size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def image_data(tmp_path) -> dict[str, Path]:
    return {"train": write_image_folder(tmp_path / "train", 12, seed=1),
            "validation": write_image_folder(tmp_path / "val", 6, seed=2)}


@pytest.fixture(scope="session")
def small_text_run(tiny_bert_dir, tmp_path_factory):
    """One finished 2-epoch run of the tiny BERT (64 train, 32 validation, 24 test rows), shared by the tests
    that only read a run: export, serving. Returns the run's result and its data files."""
    from tuneforge import finetune

    root = tmp_path_factory.mktemp("small-text-run")
    data = {"train": write_tsv(root / "train.tsv", sentiment_rows(64, seed=1)),
            "validation": write_tsv(root / "validation.tsv", sentiment_rows(32, seed=2)),
            "test": write_tsv(root / "test.tsv", sentiment_rows(24, seed=3))}
    return finetune(text_recipe(tiny_bert_dir, data, root / "run", epochs=2)), data


def text_recipe(model_dir: Path, data: dict[str, Path], out: Path, freeze: dict | None = None, **train) -> dict:
    recipe = {
        "name": "tiny-text",
        "model": {"name": str(model_dir), "max_length": 16},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                 **({"test": str(data["test"])} if "test" in data else {}),
                 "text_column": "sentence", "label_column": "label"},
        "train": {"epochs": 2, "batch_size": 8, "seed": 0, "log_every_steps": 2, **train},
        "optim": {"lr": 5e-3, "schedule": {"name": "linear", "warmup_ratio": 0.1}},
        "output": {"dir": str(out)},
    }
    if freeze is not None:
        recipe["model"]["freeze"] = freeze
    return recipe


def interrupt_after(monkeypatch, step: int) -> None:
    """Make training raise KeyboardInterrupt right after optimizer step `step`, as a Ctrl-C there would."""
    from tuneforge.training.hooks import RunHooks

    original = RunHooks.on_step_end

    def stop(self, state):
        original(self, state)
        if state.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunHooks, "on_step_end", stop)


def script_accuracy(monkeypatch, values: list[float]) -> None:
    """Make successive evaluations report these accuracies (then the real ones): a scripted metric sequence."""
    from tuneforge.tasks.classification import ClassificationTask

    scripted = iter(values)
    real = ClassificationTask.metrics

    def metrics(self, logits, labels):
        result = real(self, logits, labels)
        result["accuracy"] = next(scripted, result["accuracy"])
        return result

    monkeypatch.setattr(ClassificationTask, "metrics", metrics)


@pytest.fixture(autouse=True)
def _quiet_offline(monkeypatch):
    # Tests never touch the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
