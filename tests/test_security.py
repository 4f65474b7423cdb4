"""A model folder, a run directory and a recipe are data from strangers: loading them never runs code they
name, never deletes what tuneforge did not write, and never predicts silently with weights that do not fit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import text_recipe, write_image_folder
from safetensors.torch import save_file

import tuneforge
from tuneforge.cli import main as cli
from tuneforge.errors import ModelError, RecipeError
from tuneforge.config import load_recipe
from tuneforge.training.run import finetune

PROJECT = Path(__file__).resolve().parents[1]
HOSTILE = {"factory": "os:system", "factory_kwargs": {"command": "touch PWNED"}}


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory):
    """A finished run of the examples' CIFAR ResNet-20 (random start, two steps) on two classes of images."""
    root = tmp_path_factory.mktemp("factory-run")
    images = write_image_folder(root / "images", per_class=6, size=32)
    return finetune({
        "name": "factory",
        "model": {"factory": "examples/cifar_resnet.py:resnet20", "pretrained": False, "head": "linear"},
        "data": {"train": str(images), "validation_fraction": 0.25, "image": {"size": 32}},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "seed": 0},
        "output": {"dir": str(root / "run")}})


def _copy(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target)
    return target


def _hostile_factory_run(factory_run, tmp_path) -> Path:
    run = _copy(factory_run.run_dir, tmp_path / "hostile")
    config_file = run / "model" / "config.json"
    config = json.loads(config_file.read_text())
    config["tuneforge_factory"].update(HOSTILE)
    config_file.write_text(json.dumps(config))
    return run


@pytest.fixture(autouse=True)
def _no_server(monkeypatch):
    """`serve` must fail while loading; should it ever get further, fail the test instead of serving forever."""
    import uvicorn

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)


def _verbs(run: Path, tmp_path: Path, images: Path) -> list[list[str]]:
    return [["predict", str(run), "--input", str(images), "--output", str(tmp_path / "p.jsonl")],
            ["evaluate", str(run), "--data", str(images)],
            ["export", str(run), "--format", "hf", "--output", str(tmp_path / "export")],
            ["serve", str(run), "--port", "1"],  # loading fails before anything listens
            ["inspect", str(run)]]


