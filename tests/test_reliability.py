"""Faults injected on purpose: damaged checkpoints, full disks, NaN losses, hostile pickles, kills."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import script_accuracy, text_recipe

from tuneforge.training.hooks import RunHooks
from tuneforge.training.checkpoint import checkpoint_weights, complete_checkpoints, verify_checkpoint
from tuneforge.cli import main as cli
from tuneforge.errors import ModelError, ResumeError, StorageError, TrainingError
from tuneforge.training.run import finetune
from tuneforge.tasks.classification import ClassificationTask
from tuneforge.models.weights import read_state_dict

SETTINGS = {"epochs": 2, "checkpoint_every_steps": 3, "keep_checkpoints": 10}


class Interrupted(Exception):
    pass


def _records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def _final_weights(run_dir):
    return checkpoint_weights(complete_checkpoints(run_dir / "checkpoints")[-1])


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _interrupted_run(recipe, monkeypatch, step):
    original = RunHooks.on_step_end

    def stop(self, state):
        original(self, state)
        if state.step == step:
            raise Interrupted

    monkeypatch.setattr(RunHooks, "on_step_end", stop)
    with pytest.raises(Interrupted):
        finetune(recipe)
    monkeypatch.undo()


def _interrupted_after_step_8(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    """A run interrupted after step 8 (checkpoints at steps 3 and 6): its recipe, the uninterrupted run's
    result, and the newest checkpoint's folder."""
    data, expected = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS)
    _interrupted_run(recipe, monkeypatch, 8)
    return recipe, expected, tmp_path / "run" / "checkpoints" / "step-00000006"


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert_dir, tmp_path_factory):
    from conftest import sentiment_rows, write_tsv

    root = tmp_path_factory.mktemp("reliability")
    data = {"train": write_tsv(root / "train.tsv", sentiment_rows(96, seed=1)),
            "validation": write_tsv(root / "validation.tsv", sentiment_rows(32, seed=2))}
    result = finetune(text_recipe(tiny_bert_dir, data, root / "whole", **SETTINGS))
    return data, _final_weights(result.run_dir)


# ---------------------------------------------------------------- checkpoints and resume

def test_damaged_newest_checkpoint_is_skipped_and_the_run_still_matches(tiny_bert_dir, uninterrupted, tmp_path,
                                                                         monkeypatch):
    recipe, expected, newest = _interrupted_after_step_8(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch)
    newest = newest / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    assert "bytes" in verify_checkpoint(newest.parent)

    strict = {**recipe, "train": {**recipe["train"], "strict_resume": True}}
    with pytest.raises(ResumeError, match="step-00000006 is damaged"):
        finetune(strict, resume=True)
    resumed = finetune(recipe, resume=True)
    skipped = _records(resumed.run_dir, "skipped_checkpoint")
    assert skipped[0]["path"] == "checkpoints/step-00000006"
    assert _records(resumed.run_dir, "resume")[-1]["step"] == 3
    assert _same(_final_weights(resumed.run_dir), expected)


def test_hostile_pickle_as_optimizer_state_is_never_unpickled(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    data, _ = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS)
    _interrupted_run(recipe, monkeypatch, 4)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "run" / "checkpoints" / "step-00000003"
    with open(folder / "optimizer.pt", "wb") as file:
        pickle.dump({"state": Payload()}, file)
    state = json.loads((folder / "state.json").read_text())  # sizes made to match, as an attacker would
    state["files"]["optimizer.pt"] = (folder / "optimizer.pt").stat().st_size
    (folder / "state.json").write_text(json.dumps(state))
    result = finetune(recipe, resume=True)
    assert "code execution" in _records(result.run_dir, "skipped_checkpoint")[0]["why"]
    assert not marker.exists()
    with open(tmp_path / "evil.th", "wb") as file:
        pickle.dump({"state_dict": Payload()}, file)
    with pytest.raises(ModelError, match="allow_unsafe_pickle"):
        read_state_dict(tmp_path / "evil.th")
    assert not marker.exists()


