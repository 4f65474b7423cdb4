"""Model loading: Hugging Face folders, factory + weights files, head replacement, layer groups."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch
from torch import nn

from tuneforge.errors import ModelError
from tuneforge.models.groups import layer_groups
from tuneforge.api import load_model
from tuneforge.config import ImageSpec, ModelSpec
from tuneforge.models.weights import read_state_dict

IMAGE = ImageSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_hf_backbone_gets_a_new_head(tiny_bert_dir):
    loaded = load_model(ModelSpec(name=str(tiny_bert_dir), head_dropout=0.3), ["neg", "pos", "mixed"], IMAGE)
    model = loaded.model
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    assert model.config.classifier_dropout == 0.3
    assert loaded.report.new == ["classifier.bias", "classifier.weight"]
    assert "bert.embeddings.word_embeddings.weight" in loaded.report.loaded
    assert loaded.head_prefixes == ["classifier"]
    assert loaded.modality == "text"


def test_hf_pretrained_false_is_random(tiny_bert_dir):
    from safetensors.torch import load_file

    loaded = load_model(ModelSpec(name=str(tiny_bert_dir), pretrained=False), ["a", "b"], IMAGE)
    pretrained = load_file(str(tiny_bert_dir / "model.safetensors"))
    assert not torch.equal(loaded.model.bert.encoder.layer[0].attention.self.query.weight,
                           pretrained["encoder.layer.0.attention.self.query.weight"])
    assert loaded.report.loaded == []


def test_layer_groups_of_bert(tiny_bert_dir):
    loaded = load_model(ModelSpec(name=str(tiny_bert_dir)), ["a", "b"], IMAGE)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    assert [g.name for g in groups] == ["embeddings", "block.0", "block.1", "neck", "head"]
    assert groups[1].modules == ["bert.encoder.layer.0"]
    assert groups[-1].count == 32 * 2 + 2
    assert sum(g.count for g in groups) == sum(p.numel() for p in loaded.model.parameters())


def test_layer_groups_of_vit(tiny_vit_dir):
    loaded = load_model(ModelSpec(name=str(tiny_vit_dir)), ["a", "b"], IMAGE)
    assert loaded.modality == "image"
    names = [g.name for g in layer_groups(loaded.model, loaded.head_prefixes)]
    assert names[1:3] == ["block.0", "block.1"] and names[-1] == "head"


def _legacy_resnet_checkpoint(path):
    """A checkpoint shaped like the shared CIFAR ones: {'best_prec1', 'state_dict'} with 'module.' keys."""
    from examples.cifar_resnet import resnet20

    torch.manual_seed(1)
    net = resnet20()
    state = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"best_prec1": 91.7, "state_dict": state}, path)
    return net


def test_factory_with_legacy_weights_and_new_head(tmp_path):
    net = _legacy_resnet_checkpoint(tmp_path / "resnet.th")
    spec = ModelSpec(factory="examples.cifar_resnet:resnet20", weights=str(tmp_path / "resnet.th"),
                     weights_key="state_dict", strip_prefix=["module."])
    loaded = load_model(spec, ["ant", "bee"], IMAGE)
    model = loaded.model
    assert torch.equal(model.net.conv1.weight, net.conv1.weight)
    assert torch.equal(model.net.layer3[2].bn2.running_var, net.layer3[2].bn2.running_var)
    assert isinstance(model.net.linear, nn.Sequential) and model.net.linear[1].out_features == 2
    assert loaded.report.dropped == ["linear.bias", "linear.weight"]
    assert loaded.report.new == ["linear.1.bias", "linear.1.weight"]
    groups = layer_groups(model, loaded.head_prefixes)
    assert [g.name for g in groups] == ["stem"] + [f"block.{i}" for i in range(9)] + ["head"]
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 2)


def test_factory_keeping_the_pretrained_head(tmp_path):
    net = _legacy_resnet_checkpoint(tmp_path / "resnet.th")
    spec = ModelSpec(factory="examples.cifar_resnet:resnet20", weights=str(tmp_path / "resnet.th"),
                     strip_prefix=["module."], new_head=False)
    loaded = load_model(spec, [str(i) for i in range(10)], IMAGE)
    x = torch.randn(2, 3, 32, 32)
    net.eval(), loaded.model.eval()
    assert torch.equal(loaded.model(pixel_values=x).logits, net(x))
    assert loaded.report.dropped == [] and loaded.report.new == []


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    from examples.cifar_resnet import resnet20

    net = resnet20()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    state = read_state_dict(tmp_path / "w.safetensors")
    assert torch.equal(state["conv1.weight"], net.conv1.weight)


class _Marker:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Marker.path),))


def test_pickle_that_runs_code_is_refused(tmp_path):
    _Marker.path = str(tmp_path / "pwned")
    with open(tmp_path / "evil.pt", "wb") as file:
        pickle.dump({"state_dict": _Marker()}, file)
    with pytest.raises(ModelError, match="refused"):
        read_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


class _RunsShell:
    """Unpickling this would run a shell command; pickling it (torch.save) runs nothing."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _save_legacy(obj, path) -> None:
    """torch.save's pre-zip format: five pickles in a row (magic number, version, system info, the object,
    storage keys), then the tensors' raw bytes."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def test_hostile_legacy_torch_file_is_refused_for_needing_code(tmp_path):
    marker = tmp_path / "pwned"
    _save_legacy({"state_dict": {"weight": torch.ones(2, 2)}, "hook": _RunsShell(f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(ModelError) as refused:
        read_state_dict(tmp_path / "evil.pt", key="state_dict")
    message = str(refused.value)
    assert "needs arbitrary code" in message and "allow_unsafe_pickle" in message and "damaged" not in message
    assert not marker.exists()


def test_legacy_torch_file_with_a_namespace_loads_only_when_allowed(tmp_path):
    # A common training checkpoint: the weights-only loader refuses the argparse.Namespace beside the state dict.
    state = {"linear.weight": torch.randn(3, 2), "linear.bias": torch.randn(3)}
    _save_legacy({"state_dict": state, "args": argparse.Namespace(lr=0.1, epochs=3)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ModelError) as refused:
        read_state_dict(tmp_path / "checkpoint.pt", key="state_dict")
    message = str(refused.value)
    assert "needs arbitrary code" in message and "allow_unsafe_pickle" in message and "damaged" not in message
    with pytest.warns(UserWarning, match="allow_unsafe_pickle"):
        loaded = read_state_dict(tmp_path / "checkpoint.pt", key="state_dict", allow_unsafe_pickle=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[name], state[name]) for name in state)


def test_corrupt_safetensors_is_a_clean_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    with pytest.raises(ModelError, match="not a valid safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_bad_factory_reference():
    with pytest.raises(ModelError, match="cannot import"):
        load_model(ModelSpec(factory="no_such_module:make", pretrained=False), ["a", "b"], IMAGE)


def test_inspect_prints_groups(tiny_bert_dir, capsys):
    from tuneforge.cli import main

    assert main(["inspect", str(tiny_bert_dir)]) == 0
    out = capsys.readouterr().out
    for name in ("embeddings", "block.0", "block.1", "neck", "head", "total"):
        assert name in out
