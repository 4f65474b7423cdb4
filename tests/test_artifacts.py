"""The run directory and the model folder have one owner (artifacts.py): tuneforge.json is a versioned ModelInfo,
read the same way by every verb."""

from __future__ import annotations

import json
import shutil

import pytest

import tuneforge
from tuneforge.artifacts import INFO_VERSION, ModelInfo, read_model_info
from tuneforge.cli import main as cli
from tuneforge.errors import ModelError

TEXTS = ["good movie", "the plot was dull", "great actor"]


def _copy_run(small_text_run, tmp_path):
    return shutil.copytree(small_text_run[0].run_dir, tmp_path / "run")


def test_model_info_is_versioned_and_validated(small_text_run):
    info = read_model_info(small_text_run[0].run_dir / "model")
    assert isinstance(info, ModelInfo) and info.format_version == INFO_VERSION
    assert info.task == "classification" and info.task_settings["type"] == "classification"
    saved = json.loads((small_text_run[0].run_dir / "model" / "tuneforge.json").read_text())
    assert set(saved) == set(ModelInfo.model_fields)  # every field written, nothing else


def test_a_folder_from_a_newer_tuneforge_is_a_clear_error(small_text_run, tmp_path, capsys):
    run = _copy_run(small_text_run, tmp_path)
    path = run / "model" / "tuneforge.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": INFO_VERSION + 1}))
    with pytest.raises(ModelError, match="written by a newer tuneforge"):
        tuneforge.load(run)
    assert cli(["predict", str(run), "--input", str(small_text_run[1]["test"]), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "upgrade tuneforge" in capsys.readouterr().err


def test_a_folder_written_before_the_format_was_versioned_still_loads(small_text_run, tmp_path):
    """Version 1 kept the task's settings and state at the top level and had no format_version."""
    run = _copy_run(small_text_run, tmp_path)
    path = run / "model" / "tuneforge.json"
    info = json.loads(path.read_text())
    old = {key: info[key] for key in ("task", "modality", "label_values", "label_names", "max_length", "data")}
    path.write_text(json.dumps(old))
    assert tuneforge.load(run).predict(TEXTS) == tuneforge.load(small_text_run[0].run_dir).predict(TEXTS)


def test_a_model_description_of_another_shape_is_refused(small_text_run, tmp_path):
    run = _copy_run(small_text_run, tmp_path)
    (run / "model" / "tuneforge.json").write_text(json.dumps({"format_version": INFO_VERSION, "task": "classification"}))
    with pytest.raises(ModelError, match="not a valid tuneforge model description"):
        tuneforge.load(run)