def test_missing_rng_state_is_a_warning(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    data, _ = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS)
    _interrupted_run(recipe, monkeypatch, 4)
    (tmp_path / "run" / "checkpoints" / "step-00000003" / "rng.safetensors").unlink()
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json").read_text())
    del state["files"]["rng.safetensors"]
    (tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json").write_text(json.dumps(state))
    result = finetune(recipe, resume=True)
    warnings = _records(result.run_dir, "resume")[0]["warnings"]
    assert any("reproducibility is lost" in w for w in warnings)


def test_rotation_never_deletes_the_best_checkpoint(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    data, _ = uninterrupted
    script_accuracy(monkeypatch, [0.9, 0.5, 0.6])  # best after epoch 1, then worse
    result = finetune(text_recipe(tiny_bert_dir, data, tmp_path / "run", epochs=3, keep_checkpoints=1))
    assert [p.name for p in complete_checkpoints(result.run_dir / "checkpoints")] == ["step-00000012", "step-00000036"]


def test_resume_refuses_a_changed_label_set_and_lists_harmless_changes(tiny_bert_dir, uninterrupted, tmp_path,
                                                                        monkeypatch, capsys):
    data, _ = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS)
    _interrupted_run(recipe, monkeypatch, 13)  # after epoch 1: the model folder exists
    with pytest.raises(ResumeError, match="task.labels"):
        finetune({**recipe, "task": {"labels": ["0", "1", "2"]}}, resume=True)
    changed = {**recipe, "train": {**recipe["train"], "log_every_steps": 5}}
    finetune(changed, resume=True)
    assert "train.log_every_steps" in capsys.readouterr().out


def test_a_full_disk_stops_training_with_a_clear_error_and_keeps_the_last_checkpoint(
        tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    import tuneforge.training.checkpoint as checkpoint

    data, _ = uninterrupted
    real_save = checkpoint.save_model
    calls = {"n": 0}

    def full_disk(model, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(model, path)

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    with pytest.raises(StorageError, match="No space left on device.*step-00000003 is intact"):
        finetune(text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS))
    folders = list((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in folders] == ["step-00000003"]  # no half-written folder left
    assert verify_checkpoint(folders[0]) is None
    monkeypatch.undo()
    resumed = finetune(text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS), resume=True)
    assert resumed.metrics["steps"] == 24


# ---------------------------------------------------------------- numerical faults

def _nan_at(monkeypatch, steps):
    real = ClassificationTask.loss
    calls = {"n": 0}

    def loss(self, logits, targets):
        calls["n"] += 1
        value = real(self, logits, targets)
        return value * float("nan") if calls["n"] in steps else value

    monkeypatch.setattr(ClassificationTask, "loss", loss)


def test_nan_loss_stops_with_the_step_and_the_examples(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    data, _ = uninterrupted
    _nan_at(monkeypatch, {5})  # one loss call per step here: step 5
    with pytest.raises(TrainingError) as info:
        finetune(text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS))
    message = info.value.render()
    assert "step 5" in message and "train.tsv:" in message
    newest = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert newest.name == "step-00000003"
    assert all(torch.isfinite(t).all() for t in checkpoint_weights(newest).values())


def test_skip_mode_counts_skipped_steps_and_stops_after_too_many_in_a_row(tiny_bert_dir, uninterrupted, tmp_path,
                                                                          monkeypatch):
    data, _ = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "skip", **SETTINGS)
    recipe["train"].update(nonfinite="skip", max_nonfinite_in_row=3)
    _nan_at(monkeypatch, {5, 6})
    result = finetune(recipe)
    assert result.metrics["nonfinite_skipped"] == 2
    assert result.metrics["steps"] == 22  # two of the 24 updates skipped
    assert [r["step"] for r in _records(result.run_dir, "nonfinite")] == [5, 5]  # the same step number, twice

    monkeypatch.undo()
    _nan_at(monkeypatch, {5, 6, 7})
    recipe["output"]["dir"] = str(tmp_path / "stop")
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        finetune(recipe)


# ---------------------------------------------------------------- kills

@pytest.mark.slow
def test_sigkill_during_steps_and_saves_then_resume_matches_uninterrupted(tiny_bert_dir, uninterrupted, tmp_path):
    data, expected = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "unused", **SETTINGS)
    recipe["train"]["checkpoint_every_steps"] = 1  # a save every step: kills land inside saves too
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tuneforge", "train", str(recipe_file), "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    rng = random.Random(0)
    kills = {"in_save": 0, "in_step": 0}
    for attempt in range(5):
        process = subprocess.Popen(command + (["--resume"] if attempt else []), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target_in_save = attempt % 2 == 0
        deadline = time.monotonic() + 120
        seen = len(complete_checkpoints(out / "checkpoints"))
        while process.poll() is None and time.monotonic() < deadline:
            checkpoints = out / "checkpoints"
            saving = checkpoints.is_dir() and any(p.name.endswith(".partial") for p in checkpoints.iterdir())
            progressed = len(complete_checkpoints(checkpoints)) > seen + rng.randint(1, 3)
            if (target_in_save and saving and progressed) or (not target_in_save and progressed):
                process.send_signal(signal.SIGKILL)
                kills["in_save" if saving else "in_step"] += 1
                break
            time.sleep(0.0005)
        process.wait()
    assert kills["in_save"] >= 1 and kills["in_step"] >= 1, kills
    done = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _same(_final_weights(out), expected)
    assert json.loads((out / "eval.json").read_text())["steps"] == 24


def test_cli_exit_code_for_runtime_faults(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch, capsys):
    data, _ = uninterrupted
    _nan_at(monkeypatch, {2})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS)))
    assert cli(["train", str(recipe_file)]) == 2
    assert "non-finite value at step 2" in capsys.readouterr().err


