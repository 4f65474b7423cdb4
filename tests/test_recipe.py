"""Recipe validation: every problem is reported at once, with its key path and what is allowed.

These tests only parse recipes; nothing here reads data or loads a model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tuneforge import cli
from tuneforge.errors import RecipeError, TuneforgeError
from tuneforge.config import (
    DataSpec,
    ImageSpec,
    Recipe,
    TrainSpec,
    apply_overrides,
    default_data_dir,
    load_recipe,
    parse_recipe,
)

RECIPE_SECTIONS = ["name", "model", "data", "task", "train", "optim", "eval", "adapter", "output"]


def minimal(**sections) -> dict:
    raw = {"model": {"name": "some/model"}, "data": {"train": "train.tsv"}}
    raw.update(sections)
    return raw


def problems_of(source, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(source, overrides)
    return info.value.problems


def problem_for(problems: list[str], key: str) -> str:
    """The one problem whose message starts with the dotted key path `key`."""
    matches = [problem for problem in problems if problem.startswith(f"{key}:")]
    assert len(matches) == 1, f"expected exactly one problem for {key!r}, got {problems}"
    return matches[0]


def write_yaml(path: Path, raw) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- validation


def test_every_problem_is_reported_at_once_with_its_key_path():
    raw = minimal(
        train={"epochs": "three", "bogus_key": 1, "mixed_precision": "fp8"},
        optim={"lr": -1},
        augment={"flip": True},
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(raw)
    problems = info.value.problems
    assert len(problems) == 5, problems

    epochs = problem_for(problems, "train.epochs")
    assert "valid integer" in epochs and "'three'" in epochs

    precision = problem_for(problems, "train.mixed_precision")
    assert "'no', 'bf16' or 'fp16'" in precision and "'fp8'" in precision

    lr = problem_for(problems, "optim.lr")
    assert "greater than 0" in lr and "-1" in lr

    unknown = problem_for(problems, "train.bogus_key")
    assert "unknown key" in unknown
    allowed = unknown.split("allowed here:", 1)[1]
    for field in TrainSpec.model_fields:
        assert field in allowed, f"{field} missing from allowed keys in {unknown!r}"

    section = problem_for(problems, "augment")
    assert "unknown key" in section
    for name in RECIPE_SECTIONS:
        assert name in section.split("allowed here:", 1)[1]

    # The rendered message is one block: a count header, then one bullet per problem.
    rendered = str(info.value)
    assert rendered.splitlines()[0] == "5 recipe problems in recipe:"
    assert all(f"  - {problem}" in rendered for problem in problems)


def test_unknown_key_in_a_nested_section_lists_that_sections_keys():
    problems = problems_of(minimal(data={"train": "t.tsv", "image": {"sise": 32}}))
    message = problem_for(problems, "data.image.sise")
    assert message == f"data.image.sise: unknown key (allowed here: {', '.join(ImageSpec.model_fields)})"


def test_a_typo_never_falls_back_to_a_default():
    # `epoch` (singular) must not be silently ignored in favour of the default epochs=3.
    problems = problems_of(minimal(train={"epoch": 1}))
    assert problems == [problem_for(problems, "train.epoch")]
    assert "unknown key" in problems[0]


def test_problems_from_a_file_name_the_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", minimal(train={"batch_size": 0}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.source == str(path)
    assert str(info.value).splitlines()[0] == f"1 recipe problem in {path}:"
    assert "positive whole number or 'auto'" in problem_for(info.value.problems, "train.batch_size")


def test_a_section_that_is_not_a_mapping_is_reported():
    problems = problems_of(minimal(train=5))
    assert "valid dictionary" in problem_for(problems, "train")


def test_missing_model_and_data_sections_are_both_reported():
    problems = problems_of({"name": "x"})
    assert sorted(problems) == ["data: required key is missing", "model: required key is missing"]


def test_empty_recipe_file_reports_the_missing_sections(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert sorted(problems_of(path)) == ["data: required key is missing", "model: required key is missing"]


@pytest.mark.parametrize("model", [{"name": "m", "factory": "pkg.mod:build"}, {}, {"max_length": 16}])
def test_model_needs_exactly_one_of_name_and_factory(model):
    problems = problems_of(minimal(model=model))
    assert "give exactly one of model.name" in problem_for(problems, "model")
    assert "model.factory" in problems[0]


def test_trust_remote_code_needs_a_pinned_revision():
    problems = problems_of(minimal(model={"name": "m", "trust_remote_code": True}))
    assert "model.trust_remote_code needs model.revision" in problem_for(problems, "model")
    recipe = load_recipe(minimal(model={"name": "m", "trust_remote_code": True, "revision": "0123abc"}))
    assert recipe.model.revision == "0123abc"


def test_other_cross_field_checks():
    assert "'package.module:function'" in problem_for(problems_of(minimal(model={"factory": "pkg.build"})), "model")
    assert "model.weights is for factory models" in problem_for(
        problems_of(minimal(model={"name": "m", "weights": "w.safetensors"})), "model")
    assert "not both" in problem_for(
        problems_of(minimal(data={"train": "t", "validation": "v", "validation_fraction": 0.1})), "data")
    assert "needs task.labels" in problem_for(problems_of(minimal(task={"label_names": ["a", "b"]})), "task")
    assert "has 1 names for 2 labels" in problem_for(
        problems_of(minimal(task={"labels": ["0", "1"], "label_names": ["neg"]})), "task")


def test_parse_recipe_rejects_a_non_mapping_and_names_the_source():
    with pytest.raises(RecipeError) as info:
        parse_recipe(["model", "data"], source="list.yaml")
    assert info.value.source == "list.yaml"
    assert info.value.problems == [
        "a recipe is a mapping of sections (model, data, task, train, optim, eval, output), not a list"]
    assert "in list.yaml" in info.value.render()


def test_recipe_error_is_a_tuneforge_error():
    # The CLI turns TuneforgeError into exit code 2.
    assert issubclass(RecipeError, TuneforgeError)


# ---------------------------------------------------------------- overrides


def test_override_values_are_yaml_scalars():
    recipe = load_recipe(minimal(), [
        "train.epochs=7", "optim.lr=1.0e-4", "model.new_head=false", "train.mixed_precision=bf16",
        "optim.betas=[0.8, 0.95]", "name=a=b",
    ])
    assert recipe.train.epochs == 7 and isinstance(recipe.train.epochs, int)
    assert recipe.optim.lr == pytest.approx(1e-4) and isinstance(recipe.optim.lr, float)
    assert recipe.model.new_head is False
    assert recipe.train.mixed_precision == "bf16"
    assert recipe.optim.betas == (0.8, 0.95)
    assert recipe.name == "a=b"  # only the first '=' separates key and value


def test_override_1e_minus_4_is_a_yaml_string_that_the_float_field_still_accepts():
    # PyYAML (YAML 1.1) reads '1e-4' as a string and '1.0e-4' as a float ...
    assert apply_overrides({}, ["optim.lr=1e-4"]) == {"optim": {"lr": "1e-4"}}
    assert apply_overrides({}, ["optim.lr=1.0e-4"]) == {"optim": {"lr": 1.0e-4}}
    # ... but the documented CLI example `optim.lr=1e-4` still gives the float 1e-4.
    for value in ("1e-4", "1.0e-4"):
        lr = load_recipe(minimal(), [f"optim.lr={value}"]).optim.lr
        assert isinstance(lr, float) and lr == pytest.approx(1e-4)


def test_override_with_empty_value_sets_null():
    recipe = load_recipe(minimal(train={"max_steps": 10}), ["train.max_steps="])
    assert recipe.train.max_steps is None


def test_override_creates_missing_nested_sections():
    raw = apply_overrides({"data": {"train": "t.tsv"}}, ["data.image.size=32", "eval.every_steps=5"])
    assert raw == {"data": {"train": "t.tsv", "image": {"size": 32}}, "eval": {"every_steps": 5}}
    recipe = load_recipe(minimal(), ["data.image.size=32", "eval.every_steps=5"])
    assert recipe.data.image.size == 32 and recipe.eval.every_steps == 5


def test_override_of_an_unknown_key_is_reported_as_unknown():
    problems = problems_of(minimal(), ["train.epoch=3"])
    assert problems == [problem_for(problems, "train.epoch")]
    assert "unknown key (allowed here: epochs," in problems[0]


def test_malformed_overrides_are_all_reported():
    problems = problems_of(minimal(), ["train.epochs", "optim.lr=1.0e-4", "seed"])
    assert problems == [
        "override 'train.epochs': expected key.path=value, e.g. train.epochs=3",
        "override 'seed': expected key.path=value, e.g. train.epochs=3",
    ]


def test_override_through_a_value_is_reported():
    problems = problems_of(minimal(train={"epochs": 1}), ["train.epochs.x=3"])
    assert problems == ["override 'train.epochs.x=3': epochs is a value, not a section"]


def test_overrides_apply_before_validation(tmp_path):
    # A bad value in the file can be fixed from the command line.
    path = write_yaml(tmp_path / "r.yaml", minimal(train={"epochs": "three"}))
    assert "train.epochs" in problems_of(path)[0]
    assert load_recipe(path, ["train.epochs=2"]).train.epochs == 2


def test_overrides_on_a_recipe_object_leave_it_unchanged():
    recipe = load_recipe(minimal(train={"epochs": 4}))
    changed = load_recipe(recipe, ["train.epochs=1"])
    assert changed.train.epochs == 1
    assert recipe.train.epochs == 4


def test_overrides_do_not_mutate_the_callers_dict():
    raw = minimal(train={"epochs": 4})
    before = copy.deepcopy(raw)
    load_recipe(raw, ["train.epochs=1"])
    assert raw == before


# ---------------------------------------------------------------- ${VAR} expansion


def test_tuneforge_data_expands_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_DATA", str(tmp_path))
    recipe = load_recipe(minimal(data={"train": "${TUNEFORGE_DATA}/sst2/train.tsv",
                                       "validation": "${TUNEFORGE_DATA}/sst2/dev.tsv"}))
    assert recipe.data.train == f"{tmp_path}/sst2/train.tsv"
    assert recipe.data.validation == f"{tmp_path}/sst2/dev.tsv"


def test_tuneforge_data_has_a_built_in_default(monkeypatch):
    monkeypatch.delenv("TUNEFORGE_DATA", raising=False)
    recipe = load_recipe(minimal(data={"train": "${TUNEFORGE_DATA}/sst2/train.tsv"}))
    assert recipe.data.train == f"{default_data_dir()}/sst2/train.tsv"


def test_empty_tuneforge_data_uses_the_default(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_DATA", "")
    recipe = load_recipe(minimal(data={"train": "${TUNEFORGE_DATA}/sst2/train.tsv"}))
    assert recipe.data.train == f"{default_data_dir()}/sst2/train.tsv"


def test_default_is_used_only_when_the_variable_is_unset(monkeypatch):
    monkeypatch.delenv("TF_TEST_MODEL_DIR", raising=False)
    raw = minimal(model={"name": "${TF_TEST_MODEL_DIR:-models/fallback}"})
    assert load_recipe(raw).model.name == "models/fallback"
    monkeypatch.setenv("TF_TEST_MODEL_DIR", "/opt/models/bert")
    assert load_recipe(raw).model.name == "/opt/models/bert"


def test_expansion_reaches_lists_nested_values_and_overrides(monkeypatch):
    monkeypatch.setenv("TF_TEST_PREFIX", "module.")
    monkeypatch.setenv("TF_TEST_ROOT", "/data")
    recipe = load_recipe(
        minimal(model={"factory": "pkg.mod:build", "strip_prefix": ["${TF_TEST_PREFIX}"],
                       "factory_kwargs": {"root": "${TF_TEST_ROOT}/x", "depth": 20}}),
        ["data.test=${TF_TEST_ROOT}/test.tsv"],
    )
    assert recipe.model.strip_prefix == ["module."]
    assert recipe.model.factory_kwargs == {"root": "/data/x", "depth": 20}
    assert recipe.data.test == "/data/test.tsv"


def test_an_unset_variable_without_default_is_an_error_naming_it(monkeypatch):
    monkeypatch.delenv("TF_TEST_NOT_SET", raising=False)
    problems = problems_of(minimal(model={"name": "${TF_TEST_NOT_SET}/bert"}))
    assert len(problems) == 1
    assert "environment variable TF_TEST_NOT_SET is not set" in problems[0]
    assert "${TF_TEST_NOT_SET:-default}" in problems[0]


def test_all_unset_variables_are_reported_with_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_TEST_UNSET_A", raising=False)
    monkeypatch.delenv("TF_TEST_UNSET_B", raising=False)
    path = write_yaml(tmp_path / "r.yaml", minimal(model={"name": "${TF_TEST_UNSET_A}"},
                                                   data={"train": "${TF_TEST_UNSET_B}/t.tsv"}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = "\n".join(info.value.problems)
    assert "TF_TEST_UNSET_A" in text and "TF_TEST_UNSET_B" in text
    assert info.value.source == str(path)


# ---------------------------------------------------------------- YAML round trip and files


def test_to_yaml_round_trips_through_load_recipe(tmp_path):
    recipe = load_recipe({
        "name": "round-trip",
        "model": {"factory": "examples.cifar_resnet:resnet20", "factory_kwargs": {"depth": 20, "widths": [16, 32]},
                  "weights": "w.safetensors", "strip_prefix": ["module."], "head": "fc", "head_dropout": 0.2},
        "data": {"train": "train", "test": "test", "format": "imagefolder", "validation_fraction": 0.1,
                 "image": {"size": 32, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}},
        "task": {"labels": ["cat", "dog"], "label_names": ["Cat", "Dog"]},
        "train": {"epochs": 0, "max_steps": 10, "mixed_precision": "bf16", "device": "cpu"},
        "optim": {"lr": 1.0e-4, "betas": [0.8, 0.95], "schedule": {"name": "cosine", "warmup_steps": 3}},
        "eval": {"metric": "f1_macro", "mode": "max", "batch_size": 7},
        "output": {"dir": "runs/{name}-x"},
    })
    text = recipe.to_yaml()
    assert list(yaml.safe_load(text)) == RECIPE_SECTIONS
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    again = load_recipe(path)
    assert again == recipe
    assert again.to_yaml() == text


def test_to_yaml_keeps_expanded_values(monkeypatch, tmp_path):
    # The run directory's recipe.yaml is the resolved recipe: it must not depend on the environment later.
    monkeypatch.setenv("TUNEFORGE_DATA", "/datasets")
    recipe = load_recipe(minimal(data={"train": "${TUNEFORGE_DATA}/t.tsv"}))
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    monkeypatch.setenv("TUNEFORGE_DATA", "/elsewhere")
    assert load_recipe(path) == recipe
    assert load_recipe(path).data.train == "/datasets/t.tsv"


def test_missing_recipe_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    assert problems_of(path) == [f"recipe file {path} does not exist"]
    assert problems_of(str(path)) == [f"recipe file {path} does not exist"]


def test_invalid_yaml_is_named_with_its_position(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: m\ndata: [unclosed\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: not valid YAML:")
    assert "line 3" in problems[0]


def test_non_utf8_recipe_is_reported(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: not valid YAML:")


def test_a_yaml_list_is_not_a_recipe(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    assert problems_of(path) == ["a recipe is a mapping of sections (model, data, task, train, optim, eval, output), not a list"]


def test_a_yaml_list_is_not_a_recipe_even_with_overrides(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    problems = problems_of(path, ["train.epochs=1"])
    assert any("a recipe is a mapping" in problem for problem in problems), problems


def test_shipped_recipes_are_valid(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_DATA", str(tmp_path))
    for path in sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert isinstance(recipe, Recipe)
        assert isinstance(recipe.data, DataSpec)


# ---------------------------------------------------------------- CLI


def test_cli_train_with_a_bad_recipe_exits_2_and_lists_the_problems(tmp_path, capsys):
    path = write_yaml(tmp_path / "bad.yaml", minimal(train={"epochs": "three", "bogus_key": 1}, optim={"lr": -1}))
    assert cli.main(["train", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0] == f"error: 3 recipe problems in {path}:"
    assert any(line.startswith("  - train.epochs:") for line in lines)
    assert any(line.startswith("  - train.bogus_key: unknown key (allowed here:") for line in lines)
    assert any(line.startswith("  - optim.lr:") for line in lines)
    assert len(lines) == 4
    assert "Traceback" not in captured.err + captured.out


def test_cli_train_reports_a_missing_recipe_and_bad_overrides(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert cli.main(["train", str(missing)]) == 2
    assert f"recipe file {missing} does not exist" in capsys.readouterr().err

    path = write_yaml(tmp_path / "ok.yaml", minimal())
    assert cli.main(["train", str(path), "train.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key" in err and "Traceback" not in err
