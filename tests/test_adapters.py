"""Adapters (LoRA, DoRA, IA3, prompt and prefix tuning) and BitFit: only what they own trains, and what
they save reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupt_after, text_recipe
from safetensors.torch import load_file

from tuneforge import finetune
from tuneforge.models.adapters import ADAPTER_FILE
from tuneforge.training.checkpoint import checkpoint_weights, complete_checkpoints
from tuneforge.errors import ModelError, RecipeError
from tuneforge.use.evaluate import evaluate_run
from tuneforge.api import load_model_folder

ADAPTERS = {
    "lora": {"method": "lora", "rank": 4, "alpha": 8},
    "dora": {"method": "dora", "rank": 4, "alpha": 8},
    "ia3": {"method": "ia3"},
    "prompt": {"method": "prompt", "virtual_tokens": 4},
    "prefix": {"method": "prefix", "virtual_tokens": 4},
}
MERGEABLE = ("dora", "ia3", "lora")
ADAPTER_MARKS = (".lora_", ".ia3_l.", ".tuneforge_prompt.", ".tuneforge_prefix.")


def _recipe(tiny_bert_dir, text_data, out, adapter=None, freeze=None, **train):
    recipe = text_recipe(tiny_bert_dir, text_data, out, freeze, **{"epochs": 1, **train})
    if adapter is not None:
        recipe["adapter"] = adapter
    return recipe


def _pretrained(tiny_bert_dir):
    return {"bert." + k: v for k, v in load_file(str(tiny_bert_dir / "model.safetensors")).items()}


def _final(result):
    return checkpoint_weights(complete_checkpoints(result.run_dir / "checkpoints")[-1])


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_only_the_adapter_and_the_head_change(tiny_bert_dir, text_data, tmp_path, method):
    result = finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "run", ADAPTERS[method]))
    after, before = _final(result), _pretrained(tiny_bert_dir)
    adapter = [name for name in after if any(mark in name for mark in ADAPTER_MARKS)]
    assert adapter, "the adapter was not attached"
    for name in adapter:  # every adapter tensor moved away from its initial value (LoRA B starts at zero)
        assert name.endswith(("lora_A.default.weight", "lora_magnitude_vector.default.weight")) or \
            not torch.equal(after[name], torch.zeros_like(after[name])) and not torch.equal(
                after[name], torch.ones_like(after[name])), name
    for name, value in before.items():  # the pretrained weights, wrapped or not, are bit-identical
        wrapped = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[wrapped if wrapped in after else name], value), f"{name} changed"
    assert not torch.equal(after["classifier.weight"], torch.zeros_like(after["classifier.weight"]))
    record = next(r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
                  if r["type"] == "parameters")
    assert record["adapter"] == method and 0 < record["trainable"] < record["total"] / 5


@pytest.mark.parametrize("method", MERGEABLE)
def test_adapter_folder_is_small_and_it_and_the_merged_model_reload_to_the_same_logits(tiny_bert_dir, text_data,
                                                                                        tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    result = finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "run", {**ADAPTERS[method], "save_merged": True}))
    adapter_folder, merged_folder = result.run_dir / "model", result.run_dir / "model-merged"
    assert not (adapter_folder / "model.safetensors").exists()
    full_size = (merged_folder / "model.safetensors").stat().st_size
    assert full_size >= 10 * (adapter_folder / ADAPTER_FILE).stat().st_size

    adapted, _ = load_model_folder(adapter_folder)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_folder)  # plain transformers, no peft
    batch = adapted.preprocessor(["good movie", "the plot was bad and dull"], padding=True, return_tensors="pt")
    adapted.model.eval(), merged.eval()
    with torch.no_grad():
        a, b = adapted.model(**batch).logits, merged(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()  # merging adds float rounding only
    # The reloaded adapter folder is the model the run evaluated: the same test metrics, exactly.
    assert evaluate_run(result.run_dir, text_data["validation"])["accuracy"] == \
        json.loads((result.run_dir / "eval.json").read_text())["splits"]["validation"]["accuracy"]


def test_lora_with_partial_freezing_adapts_only_the_last_block(tiny_bert_dir, text_data, tmp_path):
    freeze = {"strategy": "partial", "trainable_blocks": 1}
    result = finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "run", ADAPTERS["lora"], freeze))
    after = _final(result)
    lora_b = "bert.encoder.layer.{}.attention.self.query.lora_B.default.weight"
    assert torch.equal(after[lora_b.format(0)], torch.zeros_like(after[lora_b.format(0)]))  # block 0: never trained
    assert not torch.equal(after[lora_b.format(1)], torch.zeros_like(after[lora_b.format(1)]))
    assert after["bert.encoder.layer.1.output.dense.weight"].equal(_pretrained(tiny_bert_dir)["bert.encoder.layer.1.output.dense.weight"])
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "feature_cache" for r in records)  # embeddings + block 0 are a fixed prefix: cached


def test_bitfit_trains_biases_and_the_head_only(tiny_bert_dir, text_data, tmp_path):
    result = finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "run", freeze={"strategy": "bitfit"}))
    after, before = _final(result), _pretrained(tiny_bert_dir)
    moved = {name for name, value in before.items() if not torch.equal(after[name], value)}
    assert moved and all(name.endswith(".bias") for name in moved)
    assert "bert.encoder.layer.0.attention.self.query.bias" in moved
    assert "bert.embeddings.word_embeddings.weight" not in moved


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_resume_with_an_adapter_is_bit_identical(tiny_bert_dir, text_data, tmp_path, monkeypatch, method):
    settings = {"checkpoint_every_steps": 3}
    whole = finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "a", ADAPTERS[method], epochs=2, **settings))
    interrupt_after(monkeypatch, 8)
    broken = _recipe(tiny_bert_dir, text_data, tmp_path / "b", ADAPTERS[method], epochs=2, **settings)
    with pytest.raises(KeyboardInterrupt):
        finetune(broken)
    monkeypatch.undo()
    resumed = finetune(broken, resume=True)
    a, b = _final(whole), _final(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_adapter_that_fits_nothing_is_a_clear_error(tiny_bert_dir, text_data, tmp_path):
    adapter = {"method": "lora", "target_modules": ["no_such_layer"]}
    with pytest.raises(ModelError, match="target_modules"):
        finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "run", adapter))
    baseline = _recipe(tiny_bert_dir, text_data, tmp_path / "run", ADAPTERS["lora"])
    baseline["model"]["pretrained"] = False
    with pytest.raises(RecipeError, match="model.pretrained: true"):
        finetune(baseline)


def test_lora_with_gradient_checkpointing_and_bf16(tiny_bert_no_dropout, text_data, tmp_path):
    plain = finetune(_recipe(tiny_bert_no_dropout, text_data, tmp_path / "a", ADAPTERS["lora"]))
    checkpointed = finetune(_recipe(tiny_bert_no_dropout, text_data, tmp_path / "b", ADAPTERS["lora"],
                                    gradient_checkpointing=True))
    a, b = _final(plain), _final(checkpointed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # recomputing activations changes nothing
    bf16 = finetune(_recipe(tiny_bert_no_dropout, text_data, tmp_path / "c", ADAPTERS["lora"], mixed_precision="bf16"))
    name = "bert.encoder.layer.1.attention.self.value.lora_B.default.weight"
    assert not torch.equal(_final(bf16)[name], torch.zeros_like(a[name])) and bf16.metrics["accuracy"] > 0


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_layerwise_learning_rates_reach_the_adapters_by_block(tiny_bert_dir, method):
    from tuneforge.models.adapters import AdapterSpec, adapter_scope, apply_adapter
    from tuneforge.strategies.freeze import FreezeSpec, build_plan
    from tuneforge.models.groups import layer_groups
    from tuneforge.api import load_model
    from tuneforge.strategies.optim import build_optimizer
    from tuneforge.config import ImageSpec, ModelSpec, OptimSpec

    spec = ModelSpec(name=str(tiny_bert_dir))
    loaded = load_model(spec, ["a", "b"], ImageSpec())
    apply_adapter(loaded, AdapterSpec(**ADAPTERS[method]), spec, ImageSpec())
    mark = ".lora_" if method == "lora" else ".tuneforge_prefix."
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(FreezeSpec(), groups, loaded.head_prefixes, 10, 100, adapter_scope(loaded))
    optim = OptimSpec(lr=1e-3, lr_strategy="layerwise_decay", layer_decay=0.5, schedule="constant")
    optimizer, _ = build_optimizer(loaded.model, groups, plan, optim, 100)
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    by_group = {g["name"]: (g["lr"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups}
    for block, decay in (("block.0", 0.25), ("block.1", 0.5)):  # the adapters sit in their block's group
        lr, params = by_group[f"{block}/decay"]
        assert params and all(mark in name for name in params) and lr == pytest.approx(1e-3 * decay)
    optimized = [name for _, params in by_group.values() for name in params]
    assert all(mark in name or name.startswith("classifier") for name in optimized)  # no pretrained weight


def _complete(result):
    return [checkpoint_weights(path) for path in complete_checkpoints(result.run_dir / "checkpoints")]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_learn_reload_exactly_and_export(tiny_bert_dir, text_data, tmp_path, method):
    from tuneforge.use.export import TOLERANCE, export_run

    result = finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "run", ADAPTERS[method], epochs=2))
    first, last = _complete(result)[0], _complete(result)[-1]
    vectors = [name for name in last if f".tuneforge_{method}." in name]
    assert vectors and all(not torch.equal(first[name], last[name]) for name in vectors)  # they train
    folder = result.run_dir / "model"
    assert not (folder / "model.safetensors").exists()
    assert (folder / ADAPTER_FILE).stat().st_size * 10 <= sum(v.numel() * 4 for v in _pretrained(tiny_bert_dir).values())
    assert evaluate_run(result.run_dir, text_data["validation"])["accuracy"] == \
        json.loads((result.run_dir / "eval.json").read_text())["splits"]["validation"]["accuracy"]

    loaded, _ = load_model_folder(folder)
    loaded.model.eval()
    tokenizer = loaded.preprocessor
    texts = ["good movie", "the plot was bad and dull and far too long"]
    with torch.no_grad():  # padding the short text changes nothing: the mask covers the added vectors
        together = loaded.model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        alone = loaded.model(**tokenizer(texts[:1], return_tensors="pt")).logits
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    for fmt in ("onnx", "torch-export"):  # the exported graph holds the vectors
        assert export_run(result.run_dir, fmt, tmp_path / fmt).max_abs_diff < TOLERANCE
    with pytest.raises(ModelError, match="--format onnx or torch-export"):
        export_run(result.run_dir, "hf", tmp_path / "hf")
    with pytest.raises(RecipeError, match="save_merged"):
        finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "merged", {**ADAPTERS[method], "save_merged": True}))


def test_prefix_with_partial_freezing_trains_the_last_block_and_caches_the_rest(tiny_bert_no_dropout, text_data,
                                                                                 tmp_path):
    freeze = {"strategy": "partial", "trainable_blocks": 1}
    cached = finetune(_recipe(tiny_bert_no_dropout, text_data, tmp_path / "a", ADAPTERS["prefix"], freeze, epochs=2))
    plain = finetune(_recipe(tiny_bert_no_dropout, text_data, tmp_path / "b", ADAPTERS["prefix"], freeze, epochs=2,
                             cache_features=False))
    records = [json.loads(line) for line in (cached.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "feature_cache" for r in records)  # embeddings + block 0 with its prefix: fixed
    first, last = _complete(cached)[0], _complete(cached)[-1]
    prefix = "bert.encoder.layer.{}.attention.self.tuneforge_prefix.key"
    assert not torch.equal(first[prefix.format(1)], last[prefix.format(1)])
    a, b = _final(cached), _final(plain)
    assert torch.equal(a[prefix.format(0)], b[prefix.format(0)])  # block 0's prefix never trains
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the cache is only a shortcut


def test_prompt_outside_the_trained_groups_is_refused(tiny_bert_dir, text_data, tmp_path):
    freeze = {"strategy": "partial", "trainable_blocks": 1}
    with pytest.raises(RecipeError, match="adapter sits in embeddings, which no stage trains"):
        finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "run", ADAPTERS["prompt"], freeze))
    with pytest.raises(RecipeError, match="target_modules applies to lora"):
        finetune(_recipe(tiny_bert_dir, text_data, tmp_path / "run", {**ADAPTERS["prefix"], "target_modules": ["query"]}))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_with_gradient_checkpointing_and_bf16(tiny_bert_no_dropout, text_data, tmp_path, method):
    adapter = ADAPTERS[method]
    plain = finetune(_recipe(tiny_bert_no_dropout, text_data, tmp_path / "a", adapter))
    checkpointed = finetune(_recipe(tiny_bert_no_dropout, text_data, tmp_path / "b", adapter,
                                    gradient_checkpointing=True))
    a, b = _final(plain), _final(checkpointed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # recomputing activations changes nothing
    bf16 = _complete(finetune(_recipe(tiny_bert_no_dropout, text_data, tmp_path / "c", adapter, epochs=2,
                                      mixed_precision="bf16")))
    vectors = [name for name in a if f".tuneforge_{method}." in name]
    assert vectors and all(not torch.equal(bf16[0][name], bf16[-1][name]) for name in vectors)  # they train in bf16

