"""tuneforge tune: the first trial is the recipe as written, pruning stops what the median says is worse, the
test split is used once, best-recipe.yaml reproduces the best trial, studies continue, and workers share one
study in SQLite and in a real PostgreSQL server without losing or repeating a trial."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import script_accuracy, text_recipe
from safetensors.torch import load_file

import tuneforge
from tuneforge import finetune
from tuneforge.cli import main as cli
from tuneforge.errors import RecipeError
from tuneforge.tuning import report

LR_ONLY = {"space": {"optim.lr": {"float": [1e-3, 2e-2], "log": True}}}


def _recipe(tiny_bert_dir, text_data, tmp_path, search=None, **train) -> dict:
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", **train)
    if search is not None:
        recipe["search"] = search
    return recipe


def _trials(study_dir: Path) -> list:
    storage = f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage).get_trials()


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_the_first_trial_is_the_recipe_as_written_and_the_test_split_is_used_once(tiny_bert_dir, text_data, tmp_path,
                                                                                   monkeypatch):
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search={**LR_ONLY, "keep_models": 1})
    calls = []
    real = report.evaluate_split
    monkeypatch.setattr(report, "evaluate_split", lambda *args: calls.append(args[2]) or real(*args))
    summary = tuneforge.tune(recipe, trials=3, output_dir=tmp_path / "study")

    plain = finetune({k: v for k, v in recipe.items() if k != "search"}, output_dir=tmp_path / "plain")
    first = tmp_path / "study" / "trials" / "trial-0000"
    assert json.loads((first / "trial.json").read_text())["values"] == {"optim.lr": recipe["optim"]["lr"]}
    # Trial 0 trains exactly what `tuneforge train` trains: the same validation figure and the same weights.
    trained = json.loads((first / "eval.json").read_text())
    assert trained["splits"]["validation"] == plain.metrics["splits"]["validation"]
    assert summary.as_written_value == plain.metrics["splits"]["validation"]["accuracy"]
    if (first / "model").is_dir():
        ours, theirs = load_file(first / "model" / "model.safetensors"), load_file(plain.run_dir / "model" / "model.safetensors")
        assert all((ours[k] == theirs[k]).all() for k in theirs)

    # Trials are compared on validation only; the test split is measured once, for the best trial.
    for folder in (tmp_path / "study" / "trials").iterdir():
        if (folder / "eval.json").exists():
            assert set(json.loads((folder / "eval.json").read_text())["splits"]) == {"validation"}
    assert calls == ["test"] and summary.test is not None and "accuracy" in summary.test
    assert summary.best_value >= summary.as_written_value  # never worse than not searching
    # The models of all but the best trial are gone (keep_models: 1); records stay.
    models = sorted(f.parent.name for f in (tmp_path / "study" / "trials").glob("*/model"))
    assert models == [f"trial-{summary.best_trial:04d}"]

    # Continued with the same recipe: more trials, the test split not looked at again for the same best.
    again = tuneforge.tune(recipe, trials=2, output_dir=tmp_path / "study")
    assert sum(again.states.values()) == 5
    assert calls.count("test") == (1 if again.best_trial == summary.best_trial else 2)


def test_best_recipe_retrains_to_the_same_validation_metric(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search={"space": {
        "optim.lr": {"float": [1e-3, 2e-2], "log": True},
        "model.freeze.strategy": {"categorical": ["full", "partial", "head_only"]},
        "model.freeze.trainable_blocks": {"int": [1, 2], "when": {"model.freeze.strategy": "partial"}}}})
    script_accuracy(monkeypatch, [0.3] * 3)  # the recipe as written looks poor, so another trial is the best
    summary = tuneforge.tune(recipe, trials=4, output_dir=tmp_path / "study")
    assert summary.best_trial != 0
    best = yaml.safe_load(summary.best_recipe.read_text())
    assert "search" not in best and best["output"]["dir"] == recipe["output"]["dir"]
    retrained = finetune(summary.best_recipe, output_dir=tmp_path / "again")
    assert retrained.metrics["splits"]["validation"]["accuracy"] == summary.best_value
    # The report: every trial in trials.csv, the plots inline in one HTML page.
    assert len((tmp_path / "study" / "trials.csv").read_text().strip().splitlines()) == 1 + 4
    page = (tmp_path / "study" / "study.html").read_text()
    assert page.count("data:image/png;base64,") == len(summary.plots) >= 2 and "trial" in page
    assert all((tmp_path / "study" / "plots" / f"{name}.png").stat().st_size > 1000 for name in summary.plots)


def test_a_trial_below_the_median_is_pruned_and_its_run_says_so(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    # Each trial evaluates after epochs 1 and 2, then once more at the end: three values per trial.
    script_accuracy(monkeypatch, [0.9, 0.9, 0.9,  # trial 0, the recipe as written
                                  0.8, 0.8, 0.8,  # trial 1
                                  0.5,  # trial 2: under the median (0.85) of the two at epoch 1: pruned there
                                  0.95, 0.95, 0.95])  # trial 3: the best
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search=LR_ONLY)
    summary = tuneforge.tune(recipe, trials=4, output_dir=tmp_path / "study")
    states = [t.state.name for t in _trials(tmp_path / "study")]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert summary.best_trial == 3 and summary.best_value == 0.95 and summary.as_written_value == 0.9
    pruned = tmp_path / "study" / "trials" / "trial-0002"
    assert json.loads((pruned / "trial.json").read_text())["state"] == "pruned"
    records = [json.loads(line) for line in (pruned / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "pruned" and records[-1]["epochs"] == 1.0 and records[-1]["accuracy"] == 0.5
    assert not (pruned / "model").exists() and not (pruned / "checkpoints").exists()
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [1]  # it stopped at epoch 1


def test_hyperband_stops_a_trial_outside_the_top_third_of_its_rung(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    script_accuracy(monkeypatch, [0.9, 0.9, 0.9, 0.5])  # trial 1 reaches the first rung (1 epoch) far below trial 0
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search={**LR_ONLY, "pruner": "hyperband"})
    tuneforge.tune(recipe, trials=2, output_dir=tmp_path / "study")
    trials = _trials(tmp_path / "study")
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    assert list(trials[1].intermediate_values) == [100]  # one epoch, in hundredths


def test_the_recipe_as_written_is_never_pruned(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    """Retried after its worker died, the as-written trial comes after others: still never pruned."""
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search={**LR_ONLY, "pruner": "median"})
    study_dir = tmp_path / "study"
    script_accuracy(monkeypatch, [0.9] * 6)
    tuneforge.tune(recipe, trials=2, output_dir=study_dir)
    study = optuna.load_study(study_name="tiny-text", storage=f"sqlite:///{study_dir / 'study.db'}")
    study.enqueue_trial(study.trials[0].params, user_attrs={"as_written": True})
    script_accuracy(monkeypatch, [0.1, 0.1, 0.1])  # far under the median: any other trial would be pruned
    tuneforge.tune(recipe, trials=1, output_dir=study_dir)
    assert _trials(study_dir)[-1].state.name == "COMPLETE"


@pytest.mark.parametrize("space, expected", [
    ({"optim.lr": {"float": [1e-2, 1e-1]}}, "the recipe's own value 0.005 is not float in [0.01, 0.1]"),
    ({"optim.learning_rate": {"float": [1e-3, 1e-2]}}, "optim.learning_rate: unknown key"),
    ({"train.batch_size": {"categorical": [8, 0]}}, "the value 0 gives a recipe that fails: train.batch_size"),
    ({"optim.lr": {"float": [1e-3, 1e-2], "log": True, "when": {"optim.lr_strategy": "single"}},
      "optim.lr_strategy": {"categorical": ["single", "layerwise_decay"], "when": {"optim.lr": 0.005}}},
     "go round in a circle"),
    ({"optim.lr": {"float": [0, 1e-2], "log": True}}, "log: true needs low above 0"),
    ({"optim.lr": {"choices": [1e-3]}}, "search.space.optim.lr.choices"),
    ({"optim.lr": {"float": [1e-3, 1e-2], "categorical": [1e-3]}}, "give exactly one of"),
    # what trials are compared on is not searched
    ({"eval.metric": {"categorical": ["accuracy", "f1_macro"]}}, "eval.metric cannot be searched"),
    ({"data.validation_fraction": {"float": [0.1, 0.3]}}, "data.validation_fraction cannot be searched"),
    ({"task.type": {"categorical": ["classification"]}}, "task.type cannot be searched"),
    ({}, "space is empty"),
    # a condition on a misspelt key, or on a value its key never takes, would silently never search the key
    ({"optim.lr": {"float": [1e-3, 1e-2], "when": {"optim.lr_stratgy": "single"}}},
     "the recipe has no key optim.lr_stratgy"),
    ({"optim.lr": {"float": [1e-3, 1e-2], "when": {"optim.lr_strategy": "layerwise"}}},
     "optim.lr_strategy is 'single' in the recipe and not searched, so optim.lr would never be searched"),
    ({"optim.lr_strategy": {"categorical": ["single", "layerwise_decay"]},
      "optim.layer_decay": {"float": [0.5, 1.0], "when": {"optim.lr_strategy": "layer_decay"}}},
     "never 'layer_decay', so optim.layer_decay would never be searched"),
    ({"optim.lr": {"float": [1e-3, 1e-2], "step": 3e-3}}, "the recipe's own value 0.005 is not float in [0.001, 0.01] "
                                                          "in steps of 0.003"),
    ({"optim.lr": {"float": [1e-3, 1e-2], "step": 2e-3}}, "high - low must be a whole number of steps"),
    # a setting of one choice, searched without saying so, would fail every trial of another choice
    ({"model.freeze.strategy": {"categorical": ["full", "partial"]}, "model.freeze.trainable_blocks": {"int": [1, 2]}},
     "add when: {model.freeze.strategy: partial}"),
])
def test_a_search_space_error_is_a_clear_error_before_anything_runs(tiny_bert_dir, text_data, tmp_path, capsys,
                                                                    space, expected):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(tiny_bert_dir, text_data, tmp_path, search={"space": space})))
    assert cli(["tune", str(recipe_file), "--output-dir", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "study").exists()


def test_a_study_continues_only_with_its_own_recipe(tiny_bert_dir, text_data, tmp_path):
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search=LR_ONLY)
    tuneforge.tune(recipe, trials=1, output_dir=tmp_path / "study")
    with pytest.raises(RecipeError, match="was started with another recipe"):
        tuneforge.tune(recipe, ["train.epochs=3"], trials=1, output_dir=tmp_path / "study")
    # how the study runs is not what it searches: a continued study may keep more models
    tuneforge.tune(recipe, ["search.keep_models=2"], trials=1, output_dir=tmp_path / "study")


def test_every_problem_of_a_search_section_at_once(tiny_bert_dir, text_data, tmp_path):
    search = {"space": {"eval.mode": {"categorical": ["max"]}, "output.dir": {"categorical": ["x"]}},
              "objectives": ["train_seconds", "metric"]}
    with pytest.raises(RecipeError) as raised:
        tuneforge.tune(_recipe(tiny_bert_dir, text_data, tmp_path, search=search), output_dir=tmp_path / "study")
    text = raised.value.render()
    assert "first objective is metric" in text and "eval.mode cannot be searched" in text and "output.dir" in text


def test_plans_tune_cannot_run_are_refused_before_anything_runs(tiny_bert_dir, text_data, tmp_path):
    auto = _recipe(tiny_bert_dir, text_data, tmp_path, search=LR_ONLY, )
    auto["model"]["freeze"] = {"strategy": "auto"}
    with pytest.raises(RecipeError, match="strategy auto"):  # advise chooses one plan; tune compares plans
        tuneforge.tune(auto, output_dir=tmp_path / "a")
    deep = _recipe(tiny_bert_dir, text_data, tmp_path, search={"space": {
        "model.freeze.trainable_blocks": {"int": [1, 5]}}})
    deep["model"]["freeze"] = {"strategy": "partial", "trainable_blocks": 1}
    with pytest.raises(RecipeError, match="search.space reaches 5, but the model has 2 blocks"):
        tuneforge.tune(deep, output_dir=tmp_path / "b")
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search=LR_ONLY)
    with pytest.raises(RecipeError, match="in-memory database"):
        tuneforge.tune(recipe, storage="sqlite:///:memory:", workers=2, output_dir=tmp_path / "c")
    with pytest.raises(RecipeError, match="--timeout"):
        tuneforge.tune(recipe, timeout=-5, output_dir=tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_another_study_in_the_same_folder_is_refused_and_the_first_keeps_its_trials(tiny_bert_dir, text_data,
                                                                                    tmp_path):
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search=LR_ONLY)
    tuneforge.tune(recipe, trials=1, output_dir=tmp_path / "study")
    first = tmp_path / "study" / "trials" / "trial-0000"
    before = (first / "trial.json").read_text(), (first / "model" / "model.safetensors").read_bytes()
    with pytest.raises(RecipeError, match="holds another study"):
        tuneforge.tune(recipe, trials=1, study="other", output_dir=tmp_path / "study")
    with pytest.raises(RecipeError, match="holds another study"):
        tuneforge.tune(recipe, trials=1, storage=f"sqlite:///{tmp_path / 'elsewhere.db'}", output_dir=tmp_path / "study")
    assert ((first / "trial.json").read_text(), (first / "model" / "model.safetensors").read_bytes()) == before
    # its database removed, the study would start again over trials it does not know: refused, the folder untouched
    (tmp_path / "study" / "study.db").unlink()
    with pytest.raises(RecipeError, match="holds the trials of an earlier one"):
        tuneforge.tune(recipe, trials=1, output_dir=tmp_path / "study")
    assert ((first / "trial.json").read_text(), (first / "model" / "model.safetensors").read_bytes()) == before


def test_a_moved_study_folder_continues_and_a_failed_first_start_can_be_retried(tiny_bert_dir, text_data, tmp_path):
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search=LR_ONLY)
    tuneforge.tune(recipe, trials=1, output_dir=tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    assert sum(tuneforge.tune(recipe, trials=1, output_dir=tmp_path / "b").states.values()) == 2
    # what a first start that failed after opening its database leaves is no obstacle to the next
    leftover = tmp_path / "c"
    leftover.mkdir()
    (leftover / "study.db").touch()
    (leftover / "study.db.lock").touch()
    assert sum(tuneforge.tune(recipe, trials=1, output_dir=leftover).states.values()) == 1


def test_choices_compare_by_value_and_maps_are_replaced_not_merged():
    from tuneforge.config.search import ParamSpec
    from tuneforge.strategies.search import draw, space_problems, trial_recipe

    assert ParamSpec(categorical=[0, 0.01]).holds(0.0) and not ParamSpec(categorical=[1, 2]).holds(True)
    base = {"optim": {"lr": 1e-3, "group_lr": {"backbone": 1e-5, "head": 1e-3}, "schedule": {"name": "linear",
                                                                                              "warmup_ratio": 0.1}}}
    assert trial_recipe(base, {"optim.group_lr": {"head": 1e-3}})["optim"]["group_lr"] == {"head": 1e-3}
    assert trial_recipe(base, {"optim.schedule": {"name": "cosine"}})["optim"]["schedule"] == {"name": "cosine",
                                                                                            "warmup_ratio": 0.1}
    # a condition on a key inside a searched section reads the section's choice
    space = {"optim.schedule": ParamSpec(categorical=[{"name": "linear"}, {"name": "cosine"}]),
             "optim.lr": ParamSpec(float=(1e-4, 1e-2), when={"optim.schedule.name": "cosine"})}
    assert "optim.lr" in draw(space, base, lambda key, p: p.categorical[1] if p.categorical else 1e-3)
    assert "optim.lr" not in draw(space, base, lambda key, p: p.categorical[0] if p.categorical else 1e-3)
    assert not [p for p in space_problems(space, base, lambda raw: None) if "optim.schedule.name" in p]


def test_sections_as_choices_set_only_the_keys_they_name(tiny_bert_dir, text_data, tmp_path):
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search={"pruner": "none", "space": {
        "model.freeze": {"categorical": [{"strategy": "full"}, {"strategy": "partial", "trainable_blocks": 1}]}}})
    recipe["model"]["freeze"] = {"strategy": "full", "train_bn": True}  # a setting the choices leave as it is
    tuneforge.tune(recipe, trials=3, output_dir=tmp_path / "study")
    trials = _trials(tmp_path / "study")
    assert trials[0].user_attrs["values"] == {"model.freeze": {"strategy": "full"}}  # the recipe as written
    for trial in trials:
        trained = yaml.safe_load((tmp_path / "study" / trial.user_attrs["run_dir"] / "recipe.yaml").read_text())
        freeze = trained["model"]["freeze"]
        assert freeze["train_bn"] is True
        assert freeze["strategy"] == trial.user_attrs["values"]["model.freeze"]["strategy"]
        assert freeze.get("trainable_blocks") == (1 if freeze["strategy"] == "partial" else None)


def test_a_failing_trial_is_one_clear_line_and_leaves_its_record(tiny_bert_dir, text_data, tmp_path, monkeypatch,
                                                                  capsys):
    from tuneforge.tuning import trial as trial_module

    real = trial_module.finetune

    def second_fails(recipe, output_dir, **kwargs):
        if output_dir.name == "trial-0001":
            output_dir.mkdir(parents=True)
            raise RecipeError(["the loss is not a number at step 3", "lower optim.lr"])
        return real(recipe, output_dir=output_dir, **kwargs)

    monkeypatch.setattr(trial_module, "finetune", second_fails)
    summary = tuneforge.tune(_recipe(tiny_bert_dir, text_data, tmp_path, search=LR_ONLY), trials=2,
                             output_dir=tmp_path / "study")
    failed = _trials(tmp_path / "study")[1]
    assert failed.state.name == "FAIL"
    assert failed.user_attrs["error"] == "the loss is not a number at step 3; lower optim.lr"
    record = json.loads((tmp_path / "study" / "trials" / "trial-0001" / "trial.json").read_text())
    assert record["state"] == "failed" and "lower optim.lr" in record["error"]
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and "trial 1 fail" in out.out
    assert summary.states == {"complete": 1, "fail": 1}


def test_a_folder_that_is_not_a_study_is_refused_and_left_alone(tiny_bert_dir, text_data, tmp_path):
    other = tmp_path / "documents"
    (other / "trials" / "trial-0000" / "model").mkdir(parents=True)
    (other / "trials" / "trial-0000" / "model" / "weights.bin").write_text("precious")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="is not a tuneforge study folder"):
        tuneforge.tune(_recipe(tiny_bert_dir, text_data, tmp_path, search=LR_ONLY), trials=1, output_dir=other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt", "trials"]
    assert (other / "trials" / "trial-0000" / "model" / "weights.bin").read_text() == "precious"


def test_two_objectives_give_a_pareto_choice_and_a_best_recipe(tiny_bert_dir, text_data, tmp_path):
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search={**LR_ONLY, "objectives": ["metric", "train_seconds"],
                                                                  "pruner": "none", "sampler": "nsga2"})
    summary = tuneforge.tune(recipe, trials=3, output_dir=tmp_path / "study")
    trials = _trials(tmp_path / "study")
    assert all(len(t.values) == 2 and t.values[1] > 0 for t in trials)
    assert summary.best_value == max(t.values[0] for t in trials) and summary.best_recipe.is_file()


def test_the_default_space_searches_strategy_depth_and_rates(tiny_bert_dir, text_data, tmp_path):
    summary = tuneforge.tune(_recipe(tiny_bert_dir, text_data, tmp_path), trials=2, output_dir=tmp_path / "study")
    searched = set(_trials(tmp_path / "study")[0].params)
    assert {"optim.lr", "optim.schedule.name", "optim.schedule.warmup_ratio", "optim.weight_decay",
            "model.freeze.strategy", "model.head_dropout", "train.epochs", "train.batch_size",
            "optim.lr_strategy"} <= searched
    assert summary.best_recipe.is_file()
    # trial 1 is the advice (96 examples: the head alone), its LR and epochs moved into the space
    advice = json.loads((tmp_path / "study" / "advice" / "advice.json").read_text())
    advised = _trials(tmp_path / "study")[1]
    assert advised.user_attrs["advice"] and summary.advice_trial == 1 and advice["strategy"] == "head_only"
    values = advised.user_attrs["values"]
    assert values["model.freeze.strategy"] == "head_only" and "model.freeze.trainable_blocks" not in values
    assert values["optim.lr"] == min(max(advice["lr"], 5e-4), 5e-2) and values["train.epochs"] == min(advice["epochs"], 4)


def test_the_advice_is_moved_into_the_space_or_left_out():
    from tuneforge.config.search import ParamSpec
    from tuneforge.strategies.search import advised_point

    space = {"model.freeze.strategy": ParamSpec(categorical=["full", "partial"]),
             "model.freeze.trainable_blocks": ParamSpec(int=(1, 4), step=1, when={"model.freeze.strategy": "partial"}),
             "optim.lr": ParamSpec(float=(1e-5, 1e-3), log=True), "train.epochs": ParamSpec(int=(1, 6))}
    base = {"model": {"freeze": {"strategy": "full"}}, "optim": {"lr": 1e-4}, "train": {"epochs": 3}}
    advised = {"model.freeze.strategy": "partial", "model.freeze.trainable_blocks": 9, "optim.lr": 0.1, "train.epochs": 8}
    assert advised_point(space, base, advised) == {"model.freeze.strategy": "partial", "model.freeze.trainable_blocks": 4,
                                                   "optim.lr": 1e-3, "train.epochs": 6}
    assert advised_point(space, base, {**advised, "model.freeze.strategy": "head_only"}) is None  # not offered
    # numbers offered as choices: the nearest (LRs on a log scale); a float on a step stays the number it is
    listed = {"optim.lr": ParamSpec(categorical=[3e-5, 1e-4, 3e-4]), "train.epochs": ParamSpec(categorical=[2, 3, 4]),
              "optim.weight_decay": ParamSpec(float=(0.0, 0.1), step=0.01)}
    point = advised_point(listed, base, {"optim.lr": 8e-5, "train.epochs": 8, "optim.weight_decay": 0.03})
    assert point == {"optim.lr": 1e-4, "train.epochs": 4, "optim.weight_decay": 0.03}


# ---------------------------------------------------------------- workers sharing a study


def _worker_recipe(tiny_bert_dir, text_data, tmp_path, **search) -> Path:
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search={**LR_ONLY, "pruner": "none", **search})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _check_shared(trials: list, expected: int, summary: dict) -> None:
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(expected)), numbers  # unique, none lost
    assert all(t.state.name == "COMPLETE" for t in trials), [t.state.name for t in trials]
    assert summary["best_value"] == max(t.values[0] for t in trials)


def test_two_local_workers_share_one_sqlite_study(tiny_bert_dir, text_data, tmp_path):
    recipe = _worker_recipe(tiny_bert_dir, text_data, tmp_path)
    done = _cli("tune", str(recipe), "--trials", "4", "--workers", "2", "--output-dir", str(tmp_path / "study"),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    _check_shared(_trials(tmp_path / "study"), 4, summary)
    logs = sorted(p.name for p in (tmp_path / "study" / "logs").glob("worker-*.log"))
    assert logs == ["worker-1.log", "worker-2.log"]


@pytest.fixture(scope="module")
def postgres_url() -> str:
    """A real PostgreSQL server: the one CI starts (TUNEFORGE_TEST_POSTGRES), else a private one started here from
    the distribution's binaries. CI never skips it."""
    url = os.environ.get("TUNEFORGE_TEST_POSTGRES")
    if url:
        yield url
        return
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs and starts it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql) and TUNEFORGE_TEST_POSTGRES is not set")
    bin_dir = Path(initdb).resolve().parent
    # PostgreSQL refuses to run as root: as root, the server runs as the postgres user, in a folder it may enter
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    data = folder / "data"
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "tuneforge", "--auth=trust"],
                   check=True, capture_output=True)
    port = 54000 + os.getpid() % 1000
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://tuneforge@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _pg_trials(url: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=url.replace("postgresql://", "postgresql+psycopg://")).get_trials()


