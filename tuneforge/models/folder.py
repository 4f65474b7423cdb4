"""A model folder's weights: written as a Hugging Face folder, read back with every weight checked.

What the folder says about the model (tuneforge.json) is artifacts.ModelInfo; which class the weights load
as is the task's to say (`SavedKind`, which every task class is). A folder is data from anyone: nothing
named in it is imported or called, and a damaged one is a ModelError, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors_into
from torch import nn

from tuneforge.config import AdapterSpec, ImageSpec, ModelSpec
from tuneforge.errors import ModelError, TuneforgeError, first_line
from tuneforge.models.adapters import ADAPTER_CONFIG, ADAPTER_FILE, apply_adapter
from tuneforge.models.factory import FACTORY_CONFIG_KEY, Factory, FactoryClassifier, build_factory_model, trusted_factory
from tuneforge.models.loading import NO_REMOTE_CODE, LoadedModel, LoadReport, load_tokenizer, quiet_transformers
from tuneforge.models.weights import misfit, safetensors_shapes, weights_fit


class SavedKind(Protocol):
    """What loading a saved folder asks of its task (a task class)."""

    def load_model(self, model_spec, labels: list[str], image_spec, factory=None) -> LoadedModel: ...
    def saved_class(self, folder: Path) -> tuple[type, str]: ...  # the transformers class, and the input modality
    def saved_processor(self, folder: Path, modality: str): ...
    def head_of(self, model: nn.Module) -> list[str]: ...


def save_model_folder(loaded: LoadedModel, folder: Path, labels: list[str], trained: set[str] | None = None) -> None:
    """Write a Hugging Face-style folder: safetensors weights, config with the label map, preprocessor.

    With an adapter (loaded.base set), the weights are only what differs from the pretrained base:
    the parameters in `trained` (adapter and head) and the buffers, in adapter_model.safetensors,
    with adapter_config.json saying how to rebuild the base; load_model_folder puts them together.
    """
    quiet_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    if loaded.base is not None:
        buffers = {name for name, _ in model.named_buffers()}
        delta = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
                 if name in buffers or name in (trained or set())}
        save_file(delta, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(loaded.base, indent=2))
    if loaded.factory is None:
        if loaded.base is not None:
            model.config.save_pretrained(folder)
        else:
            model.save_pretrained(folder)
    else:
        if loaded.base is None:
            save_model(model.net, str(folder / "model.safetensors"))
        config = {FACTORY_CONFIG_KEY: loaded.factory, "num_labels": len(labels),
                  "id2label": {str(i): label for i, label in enumerate(labels)},
                  "label2id": {label: i for i, label in enumerate(labels)}}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    loaded.preprocessor.save_pretrained(folder)


def load_adapter_folder(folder: Path, labels: list[str], kind: SavedKind, factory: str | Factory | None = None) -> LoadedModel:
    """Rebuild the pretrained base named in adapter_config.json, attach the adapter, load the saved delta.

    The base is named by the folder, which is data: its settings that could run code (remote code, full
    pickle) are never taken from it, and a factory base needs the user's trusted `factory`."""
    base = json.loads((folder / ADAPTER_CONFIG).read_text())
    spec = ModelSpec(**{**base["model"], "trust_remote_code": False, "allow_unsafe_pickle": False})
    function = trusted_factory(spec.factory, factory, folder) if spec.factory else None
    try:
        loaded = kind.load_model(spec, labels, ImageSpec(**base["image"]), function)
    except ModelError as error:
        raise ModelError([f"{folder} holds an adapter over {spec.name or spec.factory}, which must be available to load "
                          f"it: {error.problems[0]}"]) from None
    apply_adapter(loaded, AdapterSpec(**base["adapter"]), spec, ImageSpec(**base["image"]))
    delta = load_file(str(folder / ADAPTER_FILE))
    own = loaded.model.state_dict()
    head = [name for name, _ in loaded.model.named_parameters()
            if any(name.startswith(prefix + ".") for prefix in loaded.head_prefixes)]
    # A head left at its random initialisation would predict noise: every head weight must be in the file.
    problem = weights_fit({k: own[k].shape for k in head}, {k: v.shape for k, v in delta.items()},
                          allowed={k: v.shape for k, v in own.items()})
    if problem:
        raise ModelError([f"{folder / ADAPTER_FILE} does not fit the rebuilt model: {problem}"])
    loaded.model.load_state_dict(delta, strict=False)
    loaded.report = LoadReport()
    return loaded


