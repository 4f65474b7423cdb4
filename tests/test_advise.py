"""tuneforge advise and strategy: auto: the data and the frozen features measured before training, a strategy
recommended with its reasons, a recipe's own plan checked stage by stage, and auto training with the advice."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import interrupt_after, text_recipe

from tuneforge import finetune
from tuneforge.cli import main as cli
from tuneforge.errors import RecipeError
from tuneforge.strategies.advice import StageCheck, backbone_lr, check_stage, mean_lr, recommend
from tuneforge.strategies.schedules import make_multiplier
from tuneforge.config import ScheduleSpec
from tuneforge.training.advise import advise
from tuneforge.training.probe import Probe, _logistic_accuracy, _ridge_r2
from tuneforge.use.inspect import inspect_model


def _probe(scores, head_input, baseline=0.5, metric="accuracy") -> Probe:
    return Probe(metric, [f"block.{i}" for i in range(len(scores))], scores, head_input, baseline, 1000, 500, 1.0)


@pytest.mark.parametrize("examples, smallest, probe, expected", [
    (80, 40, _probe([0.6, 0.7], 0.6), ("head_only", None)),  # too few examples to move a backbone
    (2000, 5, _probe([0.6, 0.7], 0.6), ("head_only", None)),  # a class with 5 examples
    (2000, 900, _probe([0.9, 0.95], 0.96), ("head_only", None)),  # the head's input already separates the classes
    (2000, 900, _probe([0.80, 0.86, 0.80, 0.79], 0.70), ("partial", 2)),  # features peak at block.1: retrain 2 above
    (2000, 900, _probe([0.70, 0.75, 0.79, 0.80], 0.70), ("full", None)),  # nothing fits, nothing peaks early
    (2000, None, _probe([0.2, 0.3], 0.9, baseline=0.0, metric="r2"), ("head_only", None)),  # a number: R² 0.9
    (2000, None, None, ("full", None)),  # no probe for the task: the safe default
])
def test_the_recommendation_follows_the_measured_figures(examples, smallest, probe, expected):
    rec = recommend(examples, smallest, probe, blocks=len(probe.depths) if probe else 6, updates_per_epoch=63)
    assert (rec.strategy, rec.trainable_blocks) == expected and rec.reasons
    assert rec.epochs == (16 if rec.strategy == "head_only" else 8)  # 1,000 or 500 steps of 63 per epoch


def test_probes_fit_what_separates_and_nothing_else():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (600,))
    signal = torch.nn.functional.one_hot(labels, 3).float() * 2 + torch.randn(600, 3) * 0.3
    noise = torch.randn(600, 16)
    features = torch.cat([signal, noise], 1)
    assert _logistic_accuracy(features[:400], labels[:400], features[400:], labels[400:], 3) > 0.95
    assert _logistic_accuracy(noise[:400], labels[:400], noise[400:], labels[400:], 3) < 0.5
    target = features[:, 0] * 3 - features[:, 1]
    assert _ridge_r2(features[:400], target[:400], features[400:], target[400:]) > 0.99
    assert _ridge_r2(noise[:400], target[:400], noise[400:], target[400:]) < 0.2


def test_mean_lr_is_the_schedule_averaged_over_the_stage():
    schedule = make_multiplier(ScheduleSpec(name="linear", warmup_steps=0), 100)
    assert mean_lr(1e-3, 0.5, schedule, 50, 100) == pytest.approx(1e-3 * 0.5 * sum(1 - s / 100 for s in range(50, 100)) / 50)
    check = check_stage(StageCheck(2, ["head"], 5, 0.1, {"head": 1e-5}, "head", 1e-2), 50)
    assert len(check.problems) == 2
    assert "lasts 5 steps" in check.problems[0] and "1000x below 0.01" in check.problems[1]
    # a stage of pretrained blocks: its range test is not a yardstick (it over-suggests), slow groups still are
    check = check_stage(StageCheck(2, ["block.0", "head"], 50, 1, {"block.0": 3e-7, "head": 1e-5}, "head", 1e-2), 50)
    assert len(check.problems) == 1 and "block.0 3e-07" in check.problems[0]


def test_a_fall_within_the_probe_noise_is_no_peak_and_backbone_lrs_are_capped():
    noisy = Probe("accuracy", ["block.0", "block.1", "block.2"], [0.80, 0.81, 0.796], 0.69, 0.5, 1000, 300, 1.0)
    assert recommend(2000, 900, noisy, blocks=3, updates_per_epoch=63).strategy == "full"  # 1.4 pt < 2 x 2.3 pt
    clear = Probe("accuracy", ["block.0", "block.1", "block.2"], [0.99, 0.988, 0.968], 0.93, 0.87, 1000, 500, 1.0)
    rec = recommend(2000, 900, clear, blocks=3, updates_per_epoch=63)  # 2.2 pt > 2 x 0.45 pt: retrain after block.0
    assert (rec.strategy, rec.trainable_blocks) == ("partial", 2)
    assert backbone_lr(4e-4, "partial", True)[0] == 1e-4 and "capped" in backbone_lr(4e-4, "full", True)[1]
    assert backbone_lr(1e-2, "head_only", True) == (1e-2, None) and backbone_lr(5e-5, "full", True) == (5e-5, None)
    assert backbone_lr(2e-3, "full", transformer=False) == (2e-3, None)  # a CNN's range test is a good guide


def test_advise_measures_the_data_and_the_features_and_checks_a_poor_plan(tiny_bert_dir, text_data, tmp_path):
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=2,
                         freeze={"strategy": "progressive", "stages": [
                             {"steps": 2, "train": ["head"]},
                             {"epochs": 1, "train": ["all"], "lr_multiplier": 0.1}]})
    recipe["optim"].update({"lr_strategy": "layerwise_decay", "layer_decay": 0.05, "lr": 1e-4})
    advice = advise(recipe, output_dir=tmp_path / "advice", range_test_steps=20)
    assert advice.facts.examples == 96 and advice.facts.classes == {"0": 48, "1": 48}
    assert advice.facts.tokens["median"] == 6 and advice.facts.tokens["cut_share"] == 0.0
    assert advice.probe.depths == ["block.0", "block.1"] and len(advice.probe.scores) == 2
    assert advice.probe.baseline == 0.5 and 0 <= advice.probe.head_input <= 1
    rec = advice.recommendation
    assert rec.strategy == "head_only" and rec.lr > 0 and "96 training examples" in rec.reasons[0]
    first, second = advice.stages
    assert any("lasts 2 steps" in p for p in first.problems)
    assert any("barely move" in p and "embeddings" in p for p in second.problems)
    saved = json.loads((tmp_path / "advice" / "advice.json").read_text())
    assert saved["strategy"] == "head_only" and len(saved["stages"]) == 2
    assert (tmp_path / "advice" / "recommended" / "lr_find.png").is_file()


def test_strategy_auto_trains_with_the_advice_and_says_so(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", freeze={"strategy": "auto"})
    interrupt_after(monkeypatch, 15)  # after the first epoch's checkpoint
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe)
    monkeypatch.undo()
    result = finetune(recipe, resume=True)  # the same auto recipe: the first attempt's choice, not a new advice
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    advice = [r for r in records if r["type"] == "advice"]
    assert len(advice) == 1 and advice[0]["strategy"] == "head_only"
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert saved["model"]["freeze"]["strategy"] == "head_only"
    assert saved["optim"]["lr"] == advice[0]["lr"] and saved["train"]["epochs"] == advice[0]["epochs"]
    assert {tuple(r["groups"]) for r in records if r["type"] == "stage"} == {("head",)}
    # the card says what chose the plan
    assert cli(["export", str(result.run_dir), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    assert "chosen by `strategy: auto`" in (tmp_path / "hf" / "README.md").read_text()


def test_commands_that_need_a_concrete_plan_refuse_auto(tiny_bert_dir, text_data, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(text_recipe(tiny_bert_dir, text_data, tmp_path / "run", freeze={"strategy": "auto"})))
    assert cli(["lr-find", str(recipe), "--output-dir", str(tmp_path / "lr")]) == 2
    assert "strategy auto is chosen when `tuneforge train` starts" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="auto"):
        inspect_model(None, recipe=str(recipe))