def test_an_unwritable_model_folder_is_a_clear_error(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    import tuneforge.training.hooks as callbacks

    data, _ = uninterrupted
    real = callbacks.save_run_model
    calls = {"n": 0}

    def read_only(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second best model: the folder has become read-only
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(callbacks, "save_run_model", read_only)
    script_accuracy(monkeypatch, [0.5, 0.9])
    with pytest.raises(StorageError, match="Permission denied.*step-00000024 is intact"):
        finetune(text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS))
    assert verify_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000024") is None


def test_malformed_safetensors_are_clean_errors(tmp_path):
    import struct

    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, ' \
             b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}'
    overlapping = tmp_path / "overlap.safetensors"
    overlapping.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    oversized = tmp_path / "oversized.safetensors"
    oversized.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    for path in (overlapping, oversized):
        with pytest.raises(ModelError, match="not a valid safetensors file"):
            read_state_dict(path)


def _refit(folder, name: str, change) -> None:
    """Rewrite one file of a checkpoint with `change` applied, its recorded size made to match (as an attacker,
    or a checkpoint of another model copied in, would have it): it verifies as a file, not as this model's."""
    state = json.loads((folder / "state.json").read_text())
    change(folder / name)
    state["files"][name] = (folder / name).stat().st_size
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("misfit", ["weights", "optimizer"])
def test_a_checkpoint_that_does_not_fit_the_model_counts_as_damaged(tiny_bert_dir, uninterrupted, tmp_path,
                                                                    monkeypatch, misfit):
    from safetensors.torch import load_file, save_file

    recipe, expected, newest = _interrupted_after_step_8(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch)

    def other_head(path):  # a head for 3 classes: valid safetensors, the wrong model
        weights = load_file(str(path))
        weights["classifier.weight"] = torch.zeros(3, 32)
        save_file(weights, str(path))

    def fewer_groups(path):  # valid weights-only torch file, another optimizer
        state = torch.load(path, weights_only=True)
        state["param_groups"] = state["param_groups"][:1]
        torch.save(state, path)

    _refit(newest, "model.safetensors" if misfit == "weights" else "optimizer.pt",
           other_head if misfit == "weights" else fewer_groups)
    strict = {**recipe, "train": {**recipe["train"], "strict_resume": True}}
    with pytest.raises(ResumeError, match="do not fit the model|parameter groups"):
        finetune(strict, resume=True)
    resumed = finetune(recipe, resume=True)
    why = _records(resumed.run_dir, "skipped_checkpoint")[0]["why"]
    assert ("classifier.weight (3, 32) instead of (2, 32)" in why) if misfit == "weights" else "parameter groups" in why
    assert _records(resumed.run_dir, "resume")[-1]["step"] == 3
    assert _same(_final_weights(resumed.run_dir), expected)


def test_metrics_of_steps_redone_after_a_resume_appear_once(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    data, _ = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS)
    _interrupted_run(recipe, monkeypatch, 8)  # logged steps 2, 4, 6, 8; the newest checkpoint is at step 6
    resumed = finetune(recipe, resume=True)
    steps = [r["step"] for r in _records(resumed.run_dir, "train")]
    assert steps == sorted(set(steps)) and 8 in steps  # step 8 was logged twice: once by each attempt
    # step 8's record, and the first attempt's parameter and data summaries (the second writes its own)
    assert _records(resumed.run_dir, "resume")[-1]["dropped_records"] == 3
    assert len(_records(resumed.run_dir, "parameters")) == len(_records(resumed.run_dir, "data")) == 1
    evaluated = [r["step"] for r in _records(resumed.run_dir, "eval")]
    assert evaluated == sorted(set(evaluated))


def test_a_kill_while_a_step_is_saved_again_keeps_that_step(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch):
    """The same step is saved twice (a periodic save, then the epoch end): the first stays until the second is in
    place, so a kill between the two renames leaves it where resume finds it."""
    from tuneforge.training import checkpoint

    data, _ = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", **SETTINGS)
    _interrupted_run(recipe, monkeypatch, 6)  # checkpoints at steps 3 and 6
    folder = tmp_path / "run" / "checkpoints" / "step-00000006"
    first = (folder / "state.json").read_text()
    real_rename = os.rename

    def killed_before_the_new_one_lands(source, target):
        if str(source).endswith(".step-00000006.partial"):
            raise KeyboardInterrupt  # as a kill at this moment would: the old one moved aside, the new one not in place
        real_rename(source, target)

    monkeypatch.setattr(checkpoint.os, "rename", killed_before_the_new_one_lands)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(folder.parent, model, optimizer, scheduler, None, checkpoint.TrainState(step=6), keep=5)
    monkeypatch.undo()
    assert [c.name for c in complete_checkpoints(folder.parent)] == ["step-00000003", "step-00000006"]
    assert (folder / "state.json").read_text() == first
    # A kill after the new one landed but before the old one was removed: the old one goes, the new one stays.
    shutil.copytree(folder, folder.parent / ".step-00000006.old")
    assert [c.name for c in complete_checkpoints(folder.parent)] == ["step-00000003", "step-00000006"]
    assert not (folder.parent / ".step-00000006.old").exists() and (folder / "state.json").read_text() == first


@pytest.mark.parametrize("damage", ["rng-without-torch", "python-state", "scheduler-null", "epoch-text",
                                    "negative-step", "optimizer-list", "optimizer-without-state"])
def test_checkpoint_contents_that_parse_but_are_wrong_count_as_damaged(tiny_bert_dir, uninterrupted, tmp_path,
                                                                       monkeypatch, damage):
    from safetensors.torch import save_file

    recipe, expected, newest = _interrupted_after_step_8(tiny_bert_dir, uninterrupted, tmp_path, monkeypatch)

    def edit_state(**changes):
        def change(path):
            path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return change

    name, change = {
        "rng-without-torch": ("rng.safetensors", lambda path: save_file({"other": torch.zeros(2)}, str(path))),
        "python-state": ("state.json", edit_state(python="x")),
        "scheduler-null": ("state.json", edit_state(scheduler=None)),
        "epoch-text": ("state.json", edit_state(epoch="a")),
        "negative-step": ("state.json", edit_state(step=-5)),
        "optimizer-list": ("optimizer.pt", lambda path: torch.save([1, 2], path)),
        "optimizer-without-state": ("optimizer.pt", lambda path: torch.save({"param_groups": []}, path)),
    }[damage]
    if name == "state.json":
        change(newest / name)
    else:
        _refit(newest, name, change)
    resumed = finetune(recipe, resume=True)
    assert _records(resumed.run_dir, "skipped_checkpoint")[0]["path"] == "checkpoints/step-00000006"
    assert _records(resumed.run_dir, "resume")[-1]["step"] == 3
    assert _same(_final_weights(resumed.run_dir), expected)


def test_a_resume_without_a_usable_checkpoint_starts_the_records_afresh(tiny_bert_dir, uninterrupted, tmp_path,
                                                                        monkeypatch):
    data, _ = uninterrupted
    recipe = text_recipe(tiny_bert_dir, data, tmp_path / "run", **{**SETTINGS, "checkpoint_every_steps": 100})
    _interrupted_run(recipe, monkeypatch, 4)  # killed before any checkpoint
    resumed = finetune(recipe, resume=True)
    steps = [r["step"] for r in _records(resumed.run_dir, "train")]
    assert steps == sorted(set(steps))
    assert len(_records(resumed.run_dir, "parameters")) == len(_records(resumed.run_dir, "data")) == 1
    assert [r["step"] for r in _records(resumed.run_dir, "stage")] == [0]


def test_a_run_directory_left_by_a_kill_while_its_recipe_was_written_is_usable(tiny_bert_dir, uninterrupted,
                                                                                tmp_path):
    """recipe.yaml is written under a temporary name and renamed: a kill leaves only the temporary file, and the
    next start (without --overwrite) takes the folder as the empty one it was."""
    data, _ = uninterrupted
    run = tmp_path / "run"
    run.mkdir()
    (run / ".recipe.yaml.partial").write_text("model: {na")
    result = finetune(text_recipe(tiny_bert_dir, data, run, **{**SETTINGS, "epochs": 1}))
    assert (result.run_dir / "eval.json").is_file() and not (run / ".recipe.yaml.partial").exists()
