"""The learning-rate range test on the tiny BERT: LRs, curve, suggestions, files, no trace left."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import sentiment_rows, text_recipe, write_tsv

import tuneforge.training.lr_find as lr_find_module
from tuneforge.cli import main as cli
from tuneforge.errors import RecipeError
from tuneforge.training.loop import Progress
from tuneforge.training.lr_find import _sweep, find_lr, suggest
from tuneforge.config import load_recipe

CURVE_KEYS = {"lrs", "losses", "smoothed_losses", "suggestion", "min_loss_lr", "conservative_suggestion",
              "stopped_early_at"}


def exponential(step: int, start: float, end: float, steps: int) -> float:
    return start * (end / start) ** (step / (steps - 1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr-find-data")
    return {"train": write_tsv(root / "train.tsv", sentiment_rows(96, seed=1)),
            "validation": write_tsv(root / "validation.tsv", sentiment_rows(32, seed=2))}


@pytest.fixture(scope="module")
def curve(tiny_bert_dir, data, tmp_path_factory):
    """One range test with the default output directory, shared by the tests that only read its results."""
    recipe = text_recipe(tiny_bert_dir, data, tmp_path_factory.mktemp("lr-find") / "run")
    return find_lr(recipe, start_lr=1e-3, end_lr=1.0, steps=40), recipe


def test_writes_plot_and_curve_beside_the_run_directory_and_no_model(curve):
    from PIL import Image

    result, recipe = curve
    run_dir = load_recipe(recipe).output_dir()
    out = run_dir.with_name(run_dir.name + "-lr-find")
    assert result.plot_path == out / "lr_find.png" and result.json_path == out / "lr_find.json"
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert not run_dir.exists()  # no model, recipe.yaml or checkpoints anywhere
    with Image.open(result.plot_path) as image:
        image.verify()
        assert image.format == "PNG"
    saved = json.loads(result.json_path.read_text())
    assert CURVE_KEYS <= saved.keys()
    assert saved["lrs"] == result.lrs and saved["smoothed_losses"] == result.smoothed_losses
    assert len(saved["lrs"]) == len(saved["losses"]) == len(saved["smoothed_losses"])
    assert 1e-3 <= saved["suggestion"] <= 1.0
    assert saved["conservative_suggestion"] == pytest.approx(saved["min_loss_lr"] / 10)
    end = saved["stopped_early_at"] or len(saved["lrs"])
    first = end // 10
    window = saved["smoothed_losses"][first:end]
    assert saved["min_loss_lr"] == saved["lrs"][first + window.index(min(window))]


def test_suggestion_is_the_steepest_descent_of_the_smoothed_loss(curve):
    result, _ = curve
    saved = json.loads(result.json_path.read_text())
    end = saved["stopped_early_at"] if saved["stopped_early_at"] is not None else len(saved["lrs"])
    x = [math.log10(lr) for lr in saved["lrs"][:end]]
    y = saved["smoothed_losses"][:end]
    # Central differences inside, one-sided at the ends.
    slopes = [(y[min(i + 1, end - 1)] - y[max(i - 1, 0)]) / (x[min(i + 1, end - 1)] - x[max(i - 1, 0)])
              for i in range(end)]
    first = end // 10  # the noisy start is skipped
    steepest = min(range(first, end), key=lambda i: slopes[i])
    assert saved["suggestion"] == saved["lrs"][steepest]
    assert slopes[steepest] < 0  # the tiny model does learn: the loss really falls there
    assert min(y) < y[0] - 0.1  # and by more than noise: well below the untrained loss of about ln 2


def test_lrs_grow_exponentially_and_keep_the_differential_ratio(tiny_bert_dir, data, tmp_path, monkeypatch):
    seen = []  # every group's LR at each optimizer step, read off the optimizer itself
    original = lr_find_module._train_step

    def spy(model, task, batch, optimizer, *args):
        seen.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        return original(model, task, batch, optimizer, *args)

    monkeypatch.setattr(lr_find_module, "_train_step", spy)
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run")
    recipe["optim"].update(lr=1e-2, lr_strategy="differential", group_lr={"backbone": 1e-4, "head": 1e-2})
    result = find_lr(recipe, output_dir=tmp_path / "out", start_lr=1e-6, end_lr=1e-2, steps=12)

    assert result.stopped_early_at is None and len(result.lrs) == 12
    for step, lr in enumerate(result.lrs):
        assert lr == pytest.approx(exponential(step, 1e-6, 1e-2, 12), rel=1e-12)
    assert len(seen) == 12
    for step, lrs in enumerate(seen):
        # The head has the recipe's optim.lr, so it is the reference group the curve records.
        assert lrs["head/decay"] == lrs["head/no_decay"] == result.lrs[step]
        for name, lr in lrs.items():
            if not name.startswith("head/"):
                assert lr / lrs["head/decay"] == pytest.approx(1e-2, rel=1e-9), name  # 1e-4 / 1e-2, as in training
    saved = json.loads(result.json_path.read_text())
    assert saved["reference_group"] == "head/decay"
    assert saved["group_lr_ratios"]["block.0/decay"] == pytest.approx(1e-2)


def test_stops_early_when_the_loss_diverges(tiny_bert_dir, data, tmp_path):
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run")
    result = find_lr(recipe, output_dir=tmp_path / "out", start_lr=1e-3, end_lr=100.0, steps=30)
    assert result.stopped_early_at is not None and result.stopped_early_at < 30
    assert len(result.lrs) == result.stopped_early_at + 1  # the diverged step is the last one recorded
    before = result.smoothed_losses[:-1]
    assert not result.smoothed_losses[-1] <= 4 * min(before)  # above 4x the best, or NaN/inf
    assert all(s <= 4 * min(before[:i + 1]) for i, s in enumerate(before))
    assert result.suggestion in result.lrs[:-1]  # chosen before divergence
    saved = json.loads(result.json_path.read_text())
    assert saved["stopped_early_at"] == result.stopped_early_at


def test_frozen_weights_stay_untouched(tiny_bert_dir, data, tmp_path, monkeypatch):
    from tuneforge.tasks.classification import ClassificationTask

    loaded_models = []
    original = ClassificationTask.load_model

    def keep(cls, *args, **kwargs):
        loaded = original(*args, **kwargs)
        loaded_models.append((loaded.model, {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}))
        return loaded

    monkeypatch.setattr(ClassificationTask, "load_model", classmethod(keep))
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run")
    recipe["model"]["freeze"] = {"strategy": "head_only"}
    find_lr(recipe, output_dir=tmp_path / "out", start_lr=1e-4, end_lr=1e-1, steps=10)

    (model, before), = loaded_models
    after = model.state_dict()
    frozen = [k for k in before if not k.startswith("classifier.")]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])  # the head did train
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lr_find.json", "lr_find.png"]


def test_command_line(tiny_bert_dir, data, tmp_path, capsys):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(text_recipe(tiny_bert_dir, data, tmp_path / "run")))
    out = tmp_path / "out"
    assert cli(["lr-find", str(recipe_path), "train.batch_size=16", "--steps", "20", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "suggested LR" in printed and "lr_find.png" in printed
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["steps"] == 20 and saved["start_lr"] == 1e-7 and saved["end_lr"] == 1.0

    assert cli(["lr-find", str(recipe_path), "--start-lr", "1", "--end-lr", "0.1", "--output-dir", str(out)]) == 2
    assert "must be below --end-lr" in capsys.readouterr().err


@pytest.mark.parametrize("start, end, steps, message", [
    (1e-3, 1e-3, 100, "must be below --end-lr"),
    (1.0, 0.1, 100, "must be below --end-lr"),
    (0.0, 1.0, 100, "must be positive"),
    (1e-7, -1.0, 100, "must be positive"),
    (float("nan"), 1.0, 100, "must be positive"),
    (1e-7, 1.0, 9, "at least 10"),
])
def test_bad_ranges_are_refused_before_anything_loads(start, end, steps, message, tmp_path):
    with pytest.raises(RecipeError, match=message):
        find_lr({"not": "even a valid recipe"}, output_dir=tmp_path, start_lr=start, end_lr=end, steps=steps)
    assert not any(tmp_path.iterdir())


def _fake_sweep(losses, steps=20):
    groups = [{"lr": 0.0}, {"lr": 0.0}]
    feed = iter(losses)
    return _sweep(lambda: next(feed), groups, 1, [10.0, 1.0], 1e-6, 1.0, steps, Progress(steps, 0, False)), groups


def test_sweep_stops_on_nan_and_on_four_times_the_best_loss():
    (lrs, _, smoothed, stopped), groups = _fake_sweep([1.0] * 5 + [math.nan] + [1.0] * 14)
    assert stopped == 5 and len(lrs) == 6 and math.isnan(smoothed[-1])
    assert groups[0]["lr"] == pytest.approx(10 * groups[1]["lr"])  # the ratio holds in every step
    (_, _, smoothed, stopped), _ = _fake_sweep([1.0] * 10 + [100.0] * 10)
    assert stopped is not None and smoothed[stopped] > 4.0 >= smoothed[stopped - 1]
    (lrs, _, _, stopped), _ = _fake_sweep([1.0] * 20)
    assert stopped is None and len(lrs) == 20


def test_suggest_skips_the_noisy_start_and_the_diverged_point():
    lrs = [10.0 ** (i / 10) for i in range(-60, 0)]  # 60 points, 1e-6 .. ~0.8
    smoothed = [2.0] * 60
    smoothed[1] = 0.5  # a steep drop inside the first 10%: noise, ignored
    for i in range(30, 40):
        smoothed[i] = 2.0 - 0.1 * (i - 29)  # the real descent, steepest in its middle
    for i in range(40, 59):
        smoothed[i] = 0.9
    smoothed[59] = 100.0  # the diverged point
    suggestion, min_loss_lr = suggest(lrs, smoothed, stopped_early_at=59)
    assert lrs.index(suggestion) in range(30, 40)
    assert min_loss_lr == lrs[40]  # the first of the lowest, not the noise at the start
    assert suggest(lrs[:2], smoothed[:2], None)[0] is None  # too short to have a slope


def test_batch_size_auto_is_resolved_as_training_would(tiny_bert_dir, data, tmp_path):
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", batch_size="auto")
    result = find_lr(recipe, output_dir=tmp_path / "out", start_lr=1e-4, end_lr=1e-1, steps=10)
    assert len(result.lrs) == 10 and not (tmp_path / "run").exists()
