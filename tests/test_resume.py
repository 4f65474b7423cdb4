"""Checkpoints and resume: a run stopped mid-epoch and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupt_after, text_recipe
from safetensors.torch import load_file

from tuneforge import finetune
from tuneforge.training.checkpoint import FROZEN_FILE, checkpoint_weights, complete_checkpoints, verify_checkpoint
from tuneforge.errors import ResumeError


def _tensors(folder):
    return checkpoint_weights(folder)


def test_resume_mid_epoch_is_bit_identical(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    # 96 examples / batch 8 = 12 steps an epoch; dropout is on, so the RNG state must be restored too.
    settings = {"epochs": 2, "checkpoint_every_steps": 3, "keep_checkpoints": 10}
    uninterrupted = finetune(text_recipe(tiny_bert_dir, text_data, tmp_path / "a", **settings))

    interrupt_after(monkeypatch, 8)  # last checkpoint at step 6: epoch 0, batch 6 of 12
    with pytest.raises(KeyboardInterrupt):
        finetune(text_recipe(tiny_bert_dir, text_data, tmp_path / "b", **settings))
    monkeypatch.undo()
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000003", "step-00000006"]
    resumed = finetune(text_recipe(tiny_bert_dir, text_data, tmp_path / "b", **settings), resume=True)

    final_a = complete_checkpoints(uninterrupted.run_dir / "checkpoints")[-1]
    final_b = complete_checkpoints(resumed.run_dir / "checkpoints")[-1]
    assert final_a.name == final_b.name == "step-00000024"
    a, b = _tensors(final_a), _tensors(final_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Optimizer moments too, not only the weights.
    opt_a = torch.load(final_a / "optimizer.pt", weights_only=True)["state"]
    opt_b = torch.load(final_b / "optimizer.pt", weights_only=True)["state"]
    for index in opt_a:
        assert torch.equal(opt_a[index]["exp_avg"], opt_b[index]["exp_avg"])
    assert resumed.metrics["accuracy"] == uninterrupted.metrics["accuracy"]
    records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"type": "resume", "step": 6} .items() <= next(r for r in records if r["type"] == "resume").items()


def test_checkpoint_holds_every_piece_of_state(tiny_bert_dir, text_data, tmp_path):
    result = finetune(text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=1))
    folder = complete_checkpoints(result.run_dir / "checkpoints")[-1]
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"]
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 12 and state["epoch"] == 1 and state["batch_in_epoch"] == 0
    for key in ("scheduler", "python", "numpy", "best_metric"):
        assert key in state
    assert "torch" in load_file(str(folder / "rng.safetensors"))
    assert not list((result.run_dir / "checkpoints").glob(".*partial"))  # nothing half-written left behind


def test_keep_checkpoints_rotates(tiny_bert_dir, text_data, tmp_path):
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=1, checkpoint_every_steps=2, keep_checkpoints=2)
    result = finetune(recipe)
    assert [p.name for p in complete_checkpoints(result.run_dir / "checkpoints")] == ["step-00000010", "step-00000012"]


def test_resume_refuses_a_different_model(tiny_bert_dir, tiny_vit_dir, text_data, tmp_path, monkeypatch):
    recipe = text_recipe(tiny_bert_dir, text_data, tmp_path / "run", epochs=1, checkpoint_every_steps=2)
    interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe)
    monkeypatch.undo()
    changed = text_recipe(tiny_vit_dir, text_data, tmp_path / "run", epochs=1, checkpoint_every_steps=2)
    with pytest.raises(ResumeError, match="model.name"):
        finetune(changed, resume=True)


def test_frozen_weights_are_written_once_and_resume_exactly(tiny_bert_dir, text_data, tmp_path, monkeypatch):
    # partial: embeddings and block 0 are frozen in every stage, so they go to frozen.safetensors,
    # written by the first checkpoint and hard-linked (same inode) into every later one.
    settings = {"epochs": 2, "checkpoint_every_steps": 3, "keep_checkpoints": 10}
    freeze = {"strategy": "partial", "trainable_blocks": 1}

    def recipe(name):
        return text_recipe(tiny_bert_dir, text_data, tmp_path / name, freeze, **settings)

    uninterrupted = finetune(recipe("a"))
    folders = complete_checkpoints(uninterrupted.run_dir / "checkpoints")
    inodes = {(f / FROZEN_FILE).stat().st_ino for f in folders}
    assert len(folders) == 8 and len(inodes) == 1
    frozen = set(load_file(str(folders[0] / FROZEN_FILE)))
    assert "bert.embeddings.word_embeddings.weight" in frozen and "bert.encoder.layer.0.output.dense.weight" in frozen
    assert not any(name.startswith(("bert.encoder.layer.1", "classifier")) for name in frozen)
    assert not frozen & set(load_file(str(folders[-1] / "model.safetensors")))
    final_model = load_file(str(uninterrupted.run_dir / "model" / "model.safetensors"))
    assert len(checkpoint_weights(folders[-1])) == len(final_model)

    interrupt_after(monkeypatch, 8)  # checkpoints at steps 3 and 6
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe("b"))
    monkeypatch.undo()
    newest = complete_checkpoints(tmp_path / "b" / "checkpoints")[-1]
    (newest / FROZEN_FILE).unlink()  # a damaged checkpoint: resume must see it and fall back to step 3
    assert "frozen.safetensors is missing" in verify_checkpoint(newest)
    resumed = finetune(recipe("b"), resume=True)
    a, b = _tensors(folders[-1]), _tensors(complete_checkpoints(resumed.run_dir / "checkpoints")[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # After the resume, the first checkpoint wrote frozen.safetensors anew; the later ones link to it.
    assert len({(f / FROZEN_FILE).stat().st_ino for f in complete_checkpoints(resumed.run_dir / "checkpoints")
                if f.name > "step-00000003"}) == 1
