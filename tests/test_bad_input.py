"""Bad input never ends in a traceback: malformed recipes, data files and models each end in a
clear error that names the problem (key path, file, line or value), exit code 2 from the CLI,
and no run directory written.

Each case starts from a valid tiny recipe (checked to train with exit code 0) and breaks one thing.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import sentiment_rows, text_recipe, write_image_folder, write_tsv

from tuneforge.cli import main

DELETE = object()  # a change that removes the key
UNSET_VAR = "TUNEFORGE_TEST_SURELY_UNSET_VARIABLE"


def set_key(raw: dict, path: str, value) -> None:
    keys = path.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def write_recipe(raw, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_train(recipe_path: Path | str, out: Path | None, capsys, overrides=()) -> tuple[int, str]:
    """`tuneforge train`; with out None the run directory is the recipe's output.dir."""
    capsys.readouterr()  # drop what came before
    code = main(["train", str(recipe_path), *overrides, *(["--output-dir", str(out)] if out else [])])
    return code, capsys.readouterr().err


def assert_clear_error(code: int, err: str, fragments, out: Path | None = None) -> None:
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert err.startswith("error:"), err
    for fragment in fragments:  # a tuple: any one of these
        options = fragment if isinstance(fragment, tuple) else (fragment,)
        assert any(option in err for option in options), f"{fragment!r} not in:\n{err}"
    if out is not None:  # a bad input must not leave a half-made run directory behind
        assert not (out / "recipe.yaml").exists(), f"{out} holds a recipe.yaml after the failed run:\n{err}"
        assert not out.exists() or not any(out.iterdir()), f"{out} holds {sorted(p.name for p in out.iterdir())}"


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    # conftest sets HF_HUB_OFFLINE per test, but huggingface_hub reads it once at import, which the
    # session fixtures (tiny models) trigger first; a Hub id would then wait for network timeouts.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------- valid bases

def text_base(tiny_bert_dir: Path, text_data: dict, **train) -> dict:
    recipe = text_recipe(tiny_bert_dir, text_data, Path("unused"), **{"epochs": 0, **train})
    return recipe


def image_base(model: dict, image_data: dict, **train) -> dict:
    return {
        "name": "tiny-image",
        "model": model,
        "data": {"train": str(image_data["train"]), "validation": str(image_data["validation"]), "image": {"size": 32}},
        "train": {"epochs": 0, "batch_size": 8, "seed": 0, **train},
        "optim": {"lr": 1.0e-3},
        "output": {"dir": "unused"},
    }


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> Path:
    import torch

    from examples.cifar_resnet import resnet20

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet20.th"
    torch.save(resnet20().state_dict(), path)
    return path


