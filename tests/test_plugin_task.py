"""A task is one file: tests/plugins/tuneforge_ordinal.py defines ordinal classification outside tuneforge,
installed here as a plug-in (an entry point in the group `tuneforge.tasks` of a distribution on the path), and
the CLI trains, evaluates, predicts and exports it without a change to tuneforge's code."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import text_recipe, write_tsv

PLUGIN = Path(__file__).parent / "plugins" / "tuneforge_ordinal.py"
SCALE = {"1": ["terrible", "awful", "worse"], "2": ["bad", "poor", "dull", "boring"], "3": ["fine", "good", "lovely"],
         "4": ["great", "superb", "wonderful", "excellent"]}  # words of the tiny BERT's vocabulary, in order
FILLER = "movie film plot actor story scene the a is was and".split()


def _rows(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = str(i % 4 + 1)
        words = rng.sample(FILLER, 3) + [rng.choice(SCALE[label])]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder that holds the plug-in as an installed distribution: its module and its entry point."""
    site = tmp_path_factory.mktemp("site")
    shutil.copy(PLUGIN, site / PLUGIN.name)
    info = site / "tuneforge_ordinal-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tuneforge-ordinal\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tuneforge.tasks]\nordinal = tuneforge_ordinal\n")
    return site


def _cli(*args: str, site: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site) if site else "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_task_from_outside_trains_evaluates_predicts_and_exports_through_the_cli(plugin_path, tiny_bert_dir,
                                                                                 tmp_path):
    data = {"train": write_tsv(tmp_path / "train.tsv", _rows(160, seed=1)),
            "validation": write_tsv(tmp_path / "validation.tsv", _rows(32, seed=2)),
            "test": write_tsv(tmp_path / "test.tsv", _rows(40, seed=3))}
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", epochs=6)
    recipe["task"] = {"type": "ordinal"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    trained = _cli("train", str(tmp_path / "recipe.yaml"), site=plugin_path, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["selection_metric"] == "mae" and set(result) >= {"mae", "accuracy", "within_one"}
    # Learned the order: far better than always answering the middle of the scale (mean error 1.0 step).
    assert result["mae"] < 0.6, result
    assert json.loads((tmp_path / "run" / "model" / "tuneforge.json").read_text())["task"] == "ordinal"

    evaluated = _cli("evaluate", str(tmp_path / "run"), "--data", str(data["test"]), site=plugin_path, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["mae"] == pytest.approx(result["mae"])

    # A labelled file with a grade the model never learned: refused before anything runs, row named.
    off_scale = write_tsv(tmp_path / "off.tsv", _rows(6, seed=4) + [("superb film", "5")])
    refused = _cli("evaluate", str(tmp_path / "run"), "--data", str(off_scale), site=plugin_path, cwd=tmp_path)
    assert refused.returncode == 2 and "off the model's scale" in refused.stderr and "off.tsv:8" in refused.stderr, refused.stderr

    predicted = _cli("predict", str(tmp_path / "run"), "--input", str(data["test"]), "--output", str(tmp_path / "p.csv"),
                     site=plugin_path, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    truth = [label for _, label in _rows(40, seed=3)]
    errors = [abs(int(row["label"]) - int(label)) for row, label in zip(rows, truth)]
    assert len(rows) == 40 and sum(errors) / len(errors) == pytest.approx(result["mae"])

    exported = _cli("export", str(tmp_path / "run"), "--format", "hf", "--output", str(tmp_path / "hf"),
                    site=plugin_path, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        scores = model(**tokenizer([text for text, _ in _rows(40, seed=3)], padding=True, return_tensors="pt")).logits
    assert [float(row["score"]) for row in rows] == pytest.approx(scores.squeeze(-1).tolist(), abs=1e-3)
    assert "ordinal classifier" in (tmp_path / "hf" / "README.md").read_text()

    # Without the plug-in installed, the folder's task is unknown: a clear refusal, nothing imported.
    unknown = _cli("predict", str(tmp_path / "run"), "--input", str(data["test"]), "--output", str(tmp_path / "q.csv"),
                   site=None, cwd=tmp_path)
    assert unknown.returncode == 2 and "'ordinal', which is not registered" in unknown.stderr


def test_a_broken_plug_in_is_named_in_a_one_line_error(tiny_bert_dir, tmp_path):
    site = tmp_path / "site"
    (site / "tuneforge_broken-0.1.dist-info").mkdir(parents=True)
    (site / "tuneforge_broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tuneforge-broken\n"
                                                                   "Version: 0.1\n")
    (site / "tuneforge_broken-0.1.dist-info" / "entry_points.txt").write_text("[tuneforge.tasks]\nbroken = tuneforge_broken\n"
                                                                          "quiet = tuneforge_quiet\n")
    (site / "tuneforge_broken.py").write_text("raise ImportError('needs a library that is not installed')\n")
    (site / "tuneforge_quiet.py").write_text("VALUE = 1  # imports, but registers no task\n")
    data = {name: write_tsv(tmp_path / f"{name}.tsv", _rows(8, seed=i)) for i, name in enumerate(("train", "validation"))}
    for name, message in (("broken", "could not be imported (ImportError: needs a library that is not installed)"),
                          ("quiet", "did not register a task of that name")):
        recipe = text_recipe(tiny_bert_dir, data, tmp_path / name, epochs=1)
        recipe["task"] = {"type": name}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        result = _cli("train", str(tmp_path / f"{name}.yaml"), site=site, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr and "tuneforge-broken" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / name).exists()