def test_two_workers_share_one_postgresql_study(tiny_bert_dir, text_data, tmp_path, postgres_url):
    recipe = _worker_recipe(tiny_bert_dir, text_data, tmp_path)
    name = f"pg-{os.getpid()}-{time.time_ns()}"
    args = ["tune", str(recipe), "--trials", "3", "--storage", postgres_url, "--study", name]
    workers = [subprocess.Popen([sys.executable, "-m", "tuneforge", *args, "--output-dir", str(tmp_path / f"w{i}")],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [err[-2000:] for _, err in outputs]
    trials = _pg_trials(postgres_url, name)
    assert len({t.user_attrs["values"]["optim.lr"] for t in trials}) == 6  # no point drawn twice
    summaries = [json.loads((tmp_path / f"w{i}" / "summary.json").read_text()) for i in range(2)]
    _check_shared(trials, 6, max(summaries, key=lambda s: s["best_value"]))
    # each worker's folder holds the trials it ran, and together they hold them all
    ran = sorted(int(p.name.split("-")[1]) for i in range(2) for p in (tmp_path / f"w{i}" / "trials").iterdir())
    assert ran == list(range(6))


def test_a_worker_killed_mid_trial_leaves_a_failed_trial_that_runs_again(tiny_bert_dir, text_data, tmp_path,
                                                                         postgres_url):
    recipe = _worker_recipe(tiny_bert_dir, text_data, tmp_path, heartbeat_seconds=1)
    name = f"kill-{os.getpid()}-{time.time_ns()}"
    args = [sys.executable, "-m", "tuneforge", "tune", str(recipe), "train.epochs=40", "--storage", postgres_url,
            "--study", name, "--output-dir", str(tmp_path / "study")]
    worker = subprocess.Popen([*args, "--trials", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the worker is inside its first trial
        try:
            running = [t for t in _pg_trials(postgres_url, name) if t.state.name == "RUNNING"]
        except KeyError:  # the study does not exist yet
            running = []
        if running and (tmp_path / "study" / "trials" / "trial-0000" / "metrics.jsonl").exists():
            break
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert [t.state.name for t in _pg_trials(postgres_url, name)] == ["RUNNING"]
    time.sleep(4)  # three heartbeats missed

    resumed = subprocess.run([*args, "--trials", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = _pg_trials(postgres_url, name)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    # the failed trial ran again with the same values (the recipe as written), and the run counted 2 trials, not it
    assert trials[1].user_attrs["values"] == trials[0].user_attrs["values"] and trials[1].user_attrs["as_written"]
    assert trials[1].system_attrs["failed_trial"] == 0
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["states"] == {"fail": 1, "complete": 2}
    # what the killed trial left (its checkpoints) is tidied, and its record says it was interrupted
    killed = tmp_path / "study" / "trials" / "trial-0000"
    assert not (killed / "checkpoints").exists() and not (killed / "model").exists()
    assert json.loads((killed / "trial.json").read_text())["error"].startswith("interrupted")


def test_the_documented_search_section_is_a_valid_one():
    from tuneforge.config import load_recipe
    from tuneforge.strategies.search import space_problems

    text = (Path(__file__).resolve().parents[1] / "docs" / "strategies.md").read_text()
    block = text[text.index("search:\n  space:"):]
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "sst2-minilm.yaml").read_text())
    recipe.update(yaml.safe_load(block[:block.index("```")]))
    loaded = load_recipe(recipe)
    assert len(loaded.search.space) >= 5
    assert space_problems(loaded.search.space, loaded.model_dump(mode="json"), load_recipe) == []


def test_a_worker_that_fails_makes_the_command_fail_after_the_report(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    from tuneforge.tuning import study as study_module

    real = subprocess.Popen
    seen = []

    def second_worker_fails(command, **kwargs):
        seen.append((command, kwargs["env"]))
        if command[-1] == "2":  # --worker-index 2
            command = [sys.executable, "-c", "import sys; sys.exit(3)"]
        return real(command, **kwargs)

    monkeypatch.setattr(study_module.subprocess, "Popen", second_worker_fails)
    recipe = _recipe(tiny_bert_dir, text_data, tmp_path, search={**LR_ONLY, "pruner": "none"})
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    with pytest.raises(tuneforge.TuneforgeError, match="worker\\(s\\) 2 of 2 ended with an error"):
        tuneforge.tune(recipe, trials=2, workers=2, storage=storage, output_dir=tmp_path / "study")
    assert (tmp_path / "study" / "summary.json").is_file()  # the report of what finished
    # the storage URL (a password, for a server) reaches the workers by the environment, not the command line
    assert all(storage not in " ".join(command) and env["TUNEFORGE_TUNE_STORAGE"] == storage for command, env in seen)


def test_trials_share_a_frozen_prefix_only_when_its_inputs_are_the_same(tmp_path):
    from tuneforge.config import load_recipe
    from tuneforge.training.run import prefix_inputs_key

    data = {"train": tmp_path / "t.tsv", "validation": tmp_path / "v.tsv"}
    base = text_recipe(tmp_path / "model", data, tmp_path / "run")

    def key(**changes) -> str:
        recipe = json.loads(json.dumps(base))
        for path, value in changes.items():
            section, name = path.split("__")
            recipe.setdefault(section, {})[name] = value
        return prefix_inputs_key(load_recipe(recipe))

    assert key() == key(optim__lr=1e-4) == key(model__head_dropout=0.3) == key(train__batch_size=16)
    assert key() != key(model__max_length=32) and key() != key(data__max_train_examples=10)


def test_an_advice_interrupted_while_measuring_is_measured_again_when_the_study_is_next_opened(
        tiny_bert_dir, text_data, tmp_path, monkeypatch):
    from tuneforge.tuning import study as study_module

    def interrupted(*args):
        raise KeyboardInterrupt

    recipe = _recipe(tiny_bert_dir, text_data, tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(study_module, "_advice_point", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tuneforge.tune(recipe, trials=2, output_dir=tmp_path / "study")
    summary = tuneforge.tune(recipe, trials=2, output_dir=tmp_path / "study")
    trials = _trials(tmp_path / "study")
    assert trials[0].user_attrs["as_written"] and trials[1].user_attrs["advice"] and summary.advice_trial == 1