def test_valid_text_base_trains(tiny_bert_dir, text_data, tmp_path, capsys):
    recipe = write_recipe(text_base(tiny_bert_dir, text_data, epochs=1, max_steps=1), tmp_path / "recipe.yaml")
    code, err = run_train(recipe, tmp_path / "run", capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["steps"] == 1


def test_valid_image_base_trains(tiny_vit_dir, image_data, tmp_path, capsys):
    recipe = image_base({"name": str(tiny_vit_dir)}, image_data, epochs=1, max_steps=1)
    code, err = run_train(write_recipe(recipe, tmp_path / "recipe.yaml"), tmp_path / "run", capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "eval.json").is_file()


def test_valid_factory_base_evaluates(resnet_weights, image_data, tmp_path, capsys):
    recipe = image_base({"factory": "examples.cifar_resnet:resnet20", "weights": str(resnet_weights)}, image_data)
    code, err = run_train(write_recipe(recipe, tmp_path / "recipe.yaml"), tmp_path / "run", capsys)
    assert code == 0, err


# ---------------------------------------------------------------- malformed recipes

@dataclass
class RecipeCase:
    expect: tuple[str, ...]  # fragments the error message must contain
    changes: dict = field(default_factory=dict)  # key path -> new value (or DELETE)
    text: str | None = None  # the recipe file's whole content instead of the YAML of the base
    overrides: tuple[str, ...] = ()
    no_file: bool = False  # the recipe path does not exist
    own_output: bool = False  # no --output-dir: the recipe's output.dir is used
    forbid: tuple[str, ...] = ()  # fragments the message must not contain (internals leaking out)


def rc(*expect, changes=None, **kwargs):
    return RecipeCase(tuple(expect), changes or {}, **kwargs)


RECIPE_CASES = [
    # wrong types
    pytest.param(rc("train.epochs", "'three'", changes={"train.epochs": "three"}), id="epochs-string"),
    pytest.param(rc("train.batch_size", "'big'", changes={"train.batch_size": "big"}, forbid=("batch_size.int", "literal[")),
                 id="batch-size-string"),
    pytest.param(rc("task.class_weights", "'heavy'", changes={"task.class_weights": "heavy"},
                    forbid=("class_weights.literal", "list[float]")), id="class-weights-string"),
    pytest.param(rc("optim.lr", "'fast'", changes={"optim.lr": "fast"}), id="lr-string"),
    pytest.param(rc("model.max_length", changes={"model.max_length": [16, 32]}), id="max-length-list"),
    pytest.param(rc("model", "dictionary", changes={"model": ["tiny-bert"]}), id="model-section-list"),
    pytest.param(rc("train", "dictionary", changes={"train": 5}), id="train-section-scalar"),
    pytest.param(rc("data.text_column", changes={"data.text_column": {"name": "sentence"}}), id="text-column-dict"),
    pytest.param(rc("optim.schedule", changes={"optim.schedule": ["linear"]}), id="schedule-list"),
    pytest.param(rc("task.labels.0", changes={"task.labels": [["0"], ["1"]]}), id="labels-nested-list"),
    pytest.param(rc("optim.betas", changes={"optim.betas": [0.9]}), id="betas-one-value"),
    pytest.param(rc("model.new_head", changes={"model.new_head": "sometimes"}), id="bool-string"),
    pytest.param(rc("data.train", changes={"data.train": None}), id="train-path-null"),
    pytest.param(rc("model.name", "model.factory", changes={"model.name": None}), id="model-name-null"),
    pytest.param(rc("model", "dictionary", changes={"model": None}), id="model-null"),
    # unknown keys, at each level
    pytest.param(rc("trian", "unknown key", "train", changes={"trian": {"epochs": 1}}), id="unknown-top-level"),
    pytest.param(rc("model.nmae", "unknown key", "name", changes={"model.nmae": "x"}), id="unknown-model-key"),
    pytest.param(rc("data.txt_column", "unknown key", "text_column", changes={"data.txt_column": "x"}),
                 id="unknown-data-key"),
    pytest.param(rc("train.epoch", "unknown key", "epochs", changes={"train.epoch": 1}), id="unknown-train-key"),
    pytest.param(rc("optim.learning_rate", "unknown key", changes={"optim.learning_rate": 0.1}), id="unknown-optim-key"),
    pytest.param(rc("optim.schedule.warmup", "unknown key", changes={"optim.schedule.warmup": 10}),
                 id="unknown-schedule-key"),
    pytest.param(rc("eval.metrics", "unknown key", changes={"eval.metrics": "accuracy"}), id="unknown-eval-key"),
    pytest.param(rc("task.label", "unknown key", changes={"task.label": "y"}), id="unknown-task-key"),
    pytest.param(rc("output.path", "unknown key", changes={"output.path": "x"}), id="unknown-output-key"),
    pytest.param(rc("model.freeze.strat", "unknown key", changes={"model.freeze.strat": "full"}),
                 id="unknown-freeze-key"),
    pytest.param(rc("data.image.sise", "unknown key", changes={"data.image.sise": 32}), id="unknown-image-key"),
    pytest.param(rc("data.augment.rotate", changes={"data.augment.rotate": 15}), id="unknown-augment-key"),
    # missing sections
    pytest.param(rc("model", "required key is missing", changes={"model": DELETE}), id="missing-model"),
    pytest.param(rc("data", "required key is missing", changes={"data": DELETE}), id="missing-data"),
    pytest.param(rc("model", "data", "required key is missing", text=""), id="empty-recipe-file"),
    # absurd values
    pytest.param(rc("train.batch_size", "positive", changes={"train.batch_size": -4}), id="batch-size-negative"),
    pytest.param(rc("train.batch_size", changes={"train.batch_size": 0}), id="batch-size-zero"),
    pytest.param(rc("optim.lr", changes={"optim.lr": 0}), id="lr-zero"),
    pytest.param(rc("optim.lr", "1000000000", changes={"optim.lr": 1e9}), id="lr-huge"),
    pytest.param(rc("optim.lr", changes={"optim.lr": float("nan")}), id="lr-nan"),
    pytest.param(rc("train.epochs", "-1", changes={"train.epochs": -1}), id="epochs-negative"),
    pytest.param(rc("train.max_steps", changes={"train.max_steps": 0}), id="max-steps-zero"),
    pytest.param(rc("model.head_dropout", "1.5", changes={"model.head_dropout": 1.5}), id="dropout-1.5"),
    pytest.param(rc("optim.schedule.warmup_ratio", "2", changes={"optim.schedule.warmup_ratio": 2}),
                 id="warmup-ratio-2"),
    pytest.param(rc("optim.schedule.name", "'triangle'", changes={"optim.schedule.name": "triangle"}),
                 id="unknown-schedule"),
    pytest.param(rc("optim.schedule", "step_size", changes={"optim.schedule": {"name": "step"}}),
                 id="step-schedule-without-step-size"),
    pytest.param(rc("milestones", "increasing", changes={"optim.schedule": {"name": "multistep", "milestones": [5, 3]}}),
                 id="milestones-decreasing"),
    pytest.param(rc("model.freeze.strategy", "'melt'", changes={"model.freeze.strategy": "melt"}),
                 id="unknown-freeze-strategy"),
    pytest.param(rc("model.freeze", "trainable_blocks", changes={"model.freeze.strategy": "partial"}),
                 id="partial-without-trainable-blocks"),
    pytest.param(rc("model.freeze.stages.0", "epochs or steps",
                    changes={"model.freeze": {"strategy": "progressive", "stages": [{"train": ["head"]}]}}),
                 id="progressive-stage-without-length"),
    pytest.param(rc("model.freeze", "'(unclosed'", "regular expression",
                    changes={"model.freeze.include": ["(unclosed"]}), id="freeze-include-bad-regex"),
    pytest.param(rc("optim", "layer_decay", changes={"optim.lr_strategy": "layerwise_decay"}),
                 id="layerwise-decay-without-layer-decay"),
    pytest.param(rc("optim", "group_lr", changes={"optim.lr_strategy": "differential"}),
                 id="differential-without-group-lr"),
    pytest.param(rc("optim.group_lr.encoder", "'encoder'", "embeddings",
                    changes={"optim.lr_strategy": "differential", "optim.group_lr": {"encoder": 1e-3, "head": 1e-2}}),
                 id="group-lr-unknown-group"),
    pytest.param(rc("model.freeze.stages.0.train", "'last:99'", "2",
                    changes={"model.freeze": {"strategy": "progressive", "stages": [{"steps": 1, "train": ["last:99"]}]}}),
                 id="last-99"),
    pytest.param(rc("model.freeze", "9 blocks", "2", changes={"model.freeze": {"strategy": "partial", "trainable_blocks": 9}}),
                 id="partial-more-blocks-than-model"),
    pytest.param(rc("plateau", "data.validation", changes={"optim.schedule": {"name": "plateau"}, "data.validation": DELETE}),
                 id="plateau-without-validation"),
    pytest.param(rc("eval.metric", "'auroc'", changes={"eval.metric": "auroc"}), id="unknown-eval-metric"),
    pytest.param(rc("eval.mode", changes={"eval.mode": "maximize"}), id="unknown-eval-mode"),
    pytest.param(rc("train.mixed_precision", "fp16", "GPU", changes={"train.mixed_precision": "fp16"}), id="fp16-on-cpu",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 is valid with a GPU")),
    pytest.param(rc("train.mixed_precision", "'fp32'", changes={"train.mixed_precision": "fp32"}),
                 id="unknown-mixed-precision"),
    pytest.param(rc("data.format", "'xlsx'", changes={"data.format": "xlsx"}), id="unknown-data-format"),
    pytest.param(rc("task.class_weights", "3 weights", "2 labels", changes={"task.class_weights": [1.0, 2.0, 3.0]}),
                 id="class-weights-wrong-count"),
    pytest.param(rc("task.label_names", changes={"task.label_names": ["neg", "pos"]}),
                 id="label-names-without-labels"),
    pytest.param(rc("data.validation", "validation_fraction", changes={"data.validation_fraction": 0.2}),
                 id="validation-and-fraction"),
    pytest.param(rc("model.name", "model.factory", changes={"model.factory": "examples.cifar_resnet:resnet20"}),
                 id="name-and-factory"),
    pytest.param(rc("data.augment", "images", changes={"data.augment.horizontal_flip": True}),
                 id="image-augment-on-text"),
    pytest.param(rc("output.dir", "{nme}", changes={"output.dir": "{tmp}/runs/{nme}"}, own_output=True), id="output-dir-bad-placeholder"),
    pytest.param(rc("task.labels", "'0'", changes={"task.labels": [0, 0, 1]}), id="duplicate-task-labels"),
    pytest.param(rc("task.label_names", "'same'", changes={"task.labels": [0, 1], "task.label_names": ["same", "same"]}),
                 id="duplicate-label-names"),
    # the file itself
    pytest.param(rc("mapping", "list", text="- model\n- data\n"), id="yaml-not-a-mapping"),
    pytest.param(rc("mapping", "str", text="just some words\n"), id="yaml-a-string"),
    pytest.param(rc("not valid YAML", "line 2", text="model:\n  name: [unclosed\ndata: {}\n"), id="invalid-yaml"),
    pytest.param(rc("not valid YAML", text="model: {name: x}\n\tdata: y\n"), id="yaml-tab-indent"),
    pytest.param(rc("does not exist", "no-such-recipe.yaml", no_file=True), id="recipe-file-missing"),
    # overrides
    pytest.param(rc("train.epochs", "key.path=value", overrides=("train.epochs",)), id="override-without-equals"),
    pytest.param(rc("train.epoch", "unknown key", overrides=("train.epoch=3",)), id="override-unknown-key"),
    pytest.param(rc("train.epochs", "'lots'", overrides=("train.epochs=lots",)), id="override-bad-value"),
    pytest.param(rc("model.name.x", "not a section", overrides=("model.name.x=1",)), id="override-into-a-value"),
    pytest.param(rc("model.freeze.stages.3.train", "3 is not a position in a list of 1",
                    changes={"model.freeze": {"strategy": "progressive", "stages": [{"steps": 1, "train": ["all"]}]}},
                    overrides=("model.freeze.stages.3.train=[head]",)), id="override-list-position"),
    pytest.param(rc("model.freeze.stages", "list", overrides=("model.freeze.stages.0.train=[head]",)),
                 id="override-into-missing-list"),
    # environment variables
    pytest.param(rc(UNSET_VAR, "not set", changes={"data.train": "${" + UNSET_VAR + "}/train.tsv"}),
                 id="unset-env-var"),
]


def _apply(case: RecipeCase, recipe: dict, tmp_path: Path) -> Path:
    if case.no_file:
        return tmp_path / "no-such-recipe.yaml"
    if case.text is not None:
        path = tmp_path / "recipe.yaml"
        path.write_text(case.text)
        return path
    for key, value in case.changes.items():
        if isinstance(value, str):
            value = value.replace("{tmp}", str(tmp_path))
        set_key(recipe, key, value)
    return write_recipe(recipe, tmp_path / "recipe.yaml")


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_malformed_recipe(case: RecipeCase, tiny_bert_dir, text_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(UNSET_VAR, raising=False)
    monkeypatch.chdir(tmp_path)  # a stray relative output (runs/...) lands here, not in the project
    recipe_path = _apply(case, text_base(tiny_bert_dir, text_data), tmp_path)
    out = tmp_path / "run"
    code, err = run_train(recipe_path, None if case.own_output else out, capsys, case.overrides)
    assert_clear_error(code, err, case.expect, out)
    for fragment in case.forbid:
        assert fragment not in err, err
    assert not (tmp_path / "runs").exists()


def test_output_dir_that_is_a_file(tiny_bert_dir, text_data, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("someone else's file\n")
    recipe = write_recipe(text_base(tiny_bert_dir, text_data), tmp_path / "recipe.yaml")
    code, err = run_train(recipe, blocker, capsys)
    assert_clear_error(code, err, [str(blocker), "is a file"])
    assert blocker.read_text() == "someone else's file\n"


def test_failed_run_does_not_block_the_corrected_rerun(tiny_bert_dir, text_data, tmp_path, capsys):
    recipe = text_base(tiny_bert_dir, text_data)
    recipe["optim"].update(lr_strategy="differential", group_lr={"encoder": 1.0e-3})  # no such layer group
    out = tmp_path / "run"
    code, err = run_train(write_recipe(recipe, tmp_path / "bad.yaml"), out, capsys)
    assert code == 2 and "optim.group_lr.encoder" in err, err
    recipe["optim"]["group_lr"] = {"backbone": 1.0e-3, "head": 1.0e-2}  # fixed
    code, err = run_train(write_recipe(recipe, tmp_path / "fixed.yaml"), out, capsys)
    assert code == 0, err


# ---------------------------------------------------------------- malformed data

DataCase = Callable[[Path, dict], list[str]]  # (tmp_path, recipe) -> fragments the message must contain


def _rows(count=12, seed=5):
    return sentiment_rows(count, seed=seed)


def csv_named_tsv(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "comma.tsv"
    path.write_text("sentence,label\n" + "".join(f"{t},{y}\n" for t, y in _rows()))
    recipe["data"]["train"] = str(path)
    return [str(path), "'sentence'", "delimiter"]


def tsv_named_csv(tmp: Path, recipe: dict) -> list[str]:
    path = write_tsv(tmp / "tabs.csv", _rows())
    recipe["data"]["train"] = str(path)
    return [str(path), "'sentence'", "delimiter"]


def missing_text_column(tmp: Path, recipe: dict) -> list[str]:
    path = write_tsv(tmp / "cols.tsv", _rows(), header=("text", "label"))
    recipe["data"]["train"] = str(path)
    return [str(path), "no column 'sentence'", "text, label"]


def missing_label_column(tmp: Path, recipe: dict) -> list[str]:
    path = write_tsv(tmp / "cols.tsv", _rows(), header=("sentence", "sentiment"))
    recipe["data"]["validation"] = str(path)
    return ["validation", str(path), "no column 'label'", "sentence, sentiment"]


def header_only(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "header.tsv"
    path.write_text("sentence\tlabel\n")
    recipe["data"]["train"] = str(path)
    return [str(path), "no examples"]


def zero_bytes(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "empty.tsv"
    path.write_bytes(b"")
    recipe["data"]["train"] = str(path)
    return [str(path), "empty"]


def blank_lines_only(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "blank.tsv"
    path.write_text("\n\n\n")
    recipe["data"]["train"] = str(path)
    return [str(path)]


def unseen_label_in_validation(tmp: Path, recipe: dict) -> list[str]:
    rows = _rows(6) + [("good film", "positive"), ("bad film", 1.0)]
    path = write_tsv(tmp / "val.tsv", rows)
    recipe["data"]["validation"] = str(path)
    return ["validation", "'positive'", f"{path}:8", "never appear in train"]


def empty_texts(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "holes.tsv"
    path.write_text("sentence\tlabel\ngood movie\t1\n\t0\n   \t1\nbad film\t0\n")
    recipe["data"]["train"] = str(path)
    return [str(path) + ":3", str(path) + ":4", "'sentence'", "empty or missing"]


def missing_labels(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "nolabel.tsv"
    path.write_text("sentence\tlabel\ngood movie\t1\nbad film\t\nfine plot\t1\nawful story\t0\n")
    recipe["data"]["train"] = str(path)
    return [str(path) + ":3", "missing label", "'label'"]


def one_label_only(tmp: Path, recipe: dict) -> list[str]:
    path = write_tsv(tmp / "ones.tsv", [(t, 1) for t, _ in _rows()])
    recipe["data"]["train"] = str(path)
    return ["only one label", "'label'"]


def non_utf8(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "latin1.tsv"
    path.write_bytes("sentence\tlabel\ngood movie\t1\ncaf\u00e9 film is bad\t0\n".encode("latin-1"))
    recipe["data"]["train"] = str(path)
    return [str(path), "not UTF-8", "line 3", "data.encoding"]


def jsonl_broken_line(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "broken.jsonl"
    lines = [json.dumps({"sentence": t, "label": y}) for t, y in _rows(6)]
    lines[2] = lines[2][:-5]  # cut off the closing part of line 3
    path.write_text("\n".join(lines) + "\n")
    recipe["data"]["train"] = str(path)
    return [str(path), "line 3"]


def jsonl_null_text(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "nulls.jsonl"
    lines = [json.dumps({"sentence": t, "label": y}) for t, y in _rows(6)]
    lines[1] = json.dumps({"sentence": None, "label": 0})
    path.write_text("\n".join(lines) + "\n")
    recipe["data"]["train"] = str(path)
    return [f"{path}:2", "'sentence'"]


def parquet_that_is_text(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "fake.parquet"
    path.write_text("sentence\tlabel\ngood movie\t1\n")
    recipe["data"]["train"] = str(path)
    return [str(path), "parquet"]


def ragged_tsv(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "ragged.tsv"
    path.write_text("sentence\tlabel\ngood movie\t1\nbad\tfilm\t0\nfine plot\t1\n")
    recipe["data"]["train"] = str(path)
    return [str(path), "line 3"]


def csv_unclosed_quote(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "quote.csv"
    path.write_text('sentence,label\ngood movie,1\n"bad film,0\nfine plot,1\n')
    recipe["data"]["train"] = str(path)
    return [str(path)]


def missing_train_file(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "nowhere" / "train.tsv"
    recipe["data"]["train"] = str(path)
    return [str(path), "does not exist", "data.train"]


def missing_test_file(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "test-missing.tsv"
    recipe["data"]["test"] = str(path)
    return [str(path), "does not exist", "data.test"]


def train_is_folder_without_images(tmp: Path, recipe: dict) -> list[str]:
    folder = tmp / "texts"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "notes.txt").write_text("hello\n")
    recipe["data"]["train"] = str(folder)
    return [str(folder), "no images"]


DATA_CASES = [
    pytest.param(csv_named_tsv, id="csv-named-tsv"),
    pytest.param(tsv_named_csv, id="tsv-named-csv"),
    pytest.param(missing_text_column, id="missing-text-column"),
    pytest.param(missing_label_column, id="missing-label-column"),
    pytest.param(header_only, id="header-only"),
    pytest.param(zero_bytes, id="zero-byte-file"),
    pytest.param(blank_lines_only, id="blank-lines-only"),
    pytest.param(unseen_label_in_validation, id="mixed-labels-unseen-in-validation"),
    pytest.param(empty_texts, id="empty-texts"),
    pytest.param(missing_labels, id="missing-labels"),
    pytest.param(one_label_only, id="one-label-only"),
    pytest.param(non_utf8, id="non-utf8"),
    pytest.param(jsonl_broken_line, id="jsonl-broken-line"),
    pytest.param(jsonl_null_text, id="jsonl-null-text"),
    pytest.param(parquet_that_is_text, id="parquet-that-is-text"),
    pytest.param(ragged_tsv, id="ragged-tsv"),
    pytest.param(csv_unclosed_quote, id="csv-unclosed-quote"),
    pytest.param(missing_train_file, id="missing-train-file"),
    pytest.param(missing_test_file, id="missing-test-file"),
    pytest.param(train_is_folder_without_images, id="folder-without-images"),
]


@pytest.mark.parametrize("make", DATA_CASES)
def test_malformed_text_data(make: DataCase, tiny_bert_dir, text_data, tmp_path, capsys):
    recipe = text_base(tiny_bert_dir, text_data)
    expect = make(tmp_path, recipe)
    out = tmp_path / "run"
    code, err = run_train(write_recipe(recipe, tmp_path / "recipe.yaml"), out, capsys)
    assert_clear_error(code, err, expect, out)


def zero_byte_image(tmp: Path, recipe: dict) -> list[str]:
    path = Path(recipe["data"]["train"]) / "red" / "003.png"
    path.write_bytes(b"")
    return ["train", "unreadable image", str(path), "skip_unreadable_images"]


def garbage_jpeg(tmp: Path, recipe: dict) -> list[str]:
    path = Path(recipe["data"]["train"]) / "blue" / "garbage.jpg"
    path.write_bytes(bytes(range(256)) * 8)
    return ["train", "unreadable image", str(path)]


def truncated_jpeg(tmp: Path, recipe: dict) -> list[str]:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "JPEG")
    path = Path(recipe["data"]["validation"]) / "red" / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return ["validation", "unreadable image", str(path)]


def text_file_named_png(tmp: Path, recipe: dict) -> list[str]:
    path = Path(recipe["data"]["train"]) / "red" / "notes.png"
    path.write_text("not an image at all\n")
    return ["unreadable image", str(path)]


def images_without_class_folders(tmp: Path, recipe: dict) -> list[str]:
    flat = tmp / "flat"
    flat.mkdir()
    for source in sorted(write_image_folder(tmp / "classes", per_class=3).rglob("*.png")):
        source.rename(flat / f"{source.parent.name}-{source.name}")  # the same images, without class folders
    recipe["data"]["train"] = str(flat)
    return ["train", str(flat), "<label>"]  # the message must say images go into one folder per class


def empty_image_folder(tmp: Path, recipe: dict) -> list[str]:
    empty = tmp / "empty-images"
    empty.mkdir()
    recipe["data"]["train"] = str(empty)
    return [str(empty), "no images"]


def unseen_class_in_validation(tmp: Path, recipe: dict) -> list[str]:
    validation = Path(recipe["data"]["validation"])
    (validation / "green").mkdir()
    (validation / "green" / "000.png").write_bytes((validation / "red" / "000.png").read_bytes())
    return ["validation", "'green'", "never appear in train"]


def missing_image_folder(tmp: Path, recipe: dict) -> list[str]:
    path = tmp / "no-such-folder"
    recipe["data"]["validation"] = str(path)
    return [str(path), "does not exist", "data.validation"]


IMAGE_CASES = [
    pytest.param(zero_byte_image, id="zero-byte-image"),
    pytest.param(garbage_jpeg, id="garbage-jpeg"),
    pytest.param(truncated_jpeg, id="truncated-jpeg"),
    pytest.param(text_file_named_png, id="text-named-png"),
    pytest.param(images_without_class_folders, id="no-class-folders"),
    pytest.param(empty_image_folder, id="empty-image-folder"),
    pytest.param(unseen_class_in_validation, id="unseen-class-in-validation"),
    pytest.param(missing_image_folder, id="missing-image-folder"),
]


@pytest.mark.parametrize("make", IMAGE_CASES)
def test_malformed_image_data(make: DataCase, tiny_vit_dir, image_data, tmp_path, capsys):
    recipe = image_base({"name": str(tiny_vit_dir)}, image_data)
    expect = make(tmp_path, recipe)
    out = tmp_path / "run"
    code, err = run_train(write_recipe(recipe, tmp_path / "recipe.yaml"), out, capsys)
    assert_clear_error(code, err, expect, out)


# ---------------------------------------------------------------- malformed models

ModelCase = Callable[[Path, dict], list[str]]  # (tmp_path, {tiny_bert, tiny_vit, resnet_weights, ...}) -> ...


def _factory(weights: Path | str | None = None, **model) -> dict:
    spec = {"factory": "examples.cifar_resnet:resnet20", **model}
    if weights is not None:
        spec["weights"] = str(weights)
    return spec


def name_empty_folder(tmp, env):
    folder = tmp / "empty-model"
    folder.mkdir()
    env["text"]["model"]["name"] = str(folder)
    return ["model.name", str(folder), "config.json"]


def name_missing_folder(tmp, env):
    env["text"]["model"]["name"] = str(tmp / "no-such-model")
    return ["model.name", str(tmp / "no-such-model"), "does not exist"]


def name_pkg_missing_subfolder(tmp, env):
    env["text"]["model"]["name"] = "pkg:tuneforge/no-such-dir"
    return ["model.name", "pkg:tuneforge/no-such-dir", "does not exist"]


def name_unknown_package(tmp, env):
    env["text"]["model"]["name"] = "pkg:surely_not_installed_pkg/model"
    return ["model.name", "surely_not_installed_pkg", "not installed"]


def name_hub_id_offline(tmp, env):
    env["text"]["model"]["name"] = "no-such-org/no-such-model"
    return ["model.name", "no-such-org/no-such-model"]


def config_not_json(tmp, env):
    folder = tmp / "bad-config"
    folder.mkdir()
    (folder / "config.json").write_text("{this is not json")
    env["text"]["model"]["name"] = str(folder)
    return ["model.name", str(folder)]


def config_unknown_model_type(tmp, env):
    folder = tmp / "odd-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    env["text"]["model"]["name"] = str(folder)
    return ["model.name", str(folder)]


def hf_folder_without_weights(tmp, env):
    import shutil

    folder = tmp / "no-weights"
    shutil.copytree(env["tiny_bert"], folder)
    (folder / "model.safetensors").unlink()
    env["text"]["model"]["name"] = str(folder)
    return ["model.name", str(folder), "weights"]


def hf_garbage_weights(tmp, env):
    import shutil

    folder = tmp / "garbage-weights"
    shutil.copytree(env["tiny_bert"], folder)
    (folder / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    env["text"]["model"]["name"] = str(folder)
    return ["model.name", str(folder), "cannot load its weights"]


def hf_folder_without_tokenizer(tmp, env):
    import shutil

    folder = tmp / "no-tokenizer"
    shutil.copytree(env["tiny_bert"], folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    env["text"]["model"]["name"] = str(folder)
    return ["model.name", str(folder), "tokenizer"]


def factory_missing_module(tmp, env):
    env["image"]["model"] = _factory(pretrained=False, factory="no_such_module_xyz:make")
    return ["model.factory", "no_such_module_xyz", "cannot import"]


def factory_missing_function(tmp, env):
    env["image"]["model"] = _factory(env["weights"], factory="examples.cifar_resnet:resnet9000")
    return ["model.factory", "resnet9000"]


def factory_not_a_module(tmp, env):
    env["image"]["model"] = _factory(pretrained=False, factory="builtins:dict")
    return ["model.factory", "dict", "not a torch.nn.Module"]


def factory_bad_kwargs(tmp, env):
    env["image"]["model"] = _factory(env["weights"], factory_kwargs={"depth": 20})
    return ["model.factory", "depth"]


def factory_without_weights(tmp, env):
    env["image"]["model"] = _factory()
    return ["model.weights"]


def weights_missing(tmp, env):
    env["image"]["model"] = _factory(tmp / "nowhere.th")
    return [str(tmp / "nowhere.th"), "does not exist"]


def weights_garbage_bytes(tmp, env):
    path = tmp / "garbage.th"
    path.write_bytes(bytes(range(256)) * 16)
    env["image"]["model"] = _factory(path)
    return [str(path), ("cannot read", "corrupt", "not a torch")]


def weights_garbage_safetensors(tmp, env):
    path = tmp / "garbage.safetensors"
    path.write_bytes(bytes(range(256)) * 16)
    env["image"]["model"] = _factory(path)
    return [str(path), "not a valid safetensors"]


def weights_garbage_unsafe_allowed(tmp, env):
    path = tmp / "garbage.th"
    path.write_bytes(bytes(range(256)) * 16)
    env["image"]["model"] = _factory(path, allow_unsafe_pickle=True)
    return [str(path), ("cannot read", "corrupt", "not a torch")]


def weights_empty_file(tmp, env):
    path = tmp / "empty.th"
    path.write_bytes(b"")
    env["image"]["model"] = _factory(path)
    return [str(path), "empty"]


def weights_pickled_list(tmp, env):
    path = tmp / "list.pt"
    with open(path, "wb") as file:
        pickle.dump([1, 2, 3], file)
    env["image"]["model"] = _factory(path)
    return [str(path), ("state dict of tensors", "cannot read", "not a torch")]


def weights_torch_saved_strings(tmp, env):
    import torch

    path = tmp / "strings.pt"
    torch.save({"conv1.weight": "not a tensor", "note": "hello"}, path)
    env["image"]["model"] = _factory(path)
    return [str(path), "state dict of tensors"]


def weights_pickled_object(tmp, env):
    import argparse

    path = tmp / "object.pt"
    with open(path, "wb") as file:
        pickle.dump(argparse.Namespace(weights=[1.0, 2.0]), file)
    env["image"]["model"] = _factory(path)
    return [str(path), "refused"]


def weights_key_missing(tmp, env):
    env["image"]["model"] = _factory(env["weights"], weights_key="state_dict")
    return [str(env["weights"]), "'state_dict'", "model.weights_key"]


def weights_other_architecture(tmp, env):
    import torch

    path = tmp / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    env["image"]["model"] = _factory(path)
    return [str(path), "model.weights"]  # nothing of the file fits the network: say so rather than train from scratch


def factory_head_missing(tmp, env):
    env["image"]["model"] = _factory(env["weights"], head="fc")
    return ["model.head", "'fc'", "no such module"]


def factory_head_not_linear(tmp, env):
    env["image"]["model"] = _factory(env["weights"], head="bn1")
    return ["model.head", "'bn1'", "nn.Linear"]


def factory_without_image_size(tmp, env):
    env["image"]["model"] = _factory(env["weights"])
    del env["image"]["data"]["image"]
    return ["data.image.size"]


def image_model_text_data(tmp, env):
    env["text"]["model"] = {"name": str(env["tiny_vit"])}
    return ["image input", "text data"]


def text_model_image_data(tmp, env):
    env["image"]["model"] = {"name": str(env["tiny_bert"]), "max_length": 16}
    return ["text input", "image data"]


def factory_model_text_data(tmp, env):
    env["text"]["model"] = _factory(env["weights"])
    env["text"]["data"]["image"] = {"size": 32}
    return ["image input", "text data"]


def hf_head_hidden(tmp, env):
    env["text"]["model"]["freeze"] = {"strategy": "feature_extraction", "head_hidden": 16}
    return ["model.freeze.head_hidden", "factory models"]


def max_length_beyond_positions(tmp, env):
    # The tiny BERT has 64 positions; a 100-word sentence with max_length 1000 cannot fit.
    path = write_tsv(tmp / "long.tsv", _rows(10) + [(" ".join(["good"] * 100), 1)])
    env["text"]["data"]["validation"] = str(path)
    env["text"]["model"]["max_length"] = 1000
    return ["model.max_length", "1000", "64"]


MODEL_CASES = [
    pytest.param(name_empty_folder, id="name-empty-folder"),
    pytest.param(name_missing_folder, id="name-missing-folder"),
    pytest.param(name_pkg_missing_subfolder, id="name-pkg-missing-subfolder"),
    pytest.param(name_unknown_package, id="name-unknown-package"),
    pytest.param(name_hub_id_offline, id="name-hub-id-offline"),
    pytest.param(config_not_json, id="config-not-json"),
    pytest.param(config_unknown_model_type, id="config-unknown-model-type"),
    pytest.param(hf_folder_without_weights, id="hf-folder-without-weights"),
    pytest.param(hf_garbage_weights, id="hf-garbage-weights"),
    pytest.param(hf_folder_without_tokenizer, id="hf-folder-without-tokenizer"),
    pytest.param(factory_missing_module, id="factory-missing-module"),
    pytest.param(factory_missing_function, id="factory-missing-function"),
    pytest.param(factory_not_a_module, id="factory-not-a-module"),
    pytest.param(factory_bad_kwargs, id="factory-bad-kwargs"),
    pytest.param(factory_without_weights, id="factory-without-weights"),
    pytest.param(weights_missing, id="weights-missing"),
    pytest.param(weights_garbage_bytes, id="weights-garbage-bytes"),
    pytest.param(weights_garbage_unsafe_allowed, id="weights-garbage-unsafe-pickle-allowed"),
    pytest.param(weights_garbage_safetensors, id="weights-garbage-safetensors"),
    pytest.param(weights_empty_file, id="weights-empty-file"),
    pytest.param(weights_pickled_list, id="weights-pickled-list"),
    pytest.param(weights_torch_saved_strings, id="weights-strings-not-tensors"),
    pytest.param(weights_pickled_object, id="weights-pickled-object"),
    pytest.param(weights_key_missing, id="weights-key-missing"),
    pytest.param(weights_other_architecture, id="weights-other-architecture"),
    pytest.param(factory_head_missing, id="factory-head-missing"),
    pytest.param(factory_head_not_linear, id="factory-head-not-linear"),
    pytest.param(factory_without_image_size, id="factory-without-image-size"),
    pytest.param(image_model_text_data, id="image-model-text-data"),
    pytest.param(text_model_image_data, id="text-model-image-data"),
    pytest.param(factory_model_text_data, id="factory-model-text-data"),
    pytest.param(hf_head_hidden, id="hf-head-hidden"),
    pytest.param(max_length_beyond_positions, id="max-length-beyond-positions"),
]


@pytest.mark.parametrize("make", MODEL_CASES)
def test_malformed_model(make: ModelCase, tiny_bert_dir, tiny_vit_dir, text_data, image_data, resnet_weights, tmp_path,
                         capsys):
    env = {"text": text_base(tiny_bert_dir, text_data), "image": image_base(_factory(resnet_weights), image_data),
           "tiny_bert": tiny_bert_dir, "tiny_vit": tiny_vit_dir, "weights": resnet_weights}
    before = {"text": json.dumps(env["text"]), "image": json.dumps(env["image"])}
    expect = make(tmp_path, env)
    changed = [kind for kind in ("text", "image") if json.dumps(env[kind]) != before[kind]]
    assert len(changed) == 1, "a model case changes exactly one of the recipes"
    out = tmp_path / "run"
    code, err = run_train(write_recipe(env[changed[0]], tmp_path / "recipe.yaml"), out, capsys)
    assert_clear_error(code, err, expect, out)


# ---------------------------------------------------------------- the command line and the console

def test_a_one_megabyte_line_gives_a_short_error(tiny_bert_dir, text_data, tmp_path, capsys):
    recipe = text_base(tiny_bert_dir, text_data)
    recipe["data"]["train"] = str(tmp_path / "one-line.csv")
    (tmp_path / "one-line.csv").write_text("x" * 2**20)  # no newline: the header is the whole file
    code, err = run_train(write_recipe(recipe, tmp_path / "recipe.yaml"), tmp_path / "run", capsys)
    assert_clear_error(code, err, ["no column 'sentence'", "characters left out"], tmp_path / "run")
    assert len(err) < 2000


def test_overrides_are_accepted_after_the_options(tiny_bert_dir, text_data, tmp_path, capsys):
    recipe = write_recipe(text_base(tiny_bert_dir, text_data), tmp_path / "recipe.yaml")
    capsys.readouterr()
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "run"), "train.epochs=1", "train.max_steps=1"]) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["steps"] == 1
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "run"), "--resume", "train.max_steps=2",
                 "train.epochs=1"]) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["steps"] == 2
    with pytest.raises(SystemExit):  # anything else stays an error of the command line
        main(["train", str(recipe), "--output-dir", str(tmp_path / "other"), "--no-such-option"])


def test_a_folder_given_as_the_recipe_is_named_as_a_folder(tmp_path, capsys):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("model: {name: m}\n")
    code, err = run_train(tmp_path / "recipes", None, capsys)
    assert_clear_error(code, err, ["is a folder", "mine.yaml"])
    assert "does not exist" not in err


def test_data_encoding_reads_a_latin1_file(tiny_bert_dir, text_data, tmp_path, capsys):
    rows = "sentence\tlabel\n" + "".join(f"caf\u00e9 {w} film\t{i % 2}\n" for i, w in enumerate(["good", "bad"] * 8))
    (tmp_path / "latin1.tsv").write_bytes(rows.encode("latin-1"))
    recipe = text_base(tiny_bert_dir, text_data)
    recipe["data"].update(train=str(tmp_path / "latin1.tsv"), encoding="latin-1")
    code, err = run_train(write_recipe(recipe, tmp_path / "recipe.yaml"), tmp_path / "run", capsys)
    assert code == 0, err
    # The folder remembers it: evaluate reads a Latin-1 file of the same kind.
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "latin1.tsv")]) == 0
    recipe["data"]["encoding"] = "klingon-8"
    code, err = run_train(write_recipe(recipe, tmp_path / "recipe.yaml"), tmp_path / "run2", capsys)
    assert_clear_error(code, err, ["data.encoding", "unknown text encoding"], tmp_path / "run2")


def test_many_classes_are_counted_not_all_printed(tiny_bert_dir, tmp_path, capsys):
    labels = [f"intent_{i:02d}" for i in range(77)]
    rows = [(f"good movie {i}", labels[i % 77]) for i in range(154)]
    from conftest import write_tsv

    data = {name: write_tsv(tmp_path / f"{name}.tsv", rows) for name in ("train", "validation")}
    recipe = write_recipe(text_base(tiny_bert_dir, data), tmp_path / "recipe.yaml")
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "77 labels (intent_00, intent_01" in out and "(+69)" in out and "intent_76" not in out
