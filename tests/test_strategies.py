"""Freezing plans, learning-rate strategies and regularisation, proven on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupt_after, script_accuracy, text_recipe
from safetensors.torch import load_file

from tuneforge.training.checkpoint import checkpoint_weights, complete_checkpoints
from tuneforge.errors import RecipeError
from tuneforge.strategies.freeze import FreezeSpec, build_plan
from tuneforge.models.groups import layer_groups
from tuneforge.api import load_model
from tuneforge.strategies.optim import L2SP, build_optimizer
from tuneforge.config import ImageSpec, ModelSpec, OptimSpec
from tuneforge.training.run import finetune
from tuneforge.tasks.classification import ClassificationTask, balanced_class_weights

IMAGE = ImageSpec(size=32)


def _weights(run_dir, folder="model"):
    return load_file(str(run_dir / folder / "model.safetensors"))


def _pretrained(tiny_bert_dir):
    return {"bert." + k: v for k, v in load_file(str(tiny_bert_dir / "model.safetensors")).items()}


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


# ---------------------------------------------------------------- what trains

@pytest.mark.parametrize("freeze, trains", [
    ({"strategy": "full"}, ("embeddings", "layer.0", "layer.1", "pooler", "classifier")),
    ({"strategy": "partial", "trainable_blocks": 1}, ("layer.1", "pooler", "classifier")),
    ({"strategy": "feature_extraction"}, ("pooler", "classifier")),
    ({"strategy": "head_only"}, ("classifier",)),
    ({"strategy": "full", "exclude": ["embeddings"]}, ("layer.0", "layer.1", "pooler", "classifier")),
    ({"strategy": "head_only", "include": [r"layer\.0\.output"]}, ("layer.0.output", "classifier")),
])
def test_frozen_weights_are_bit_identical_and_trained_ones_move(tiny_bert_dir, text_data, tmp_path, freeze, trains):
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=1)
    recipe["model"]["freeze"] = freeze
    result = finetune(recipe)
    after, before = _weights(result.run_dir), _pretrained(tiny_bert_dir)
    for name, value in before.items():
        should_train = any(part in name for part in trains)
        if should_train:
            assert not torch.equal(after[name], value), f"{name} should have trained"
        else:
            assert torch.equal(after[name], value), f"{name} should be frozen"


def test_progressive_unfreezes_exactly_at_stage_boundaries(tiny_bert_dir, text_data, tmp_path):
    # 12 steps an epoch: head for 4 steps, then the last block for 1 epoch, then everything.
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=3, checkpoint_every_steps=1,
                         keep_checkpoints=100)
    recipe["model"]["freeze"] = {"strategy": "progressive", "stages": [
        {"steps": 4, "train": ["head"], "lr_multiplier": 1.0},
        {"epochs": 1, "train": ["last:1", "neck", "head"], "lr_multiplier": 0.1},
        {"epochs": 1, "train": ["all"], "lr_multiplier": 0.01}]}
    result = finetune(recipe)
    stages = _records(result.run_dir, "stage")
    assert [(s["stage"], s["step"]) for s in stages] == [(0, 0), (1, 4), (2, 16)]
    checkpoints = {int(p.name.split("-")[1]): p for p in complete_checkpoints(result.run_dir / "checkpoints")}
    block1, block0 = "bert.encoder.layer.1.output.dense.weight", "bert.encoder.layer.0.output.dense.weight"
    start = _pretrained(tiny_bert_dir)

    def at(step, key):
        return start[key] if step == 0 else checkpoint_weights(checkpoints[step])[key]

    assert torch.equal(at(4, block1), start[block1])  # steps 1-4: only the head
    assert not torch.equal(at(5, block1), at(4, block1))  # step 5 is the first of stage 1
    assert torch.equal(at(16, block0), start[block0])  # block 0 frozen until step 16
    assert not torch.equal(at(17, block0), at(16, block0))
    # The stage multiplier scales the LR: step 5 (first of stage 1) runs at 0.1 x the schedule.
    train = {r["step"]: r for r in _records(result.run_dir, "train")}
    assert train[6]["stage"] == 1 and train[18]["stage"] == 2


def test_resume_inside_a_stage_is_bit_identical(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    freeze = {"strategy": "progressive", "stages": [{"steps": 5, "train": ["head"]},
                                                    {"steps": 30, "train": ["all"], "lr_multiplier": 0.5}]}
    settings = {"epochs": 2, "checkpoint_every_steps": 3}
    whole = text_recipe(tiny_bert_dir, text_data, tmp_path / "a", **settings)
    whole["model"]["freeze"] = freeze
    finetune(whole)

    interrupt_after(monkeypatch, 8)
    broken = text_recipe(tiny_bert_dir, text_data, tmp_path / "b", **settings)
    broken["model"]["freeze"] = freeze
    with pytest.raises(KeyboardInterrupt):
        finetune(broken)
    monkeypatch.undo()
    resumed = finetune(broken, resume=True)  # resumes at step 6, inside stage 1
    assert [(s["stage"], s["step"]) for s in _records(resumed.run_dir, "stage")] == [(0, 0), (1, 5), (1, 6)]
    a = checkpoint_weights(complete_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    b = checkpoint_weights(complete_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batchnorm_in_frozen_parts_keeps_its_statistics(tmp_path, image_data):
    from examples.cifar_resnet import resnet20

    torch.manual_seed(0)
    torch.save({"state_dict": resnet20().state_dict()}, tmp_path / "w.th")
    base = {"model": {"factory": "examples.cifar_resnet:resnet20", "weights": str(tmp_path / "w.th")},
            "data": {"train": str(image_data["train"]), "image": {"size": 32}},
            "train": {"epochs": 1, "batch_size": 8}}
    frozen = finetune({**base, "model": {**base["model"], "freeze": {"strategy": "partial", "trainable_blocks": 1}},
                       "output": {"dir": str(tmp_path / "frozen")}})
    moving = finetune({**base, "model": {**base["model"], "freeze": {"strategy": "partial", "trainable_blocks": 1,
                                                                     "train_bn": True}},
                       "output": {"dir": str(tmp_path / "moving")}})
    start = resnet20().state_dict() if False else torch.load(tmp_path / "w.th", weights_only=True)["state_dict"]
    key = "layer1.0.bn1.running_mean"
    assert torch.equal(_weights(frozen.run_dir)[key], start[key])
    assert not torch.equal(_weights(moving.run_dir)[key], start[key])
    trained_key = "layer3.2.bn1.running_mean"  # inside the trainable last block: statistics update
    assert not torch.equal(_weights(frozen.run_dir)[trained_key], start[trained_key])


# ---------------------------------------------------------------- bad plans

def _plan_problems(tiny_bert_dir, **freeze):
    loaded = load_model(ModelSpec(name=str(tiny_bert_dir)), ["a", "b"], IMAGE)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    with pytest.raises(RecipeError) as info:
        build_plan(FreezeSpec(**freeze), groups, loaded.head_prefixes, updates_per_epoch=10, total_steps=30)
    return info.value.problems


def test_bad_plans_are_rejected_with_the_actual_groups(tiny_bert_dir):
    problems = _plan_problems(tiny_bert_dir, strategy="partial", trainable_blocks=5)
    assert "asks for 5 blocks but the model has 2" in problems[0]
    problems = _plan_problems(tiny_bert_dir, strategy="progressive",
                              stages=[{"epochs": 1, "train": ["decoder"]}, {"epochs": 1, "train": ["block.7"]}])
    assert len(problems) == 2
    assert "its groups are: embeddings, block.0, block.1, neck, head" in problems[0]
    problems = _plan_problems(tiny_bert_dir, strategy="progressive", stages=[{"epochs": 3, "train": ["head"]},
                                                                             {"epochs": 2, "train": ["all"]}])
    assert "the last stage would never run" in problems[0]
    with pytest.raises(ValueError, match="exactly one length"):
        FreezeSpec(strategy="progressive", stages=[{"train": ["head"]}])


def test_differential_lr_must_cover_every_trainable_group(tiny_bert_dir):
    loaded = load_model(ModelSpec(name=str(tiny_bert_dir)), ["a", "b"], IMAGE)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(FreezeSpec(), groups, loaded.head_prefixes, 10, 30)
    spec = OptimSpec(lr=1e-3, lr_strategy="differential", group_lr={"head": 1e-3, "blocks": 1e-5})
    with pytest.raises(RecipeError, match="no learning rate to group"):
        build_optimizer(loaded.model, groups, plan, spec, 30)


# ---------------------------------------------------------------- learning rates per group

def _group_lr_after(loaded, plan, spec, steps):
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    optimizer, scheduler = build_optimizer(loaded.model, groups, plan, spec, 100)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return {g["name"]: g["lr"] for g in optimizer.param_groups}


def test_differential_and_layerwise_learning_rates(tiny_bert_dir):
    loaded = load_model(ModelSpec(name=str(tiny_bert_dir)), ["a", "b"], IMAGE)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(FreezeSpec(), groups, loaded.head_prefixes, 10, 100)
    differential = OptimSpec(lr=1e-3, lr_strategy="differential", schedule="constant",
                             group_lr={"backbone": 1e-5, "head": 1e-3})
    lrs = _group_lr_after(loaded, plan, differential, 3)
    assert lrs["head/decay"] == 1e-3 and lrs["block.0/decay"] == 1e-5 and lrs["embeddings/no_decay"] == 1e-5

    layerwise = OptimSpec(lr=1e-3, lr_strategy="layerwise_decay", layer_decay=0.5,
                          schedule={"name": "linear", "warmup_steps": 10})
    k = 20  # after warmup: linear decay from step 10 to 100
    lrs = _group_lr_after(loaded, plan, layerwise, k)
    factor = 1 - (k - 10) / 90
    expected = {"head": 1, "neck": 1, "block.1": 0.5, "block.0": 0.25, "embeddings": 0.125}
    for group, decay in expected.items():
        assert lrs[f"{group}/decay"] == pytest.approx(1e-3 * decay * factor, rel=1e-12), group


def test_no_weight_decay_on_biases_and_norms(tiny_bert_dir):
    loaded = load_model(ModelSpec(name=str(tiny_bert_dir)), ["a", "b"], IMAGE)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(FreezeSpec(), groups, loaded.head_prefixes, 10, 100)
    optimizer, _ = build_optimizer(loaded.model, groups, plan, OptimSpec(weight_decay=0.1), 100)
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            decays = not (name.endswith("bias") or "LayerNorm" in name)
            assert (group["weight_decay"] == 0.1) == decays, name


def test_frozen_parameters_are_not_in_the_optimizer(tiny_bert_dir):
    loaded = load_model(ModelSpec(name=str(tiny_bert_dir)), ["a", "b"], IMAGE)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(FreezeSpec(strategy="head_only"), groups, loaded.head_prefixes, 10, 100)
    optimizer, _ = build_optimizer(loaded.model, groups, plan, OptimSpec(), 100)
    assert sorted(g["name"] for g in optimizer.param_groups) == ["head/decay", "head/no_decay"]


# ---------------------------------------------------------------- regularisation

def test_early_stopping_on_a_scripted_metric_sequence(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    script_accuracy(monkeypatch, [0.50, 0.70, 0.65, 0.69, 0.90])  # best after epoch 2, no gain in 3 and 4
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=10, keep_checkpoints=10)
    recipe["eval"] = {"metric": "accuracy", "early_stopping": {"patience": 2, "min_delta": 0.0}}
    result = finetune(recipe)
    stop = _records(result.run_dir, "early_stop")
    assert len(stop) == 1 and stop[0]["step"] == 48 and stop[0]["best_step"] == 24  # epoch 4; best at epoch 2
    assert result.metrics["steps"] == 48 and result.metrics["best_step"] == 24
    at_best = checkpoint_weights(result.run_dir / "checkpoints" / "step-00000024")
    restored = _weights(result.run_dir)
    assert all(torch.equal(at_best[k], restored[k]) for k in restored)


def test_training_stops_when_the_target_is_reached(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    script_accuracy(monkeypatch, [0.50, 0.79, 0.85, 0.95])
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=10)
    recipe["eval"] = {"metric": "accuracy", "target": 0.8}
    result = finetune(recipe)
    reached = _records(result.run_dir, "target_reached")
    assert len(reached) == 1 and reached[0]["step"] == 36 and reached[0]["value"] == 0.85  # the third epoch
    assert result.metrics["steps"] == 36 and result.metrics["stopped_early"]


def test_class_weights_change_the_loss_as_the_formula_says():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    weights = torch.tensor([3.0, 0.5])
    nll = -torch.log_softmax(logits, -1)[torch.arange(3), labels]
    expected = (weights[labels] * nll).sum() / weights[labels].sum()
    assert ClassificationTask(["a", "b"], class_weights=weights).loss(logits, labels) == pytest.approx(float(expected))
    balanced = balanced_class_weights([0, 0, 0, 1], 2)
    assert balanced.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])  # inversely proportional to counts


def test_label_smoothing_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    eps = 0.3
    logp = torch.log_softmax(logits, -1)[0]
    expected = -((1 - eps) * logp[0] + eps / 3 * logp.sum())
    loss = ClassificationTask(["a", "b", "c"], label_smoothing=eps).loss(logits, torch.tensor([0]))
    assert loss == pytest.approx(float(expected), rel=1e-6)


def test_l2sp_penalty_and_effect(tiny_bert_dir, text_data, tmp_path):
    layer = torch.nn.Linear(2, 2)
    penalty = L2SP(layer, alpha=0.4, names={"weight"})
    with torch.no_grad():
        layer.weight += 1.0
    assert float(penalty().detach()) == pytest.approx(0.5 * 0.4 * 4.0)  # four entries moved by 1

    def drift(alpha, out):
        recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / out, epochs=1)
        recipe["optim"]["l2sp"] = alpha
        after, before = _weights(finetune(recipe).run_dir), _pretrained(tiny_bert_dir)
        return sum(float((after[k] - v).pow(2).sum()) for k, v in before.items() if k in after)

    assert drift(1000.0, "strong") < 0.2 * drift(0.0, "none")


def test_balanced_sampler_draws_classes_equally(tiny_bert_dir, tmp_path):
    from conftest import sentiment_rows, write_tsv

    from tuneforge.data.loaders import EpochBatchSampler, balanced_weights

    labels = [0] * 90 + [1] * 10
    sampler = EpochBatchSampler(100, 10, seed=0, weights=balanced_weights(labels))
    drawn = [labels[i] for batch in sampler.epoch_batches() for i in batch]
    assert 35 <= sum(drawn) <= 65  # about half minority, against 10 % without balancing
    rows = sentiment_rows(40)
    write_tsv(tmp_path / "t.tsv", rows)


# ---------------------------------------------------------------- memory

def _saved_activation_bytes(model, inputs) -> tuple[int, dict]:
    """Bytes autograd keeps for backward, and the gradients."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).logits.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def test_gradient_checkpointing_same_gradients_less_memory(tiny_bert_no_dropout):
    from tuneforge.models.loading import enable_gradient_checkpointing

    inputs = {"input_ids": torch.randint(5, 30, (4, 48)), "attention_mask": torch.ones(4, 48, dtype=torch.long)}
    plain = load_model(ModelSpec(name=str(tiny_bert_no_dropout), head_dropout=0.0), ["a", "b"], IMAGE)
    torch.manual_seed(0)
    checkpointed = load_model(ModelSpec(name=str(tiny_bert_no_dropout), head_dropout=0.0), ["a", "b"], IMAGE)
    checkpointed.model.load_state_dict(plain.model.state_dict())
    enable_gradient_checkpointing(checkpointed)
    # Frozen embeddings: the blocks' input needs no gradient, checkpointing must still work.
    for model in (plain.model, checkpointed.model):
        model.train()
        model.bert.embeddings.requires_grad_(False)
    bytes_plain, grads_plain = _saved_activation_bytes(plain.model, inputs)
    bytes_ckpt, grads_ckpt = _saved_activation_bytes(checkpointed.model, inputs)
    assert grads_plain.keys() == grads_ckpt.keys() and "bert.encoder.layer.0.output.dense.weight" in grads_ckpt
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_ckpt[name], atol=1e-6), name
    assert bytes_ckpt < 0.5 * bytes_plain


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_bert_no_dropout, text_data, tmp_path,
                                                                             monkeypatch):
    from transformers import BertForSequenceClassification

    recipe = text_recipe(tiny_bert_no_dropout, text_data, tmp_path / "plain", epochs=1)
    recipe["model"]["head_dropout"] = 0.0
    plain = finetune(recipe)

    real_forward = BertForSequenceClassification.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        if self.training and calls["n"] == 5 and kwargs["input_ids"].shape[0] == 8:  # step 5's batch of 8
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", forward)
    recipe["output"]["dir"] = str(tmp_path / "oom")
    survived = finetune(recipe)
    events = _records(survived.run_dir, "out_of_memory")
    assert events == [{**events[0], "step": 4, "micro_batch": 4, "splits": 2, "grad_accum_steps": 2}]
    assert survived.metrics["steps"] == plain.metrics["steps"] == 12
    a, b = _weights(plain.run_dir), _weights(survived.run_dir)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_other_errors_are_not_swallowed(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    from transformers import BertForSequenceClassification

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch in user code")

    monkeypatch.setattr(BertForSequenceClassification, "forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        finetune(text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=1))


def test_augmentation_touches_training_batches_only(tiny_vit_dir, image_data, tmp_path, monkeypatch):
    from tuneforge.data import augment as augment_module

    seen = []
    real_forward = augment_module.BatchAugmenter.forward

    def spy(self, pixel_values, labels):
        seen.append(pixel_values.shape[0])
        return real_forward(self, pixel_values, labels)

    monkeypatch.setattr(augment_module.BatchAugmenter, "forward", spy)
    recipe = {"model": {"name": str(tiny_vit_dir)},
              "data": {"train": str(image_data["train"]), "validation": str(image_data["validation"]),
                       "augment": {"rotation": 10, "horizontal_flip": True, "mixup": 0.4}},
              "train": {"epochs": 2, "batch_size": 8}, "output": {"dir": str(tmp_path / "run")}}
    result = finetune(recipe)
    assert sum(seen) == 2 * 24  # every training example, both epochs; none of the 12 validation images
    assert result.metrics["num_examples"] == 12


def test_batch_size_auto_takes_the_largest_that_fits(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    import yaml
    from transformers import BertForSequenceClassification

    real_forward = BertForSequenceClassification.forward

    def forward(self, *args, **kwargs):
        if self.training and kwargs["input_ids"].shape[0] > 16:  # a training batch over 16 "does not fit"
            raise torch.OutOfMemoryError("simulated")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", forward)
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=1, batch_size="auto")
    result = finetune(recipe)
    assert yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["train"]["batch_size"] == 16
    assert result.metrics["steps"] == 96 // 16
    # The probe left the pretrained weights alone: a plain run with batch 16 ends the same.
    plain = finetune(text_recipe(tiny_bert_dir, text_data, tmp_path / "plain", epochs=1, batch_size=16))
    a, b = _weights(result.run_dir), _weights(plain.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_feature_extraction_runs_the_backbone_as_a_fixed_extractor(tmp_path, image_data):
    from examples.cifar_resnet import resnet20

    torch.manual_seed(0)
    torch.save({"state_dict": resnet20().state_dict()}, tmp_path / "w.th")
    recipe = {"model": {"factory": "examples.cifar_resnet:resnet20", "weights": str(tmp_path / "w.th"),
                        "freeze": {"strategy": "feature_extraction", "head_hidden": 16}},
              "data": {"train": str(image_data["train"]), "image": {"size": 32}},
              "train": {"epochs": 1, "batch_size": 8}, "output": {"dir": str(tmp_path / "run")}}
    result = finetune(recipe)
    weights, start = _weights(result.run_dir), torch.load(tmp_path / "w.th", weights_only=True)["state_dict"]
    assert torch.equal(weights["layer1.0.bn1.running_mean"], start["layer1.0.bn1.running_mean"])
    assert weights["linear.1.weight"].shape == (16, 64) and weights["linear.4.weight"].shape == (2, 16)
    from tuneforge.api import load_model_folder

    # the MLP head is rebuilt on reload, by the factory the user trusts
    reloaded, _ = load_model_folder(result.run_dir / "model", factory="examples.cifar_resnet:resnet20")
    assert reloaded.model.net.linear[4].out_features == 2

    # The plan puts every backbone module in eval mode, the head in train mode.
    from tuneforge.strategies.freeze import FreezeSpec, build_plan
    from tuneforge.config import ModelSpec

    loaded = load_model(ModelSpec(factory="examples.cifar_resnet:resnet20", weights=str(tmp_path / "w.th"),
                                  freeze=FreezeSpec(strategy="feature_extraction", head_hidden=16)), ["a", "b"], IMAGE)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(FreezeSpec(strategy="feature_extraction"), groups, loaded.head_prefixes, 1, 10)
    plan.train_mode(loaded.model, 0)
    assert not loaded.model.net.layer2[0].training and not loaded.model.net.conv1.training
    assert loaded.model.net.linear.training and loaded.model.net.linear[0].training


def test_skipped_fp16_steps_are_counted_and_do_not_advance_the_schedule(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    # On a GPU with fp16, the gradient scaler skips steps whose gradients overflowed; here the
    # skip is simulated at steps 3 and 4, the way Accelerate reports it.
    from accelerate import Accelerator

    calls = {"n": 0}

    def skipped(self):
        calls["n"] += 1
        return calls["n"] in (3, 4)

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=1, log_every_steps=1)
    recipe["optim"] = {"lr": 1e-3, "schedule": {"name": "linear", "warmup_steps": 0}}
    result = finetune(recipe)
    lrs = [r["lr"] for r in _records(result.run_dir, "train")]
    total = 12
    # The schedule stood still after the two skipped steps: step 5 used the LR of step 3.
    expected = [1e-3 * (1 - k / total) for k in (0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert lrs == pytest.approx(expected)
    assert result.metrics["skipped_steps"] == 2


def test_inspect_with_a_recipe_shows_each_stage(tiny_bert_dir, text_data, tmp_path, capsys):
    import yaml

    from tuneforge.cli import main

    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=3)
    recipe["model"]["freeze"] = {"strategy": "progressive", "stages": [
        {"epochs": 1, "train": ["head"]}, {"epochs": 1, "train": ["last:1", "head"]}, {"epochs": 1, "train": ["all"]}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["inspect", "--recipe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "freezing plan" in out
    rows = [line for line in out.splitlines() if line.startswith("│ ") and line.split("│")[1].strip() in ("0", "1", "2")]
    assert [row.split("│")[2].strip() for row in rows[-3:]] == ["0", "12", "24"]  # 12 steps an epoch
    head = 32 * 2 + 2
    assert rows[-3].split("│")[6].strip() == f"{head:,}"
    assert "fixed prefix (frozen in every stage, eval mode, computed once by the feature cache): none" in out
    assert main(["inspect", "--recipe", str(path), "model.freeze.stages.2.train=[last:1]"]) == 0
    assert "computed once by the feature cache): embeddings, block.0" in capsys.readouterr().out
    assert main(["inspect", "--recipe", str(path), "model.freeze.stages.0.train=[decoder]"]) == 2


def test_feature_extraction_keeps_bert_fixed_but_the_head_dropout_on(tiny_bert_dir):
    loaded = load_model(ModelSpec(name=str(tiny_bert_dir)), ["a", "b"], IMAGE)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(FreezeSpec(strategy="feature_extraction"), groups, loaded.head_prefixes, 1, 10)
    plan.train_mode(loaded.model, 0)
    assert not loaded.model.bert.encoder.layer[0].attention.self.dropout.training
    assert loaded.model.dropout.training and loaded.model.classifier.training
    assert plan.stages[0].groups == ["neck", "head"]


def test_gradient_accumulation_equals_the_larger_batch(tiny_bert_no_dropout, text_data, tmp_path):
    def run(name, batch, accumulate):
        recipe = text_recipe(tiny_bert_no_dropout, text_data, tmp_path / name, epochs=1, batch_size=batch,
                             grad_accum_steps=accumulate)
        recipe["model"]["head_dropout"] = 0.0
        recipe["data"]["group_by_length"] = False  # same examples in each step for both runs
        return finetune(recipe)

    big, accumulated = run("big", 16, 1), run("accumulated", 8, 2)
    assert big.metrics["steps"] == accumulated.metrics["steps"] == 6
    a, b = _weights(big.run_dir), _weights(accumulated.run_dir)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