def load_model_folder(folder: Path, kind: SavedKind, factory: str | Factory | None = None) -> tuple[LoadedModel, list[str]]:
    """Reload a folder written by save_model_folder as `kind` (its task) says; returns the model and its labels
    (class order). Every weight of the model must come from its files with its shape."""
    try:
        return _load(folder, kind, factory)
    except TuneforgeError:
        raise
    except Exception as error:  # damaged JSON, weights or tokenizer files: transformers and safetensors raise many kinds
        raise ModelError([f"{folder}: cannot load the model ({type(error).__name__}: {first_line(error)}); the folder "
                          "is damaged or incomplete: export or train it again"]) from None


def _load(folder: Path, kind: SavedKind, factory: str | Factory | None) -> tuple[LoadedModel, list[str]]:
    quiet_transformers()
    config = json.loads((folder / "config.json").read_text())
    names = config.get("id2label", {})  # text generators save none: they have no classes
    labels = [names[str(i)] for i in range(len(names))]
    adapter = (folder / ADAPTER_CONFIG).is_file()
    weights = folder / (ADAPTER_FILE if adapter else "model.safetensors")
    if not weights.is_file() or weights.stat().st_size == 0:
        raise ModelError([f"{folder}: {weights.name} is {'empty' if weights.is_file() else 'missing'}; the folder is "
                          "incomplete: export or train it again"])
    if adapter:
        loaded = load_adapter_folder(folder, labels, kind, factory)
        if loaded.modality == "text":  # the saved tokenizer, in case the base's differs
            loaded.preprocessor = kind.saved_processor(folder, "text")
        return loaded, labels
    if FACTORY_CONFIG_KEY in config:
        saved = config[FACTORY_CONFIG_KEY]
        model = build_factory_model(saved, len(labels), trusted_factory(saved["factory"], factory, folder))
        problem = weights_fit({k: v.shape for k, v in model.net.state_dict().items()}, safetensors_shapes(weights))
        if problem:
            raise ModelError([f"{weights} does not fit the model its folder describes: {problem}"])
        load_safetensors_into(model.net, str(weights))
        processor = kind.saved_processor(folder, "image")
        return LoadedModel(model, processor, "image", [f"net.{saved['head']}"], LoadReport(), saved), labels
    auto_class, modality = kind.saved_class(folder)
    # Mismatched shapes are reported below, by name, instead of transformers' own error.
    model, loading = auto_class.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True,
                                                **NO_REMOTE_CODE)
    problem = misfit(sorted(loading["missing_keys"]), [f"{key} {tuple(found)} instead of {tuple(wanted)}" for key, found,
                     wanted in loading.get("mismatched_keys", [])], sorted(loading["unexpected_keys"]))
    problem = problem or _bad_values(model, weights)
    if problem:  # transformers would start those weights at random and predict noise without a word
        raise ModelError([f"{weights} does not fit the model its folder describes: {problem}"])
    return LoadedModel(model, kind.saved_processor(folder, modality), modality, kind.head_of(model), LoadReport()), labels


def _bad_values(model: nn.Module, weights: Path) -> str | None:
    """Weights that loaded but cannot be the trained ones: whole numbers where the model computes in floating
    point (a cast file), or NaN and infinite values."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as file:
        cast = sorted(key for key in file.keys()
                      if not file.get_slice(key).get_dtype().startswith(("F", "BF")) and "num_batches" not in key)
    parameters = {name for name, _ in model.named_parameters()}
    cast = [key for key in cast if key in parameters]
    if cast:
        return f"whole-number tensors where the model has floating-point weights: {', '.join(cast[:5])}"
    broken = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and
              not bool(torch.isfinite(tensor).all())]
    return f"NaN or infinite values in {', '.join(broken[:5])}" if broken else None


def saved_tokenizer(folder: Path):
    """The tokenizer saved beside a model, checked as a pretrained one is (load_tokenizer)."""
    from transformers import AutoConfig

    return load_tokenizer(str(folder), str(folder), AutoConfig.from_pretrained(folder, **NO_REMOTE_CODE), NO_REMOTE_CODE)


def saved_image_processor(folder: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder, backend="pil", **NO_REMOTE_CODE)


def restore_saved_weights(model: nn.Module, folder: Path) -> None:
    """Put the weights that save_model_folder wrote back into the same `model` (the run's best, after training)."""
    if (folder / ADAPTER_FILE).is_file():  # the rest is the pretrained base, which training did not change
        model.load_state_dict(load_file(str(folder / ADAPTER_FILE)), strict=False)
    elif isinstance(model, FactoryClassifier):  # the network's own weights, as save_model_folder wrote them
        load_safetensors_into(model.net, str(folder / "model.safetensors"))
    else:
        model.load_state_dict(type(model).from_pretrained(folder, **NO_REMOTE_CODE).state_dict())