def test_a_factory_named_in_a_model_folder_is_never_run(factory_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # os.system's `touch PWNED` would land here
    run = _hostile_factory_run(factory_run, tmp_path)
    images = write_image_folder(tmp_path / "images", per_class=2, size=32)
    path_before = list(sys.path)
    for verb in _verbs(run, tmp_path, images):
        assert cli(verb) == 2, verb
        err = capsys.readouterr().err
        assert "never runs code named inside a model folder" in err and "--trust-factory" in err, (verb, err)
        assert "Traceback" not in err
    with pytest.raises(ModelError, match="never runs code"):
        tuneforge.load(run)
    # The user trusts a factory, but the folder names another: still refused, and nothing named in it runs.
    for verb in _verbs(run, tmp_path, images):
        assert cli([*verb, "--trust-factory", "examples/cifar_resnet.py:resnet20"]) == 2, verb
        assert "not by" in capsys.readouterr().err
    with pytest.raises(ModelError, match="not by"):
        tuneforge.load(run, factory="examples.cifar_resnet:resnet20")
    assert not (tmp_path / "PWNED").exists()
    assert sys.path == path_before  # nothing was added to the import path


def test_an_adapter_folder_cannot_name_code_remote_code_or_pickle(factory_run, tmp_path, monkeypatch):
    """adapter_config.json rebuilds its base from settings in the folder: none of them may run code."""
    monkeypatch.chdir(tmp_path)
    run = _copy(factory_run.run_dir, tmp_path / "adapter")
    save_file({"x": torch.zeros(1)}, str(run / "model" / "adapter_model.safetensors"))
    base = {"model": {**HOSTILE, "pretrained": False}, "image": {"size": 32}, "adapter": {"method": "lora"}}
    (run / "model" / "adapter_config.json").write_text(json.dumps(base))
    with pytest.raises(ModelError, match="never runs code"):
        tuneforge.load(run)
    # A Hugging Face base that asks for its own code, or a pickle weights file: those settings are not read.
    base["model"] = {"name": str(tmp_path / "evil-model"), "trust_remote_code": True, "revision": "main",
                     "pretrained": True}
    (run / "model" / "adapter_config.json").write_text(json.dumps(base))
    with pytest.raises(ModelError) as error:
        tuneforge.load(run)
    assert "evil-model" in str(error.value)
    base["model"] = {"name": "pkg:os.path/x", "pretrained": True}  # a dotted package would be imported to find it
    (run / "model" / "adapter_config.json").write_text(json.dumps(base))
    with pytest.raises(ModelError, match="top-level package"):
        tuneforge.load(run)
    assert not (tmp_path / "PWNED").exists()


def test_a_trusted_factory_loads_the_model_from_any_directory(factory_run, tmp_path):
    """By file path, or by module name found on PYTHONPATH: the same predictions as in the project."""
    images = write_image_folder(tmp_path / "images", per_class=2, size=32)
    expected = tuneforge.load(factory_run.run_dir, factory="examples/cifar_resnet.py:resnet20").predict(
        sorted(str(p) for p in images.rglob("*.png")))
    env = {**os.environ, "PYTHONPATH": ""}
    by_file = [sys.executable, "-m", "tuneforge", "predict", str(factory_run.run_dir), "--input", str(images),
               "--output", str(tmp_path / "by-file.jsonl"), "--trust-factory", str(PROJECT / "examples/cifar_resnet.py:resnet20")]
    done = subprocess.run(by_file, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    by_module = [*by_file[:-4], "--output", str(tmp_path / "by-module.jsonl"), "--trust-factory",
                 "examples.cifar_resnet:resnet20"]
    done = subprocess.run(by_module, cwd=tmp_path, env={**env, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("by-file", "by-module"):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [r["label"] for r in rows] == [p["label"] for p in expected]
    # Without it, from the same place: a clear refusal, exit 2.
    done = subprocess.run(by_file[:-2], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "--trust-factory" in done.stderr and "Traceback" not in done.stderr


def test_a_factory_module_is_imported_from_the_python_path_as_it_is(tmp_path, monkeypatch):
    """tuneforge never puts the working directory on sys.path: a module there is not found by name."""
    (tmp_path / "my_nets.py").write_text("import torch\ndef net():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    from tuneforge.models.factory import import_factory

    with pytest.raises(ModelError, match="cannot import 'my_nets'"):
        import_factory("my_nets:net")
    assert isinstance(import_factory("my_nets.py:net")(), torch.nn.Linear)  # by its path: the user's explicit choice
    assert str(tmp_path) not in sys.path and "" not in sys.path


# ---------------------------------------------------------------- --overwrite and names

def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_bert_dir, text_data, tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(text_recipe(tiny_bert_dir, text_data, tmp_path / "unused", epochs=0)))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert cli(["train", str(recipe), "--output-dir", str(precious), "--overwrite"]) == 2
    assert "not a tuneforge run directory" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"
    # The working directory itself, as `--output-dir . --overwrite` would give it.
    monkeypatch.chdir(precious)
    assert cli(["train", str(recipe), "--output-dir", ".", "--overwrite"]) == 2
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]
    # A run directory is replaced; what a user put into it stays.
    run = tmp_path / "run"
    assert cli(["train", str(recipe), "--output-dir", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    assert cli(["train", str(recipe), "--output-dir", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "eval.json").exists()
    # A folder holding a recipe a person wrote (not a resolved one) and a model/ folder is no run directory.
    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    (project / "model" / "weights.bin").write_bytes(b"1")
    (project / "recipe.yaml").write_text("model: {name: m}\ndata: {train: t.tsv}\n")
    assert cli(["train", str(recipe), "--output-dir", str(project), "--overwrite"]) == 2
    assert (project / "model" / "weights.bin").exists() and (project / "recipe.yaml").exists()


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "/abs", "..", ".hidden", ""])
def test_a_recipe_name_cannot_leave_the_runs_folder(tiny_bert_dir, text_data, tmp_path, name):
    raw = text_recipe(tiny_bert_dir, text_data, tmp_path / "unused")
    raw["name"], raw["output"] = name, {"dir": str(tmp_path / "runs" / "{name}")}
    with pytest.raises(RecipeError, match="name"):
        load_recipe(raw)


def test_export_overwrite_replaces_only_an_earlier_export(small_text_run, tmp_path, capsys):
    run = small_text_run[0].run_dir
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("a,b")
    assert cli(["export", str(run), "--format", "hf", "--output", str(mine), "--overwrite"]) == 2
    assert "not an earlier tuneforge export" in capsys.readouterr().err and (mine / "data.csv").exists()
    target = tmp_path / "export"
    assert cli(["export", str(run), "--format", "hf", "--output", str(target)]) == 0
    assert cli(["export", str(run), "--format", "hf", "--output", str(target), "--overwrite"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old copy left behind


# ---------------------------------------------------------------- weights that do not fit, damaged folders

def _error_of(verb: list[str], capsys) -> str:
    code = cli(verb)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("error:"), (code, err)
    return err


def test_a_weights_file_of_another_model_is_refused_not_predicted_with(small_text_run, tiny_vit_dir, tmp_path, capsys):
    run = _copy(small_text_run[0].run_dir, tmp_path / "run")
    data = small_text_run[1]["test"]
    shutil.copy(tiny_vit_dir / "model.safetensors", run / "model" / "model.safetensors")  # valid, of another model
    for verb in (["predict", str(run), "--input", str(data), "--output", str(tmp_path / "p.jsonl")],
                 ["evaluate", str(run), "--data", str(data)], ["serve", str(run), "--port", "1"]):
        err = _error_of(verb, capsys)
        assert "does not fit the model" in err and "missing" in err, err
    assert not (tmp_path / "p.jsonl").exists()


def test_a_factory_weights_file_of_other_shapes_is_refused(factory_run, tmp_path):
    run = _copy(factory_run.run_dir, tmp_path / "run")
    weights = run / "model" / "model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(weights))
    state["linear.1.weight"] = torch.zeros(5, 64)  # a head for 5 classes in a 2-class folder
    save_file(state, str(weights))
    with pytest.raises(ModelError, match=r"wrong shape 1: linear.1.weight \(5, 64\) instead of \(2, 64\)"):
        tuneforge.load(run, factory="examples/cifar_resnet.py:resnet20")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing", "config", "tuneforge-json"])
def test_a_damaged_model_folder_is_a_one_line_error(small_text_run, tmp_path, capsys, damage):
    run = _copy(small_text_run[0].run_dir, tmp_path / "run")
    weights = run / "model" / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "missing":
        weights.unlink()
    elif damage == "config":
        (run / "model" / "config.json").write_text("{not json")
    else:
        (run / "model" / "tuneforge.json").write_text("[1, 2")
    data = small_text_run[1]["test"]
    for verb in (["predict", str(run), "--input", str(data), "--output", str(tmp_path / "p.jsonl")],
                 ["evaluate", str(run), "--data", str(data)], ["serve", str(run), "--port", "1"],
                 ["export", str(run), "--format", "hf", "--output", str(tmp_path / "x")]):
        err = _error_of(verb, capsys)
        assert len(err.strip().splitlines()) == 2, err  # "error: 1 model problem:" and the problem itself


# ---------------------------------------------------------------- hostile recipes

def test_a_billion_laughs_recipe_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\nmodel: {name: x}\ndata: {train: x}\n")
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe(tmp_path / "laughs.yaml")
    assert time.perf_counter() - started < 5
    # Ordinary aliases, as people use them to share settings, still work.
    (tmp_path / "shared.yaml").write_text("model: {name: m}\ndata: &d {train: t.tsv, validation: v.tsv}\n"
                                           "task: {labels: &l [a, b]}\n")
    assert load_recipe(tmp_path / "shared.yaml").task.labels == ["a", "b"]


def test_a_key_given_twice_is_an_error_with_both_lines(tmp_path):
    (tmp_path / "twice.yaml").write_text("model: {name: m}\ndata:\n  train: a.tsv\ntrain:\n  epochs: 1\n"
                                         "  batch_size: 8\n  epochs: 30\n")
    with pytest.raises(RecipeError, match=r"key 'epochs' is given twice in one section \(lines 5 and 7\)"):
        load_recipe(tmp_path / "twice.yaml")
    (tmp_path / "merge.yaml").write_text("base: &b {epochs: 1, seed: 3}\nmodel: {name: m}\ndata: {train: a.tsv}\n"
                                         "train: {<<: *b, epochs: 2}\n")
    with pytest.raises(RecipeError, match="base: unknown key"):  # a merge's keys may be overridden: no duplicate
        load_recipe(tmp_path / "merge.yaml")


@pytest.mark.parametrize("override", ["train.batch_size=100000000000000000000000", "train.epochs=10000000000",
                                      "train.seed=-1", "train.seed=100000000000000000000", "data.num_workers=100000",
                                      "model.max_length=100000000000000", "eval.batch_size=100000000000000000",
                                      "train.grad_accum_steps=10000000000", "data.split_seed=-5"])
def test_absurd_values_are_recipe_errors_before_any_folder_exists(tiny_bert_dir, text_data, tmp_path, capsys, override):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(text_recipe(tiny_bert_dir, text_data, tmp_path / "unused")))
    err = _error_of(["train", str(recipe), override, "--output-dir", str(tmp_path / "run")], capsys)
    assert override.split("=")[0] in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- found by the second review

def test_remote_code_in_a_model_folder_never_runs_even_when_stdin_says_yes(small_text_run, tmp_path):
    """A folder whose config.json points transformers at its own Python file: tuneforge never asks whether to run
    it (a `yes` piped into the command would answer) and never runs it."""
    run = _copy(small_text_run[0].run_dir, tmp_path / "run")
    config_file = run / "model" / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("model_type", None)
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForSequenceClassification": "configuration_evil.EvilModel"}
    config_file.write_text(json.dumps(config))
    marker = tmp_path / "PWNED"
    (run / "model" / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    data = small_text_run[1]["test"]
    for verb in (["predict", str(run), "--input", str(data), "--output", str(tmp_path / "p.jsonl")],
                 ["evaluate", str(run), "--data", str(data)], ["inspect", str(run)],
                 ["export", str(run), "--format", "hf", "--output", str(tmp_path / "x")]):
        done = subprocess.run([sys.executable, "-m", "tuneforge", *verb], input="y\n" * 20, capture_output=True,
                              text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (verb, done.stderr[-2000:])
        assert "Do you wish to run" not in done.stdout + done.stderr  # no question asked
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["no-tokenizer", "nan-weights", "whole-number-weights", "same-names-other-shapes"])
def test_a_model_that_loads_but_cannot_be_the_trained_one_is_refused(small_text_run, tmp_path, damage):
    from safetensors.torch import load_file

    run = _copy(small_text_run[0].run_dir, tmp_path / "run")
    model = run / "model"
    weights = load_file(str(model / "model.safetensors"))
    if damage == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            (model / name).unlink(missing_ok=True)
        expected = "tokenizer"
    elif damage == "nan-weights":
        weights["classifier.weight"] = torch.full_like(weights["classifier.weight"], float("nan"))
        expected = "NaN or infinite values in classifier.weight"
    elif damage == "whole-number-weights":
        weights = {k: v.to(torch.int64) if v.is_floating_point() else v for k, v in weights.items()}
        expected = "whole-number tensors"
    else:
        weights["classifier.weight"] = torch.zeros(7, weights["classifier.weight"].shape[1])
        weights["classifier.bias"] = torch.zeros(7)
        expected = "wrong shape 2: classifier.bias (7,) instead of (2,), classifier.weight (7, 32) instead of (2, 32)"
    if damage != "no-tokenizer":
        save_file(weights, str(model / "model.safetensors"))
    with pytest.raises(ModelError, match=re.escape(expected)):
        tuneforge.load(run)


@pytest.mark.parametrize("change, expected", [
    ({"data": {"format": "nope"}}, "data.format"),
    ({"max_length": None}, "max_length"),
    ({"label_values": ["0"], "label_names": ["negative"]}, "the model has 2 outputs but tuneforge.json names 1 labels, for 1 outputs"),
    ({"task": "bogus"}, "'bogus', which is not registered"),
    ({"task_state": {"threshold": "high"}, "task": "multilabel"}, "task's settings or state are damaged"),
])
def test_a_model_description_that_parses_but_does_not_fit_is_a_one_line_error(small_text_run, tmp_path, capsys,
                                                                               change, expected):
    run = _copy(small_text_run[0].run_dir, tmp_path / "run")
    path = run / "model" / "tuneforge.json"
    info = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps({k: v for k, v in info.items() if v is not None}))
    data = small_text_run[1]["test"]
    for verb in (["predict", str(run), "--input", str(data), "--output", str(tmp_path / "p.jsonl")],
                 ["evaluate", str(run), "--data", str(data)], ["serve", str(run), "--port", "1"],
                 ["export", str(run), "--format", "hf", "--output", str(tmp_path / "x")]):
        err = _error_of(verb, capsys)
        assert expected in err and len(err.strip().splitlines()) == 2, err


@pytest.mark.parametrize("override, expected", [
    ("name=[&a [l,l,l,l,l,l,l,l,l], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
     "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], "
     "&g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]]", "aliases"),
    ("train.seed=[unclosed", "not valid YAML"),
    ("name=!!python/object/apply:os.system ['touch PWNED']", "not valid YAML"),
    ("train.seed=" + "[" * 30000 + "]" * 30000, "nested too deeply"),
    ("output.dir=/tmp/x/{name:>999999999}", "without a format or conversion"),
    ("train.batch_size=true", "true or false is not a value"),
    ("optim.betas=[0.9, 2.0]", "optim.betas"),
    ("optim.eps=.inf", "finite number"),
    ("optim.weight_decay=1e30", "optim.weight_decay"),
])
def test_hostile_or_absurd_override_values_are_recipe_errors(tiny_bert_dir, text_data, tmp_path, capsys, monkeypatch,
                                                             override, expected):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(text_recipe(tiny_bert_dir, text_data, tmp_path / "unused")))
    started = time.perf_counter()
    err = _error_of(["train", str(recipe), override, "--output-dir", str(tmp_path / "run")], capsys)
    assert expected in err and time.perf_counter() - started < 30 and len(err) < 3000
    assert not (tmp_path / "run").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("line, expected", [
    ('{"sentence": ' + "[" * 100_000 + "]" * 100_000 + ', "label": 1}', "line 2 cannot be read (RecursionError"),
    ('{"sentence": "good", "label": ' + "9" * 5000 + "}", "line 2 cannot be read (ValueError"),
    ('{"sentence": {"a": [1]}, "label": 1}', "are lists or objects, not texts"),
])
def test_jsonl_cells_that_are_not_what_they_seem_are_data_errors(tiny_bert_dir, text_data, tmp_path, capsys, line,
                                                                 expected):
    train = tmp_path / "train.jsonl"
    train.write_text('{"sentence": "good movie", "label": 1}\n' + line + "\n")
    raw = text_recipe(tiny_bert_dir, {**text_data, "train": train}, tmp_path / "unused")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    err = _error_of(["train", str(tmp_path / "recipe.yaml"), "--output-dir", str(tmp_path / "run")], capsys)
    assert expected in err and len(err) < 3000, err
