"""Frozen-feature caching: the same trained weights as running the frozen prefix every epoch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupt_after, text_recipe
from tuneforge import finetune

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def _cache_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "feature_cache"]


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), (name, (a[name] - b[name]).abs().max())


@pytest.mark.parametrize("freeze", [
    {"strategy": "feature_extraction"},
    {"strategy": "head_only"},
    {"strategy": "partial", "trainable_blocks": 1},
    {"strategy": "progressive", "stages": [{"steps": 6, "train": ["head"]}, {"steps": 6, "train": ["last:1", "head"]}]},
])
def test_text_cache_trains_the_same_weights_as_no_cache(tiny_bert_dir, text_data, tmp_path, freeze):
    runs = {}
    for setting in (True, False):
        recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / str(setting), cache_features=setting, epochs=3)
        recipe["model"]["freeze"] = freeze
        runs[setting] = finetune(recipe)
    cached, plain = runs[True], runs[False]
    records = _cache_records(cached.run_dir)
    expected_blocks = ["embeddings", "block.0"] if freeze["strategy"] in ("partial", "progressive") else \
        ["embeddings", "block.0", "block.1"]
    assert records and records[0]["groups"] == expected_blocks
    assert records[0]["splits"] == {"train": 96, "validation": 32}
    assert not _cache_records(plain.run_dir)
    _assert_same_weights(_weights(cached.run_dir), _weights(plain.run_dir))
    assert cached.metrics["splits"]["validation"]["loss"] == pytest.approx(
        plain.metrics["splits"]["validation"]["loss"], abs=1e-5)


def test_image_cache_skips_decoding_and_trains_the_same_weights(tiny_vit_dir, image_data, tmp_path, monkeypatch):
    from tuneforge.data import datasets

    decoded = []
    real_load = datasets.load_rgb
    monkeypatch.setattr(datasets, "load_rgb", lambda path: decoded.append(path) or real_load(path))
    runs = {}
    for setting in (True, False):
        decoded.clear()
        runs[setting] = finetune({
            "model": {"name": str(tiny_vit_dir), "freeze": {"strategy": "feature_extraction"}},
            "data": {"train": str(image_data["train"]), "validation": str(image_data["validation"]),
                     "num_workers": 0},  # decoding counted in this process
            "train": {"epochs": 4, "batch_size": 8, "seed": 0, "cache_features": setting},
            "optim": {"lr": 1e-2}, "output": {"dir": str(tmp_path / str(setting))}})
        runs[setting].decoded = len(decoded)
    # 24 training + 12 validation images: with the cache each is decoded once (plus the 8 of the
    # replay check); without it, every epoch decodes them all again.
    assert runs[True].decoded <= 24 + 12 + 8 + 12
    assert runs[False].decoded >= 4 * 24
    _assert_same_weights(_weights(runs[True].run_dir), _weights(runs[False].run_dir))


def test_factory_resnet_stem_and_blocks_are_cached(tmp_path, image_data):
    sys.path.insert(0, str(EXAMPLES))
    try:
        runs = {}
        for setting in (True, False):
            runs[setting] = finetune({
                "model": {"factory": "cifar_resnet:resnet20", "pretrained": False,
                          "freeze": {"strategy": "partial", "trainable_blocks": 2}},
                "data": {"train": str(image_data["train"]), "validation": str(image_data["validation"]),
                         "image": {"size": 32}},
                "train": {"epochs": 2, "batch_size": 8, "seed": 0, "cache_features": setting},
                "optim": {"lr": 1e-2}, "output": {"dir": str(tmp_path / str(setting))}})
    finally:
        sys.path.remove(str(EXAMPLES))
    record = _cache_records(runs[True].run_dir)[0]
    assert record["groups"][0] == "stem" and record["groups"][-1] == "block.6"
    _assert_same_weights(_weights(runs[True].run_dir), _weights(runs[False].run_dir))


def test_resumed_cached_run_equals_the_uninterrupted_one_and_reuses_the_cache(tiny_bert_dir, text_data, tmp_path,
                                                                             monkeypatch):
    settings = {"epochs": 2, "checkpoint_every_steps": 3, "cache_features": True}
    freeze = {"strategy": "partial", "trainable_blocks": 1}

    def recipe(folder):
        return text_recipe(tiny_bert_dir, text_data, tmp_path / folder, freeze, **settings)

    uninterrupted = finetune(recipe("a"))
    assert not (uninterrupted.run_dir / "feature_cache").exists()  # a finished run leaves no cache behind

    interrupt_after(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe("b"))
    monkeypatch.undo()
    assert (tmp_path / "b" / "feature_cache" / "train" / "meta.json").exists()
    import tuneforge.training.feature_cache as feature_cache

    computed = []
    real = feature_cache._boundary_outputs
    monkeypatch.setattr(feature_cache, "_boundary_outputs", lambda *a: computed.append(1) or real(*a))
    resumed = finetune(recipe("b"), resume=True)
    assert not computed  # the interrupted run's cache was still valid: nothing recomputed
    _assert_same_weights(_weights(uninterrupted.run_dir), _weights(resumed.run_dir), atol=0.0)


def test_cache_is_reused_only_while_model_and_data_are_unchanged(tiny_bert_dir, text_data, tmp_path):
    from rich.console import Console

    from tuneforge.training.feature_cache import FrozenPrefix, build_store
    from tuneforge.config import load_recipe
    from tuneforge.training.run import assemble, make_accelerator

    recipe = load_recipe(text_recipe(tiny_bert_dir, text_data, tmp_path / "run"))
    recipe.model.freeze.strategy = "head_only"
    t = assemble(recipe, make_accelerator(recipe), Console(quiet=True), tmp_path / "run", False)
    prefix: FrozenPrefix = t.prefix
    model, dataset, folder = t.loaded.model, t.loaders.datasets["train"], tmp_path / "cache"
    first = build_store(model, prefix, dataset, folder, 16, "cpu")
    stamp = (folder / "values.npy").stat().st_mtime_ns
    build_store(model, prefix, dataset, folder, 16, "cpu")
    assert (folder / "values.npy").stat().st_mtime_ns == stamp  # same key: reused, not recomputed

    with torch.no_grad():  # a changed frozen weight changes the key
        model.get_submodule(prefix.boundary).output.dense.weight.add_(0.1)
    changed = build_store(model, prefix, dataset, folder, 16, "cpu")
    assert not torch.equal(changed.rows(0), first.rows(0))

    # Changed data changes the key too: another word in the first example.
    ids = dataset.tokens["input_ids"].copy()  # the dataset's own arrays are read-only memory maps
    ids[1] = ids[2]
    dataset.tokens["input_ids"] = ids
    rebuilt = build_store(model, prefix, dataset, folder, 16, "cpu")
    assert not torch.equal(rebuilt.rows(0), changed.rows(0))


def test_no_cache_where_it_would_change_the_result(tiny_bert_dir, tiny_vit_dir, text_data, image_data, tmp_path):
    from tuneforge.errors import RecipeError

    full = text_recipe(tiny_bert_dir, text_data, tmp_path / "full", cache_features=True)
    with pytest.raises(RecipeError, match="trains the embeddings"):
        finetune(full)
    augmented = {"model": {"name": str(tiny_vit_dir), "freeze": {"strategy": "head_only"}},
                 "data": {"train": str(image_data["train"]), "augment": {"horizontal_flip": True}},
                 "train": {"epochs": 1, "batch_size": 8, "cache_features": True},
                 "output": {"dir": str(tmp_path / "aug")}}
    with pytest.raises(RecipeError, match="data.augment"):
        finetune(augmented)
    augmented["train"]["cache_features"] = "auto"  # auto: trains without the cache
    result = finetune(augmented)
    assert not _cache_records(result.run_dir)
    assert not (tmp_path / "full").exists() and not (tmp_path / "aug" / "feature_cache").exists()


def test_frozen_prefix_runs_in_eval_mode_with_and_without_cache(tiny_bert_dir):
    from tuneforge.strategies.freeze import FreezeSpec, build_plan
    from tuneforge.models.groups import layer_groups
    from tuneforge.api import load_model
    from tuneforge.config import ImageSpec, ModelSpec

    loaded = load_model(ModelSpec(name=str(tiny_bert_dir)), ["neg", "pos"], ImageSpec())
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(FreezeSpec(strategy="partial", trainable_blocks=1), groups, loaded.head_prefixes, 10, 10)
    assert [g.name for g in plan.fixed] == ["embeddings", "block.0"]
    plan.train_mode(loaded.model, 0)
    model = loaded.model
    assert not model.bert.embeddings.dropout.training and not model.bert.encoder.layer[0].attention.self.training
    assert model.bert.encoder.layer[1].training and model.dropout.training


def test_a_full_disk_while_caching_is_a_storage_error(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    import errno

    import numpy as np

    from tuneforge.errors import StorageError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", full)
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", cache_features=True)
    recipe["model"]["freeze"] = {"strategy": "head_only"}
    with pytest.raises(StorageError, match="feature_cache.*No space left"):
        finetune(recipe)


def test_cached_rows_sit_where_the_tokens_are_on_either_padding_side(tiny_bert_dir):
    import numpy as np
    from transformers import AutoTokenizer

    from tuneforge.data.datasets import TextDataset
    from tuneforge.data.common import Split
    from tuneforge.training.feature_cache import CACHE_KEY, CachedDataset, FeatureStore

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = ["good", "a much longer sentence about a film"]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        dataset = TextDataset(Split("train", "memory", [0, 1], ["1", "2"], texts=texts), [0, 1], tokenizer, 32)
        lengths = dataset.lengths()
        values = np.arange(sum(lengths) * 3, dtype=np.float32).reshape(-1, 3) + 1  # no zeros: padding is the only zero
        cached_set = CachedDataset(dataset, FeatureStore(values, np.concatenate([[0], np.cumsum(lengths)]), True))
        batch = cached_set.collate([cached_set[0], cached_set[1]])
        cached, mask = batch["inputs"][CACHE_KEY], batch["inputs"]["attention_mask"].bool()
        assert cached.shape == (2, max(lengths), 3) and not mask.all()
        assert torch.equal(cached[mask], torch.from_numpy(values)), side
        assert (cached[~mask] == 0).all()
