"""Factory models: a user's plain PyTorch network ('module:function' or 'path/to/file.py:function') with a
weights file read without pickle, wrapped so the loop can call it like a Hugging Face model.

The factory is code, so only the user names it: in the recipe they train with, or with --trust-factory /
tuneforge.load(path, factory=...) when a saved folder is loaded. A folder's own record of its factory
is only compared with the user's; it is never imported.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ModelError, first_line
from tuneforge.models.heads import get_module, last_linear, new_classifier, set_module
from tuneforge.models.loading import LoadedModel, LoadReport, make_image_processor
from tuneforge.models.weights import read_state_dict

FACTORY_CONFIG_KEY = "tuneforge_factory"  # where a saved factory model's config.json records how to rebuild it


class FactoryClassifier(nn.Module):
    """Gives a plain PyTorch module the keyword interface the loop uses: model(pixel_values=...).logits."""

    base_model_prefix = "net"  # as in transformers: where the pretrained network sits

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, **_) -> FactoryOutput:
        return FactoryOutput(self.net(pixel_values))


@dataclass
class FactoryOutput:
    logits: torch.Tensor


Factory = Callable[..., nn.Module]


def import_factory(reference: str, setting: str = "model.factory") -> Factory:
    """The function a user named (in `setting`): 'package.module:function', imported from sys.path as it is
    (tuneforge never adds to it), or 'path/to/file.py:function', that file loaded by its path (relative to the
    working directory)."""
    module_name, _, function_name = reference.rpartition(":")
    try:
        module = _module_from_file(Path(module_name).expanduser()) if module_name.endswith(".py") else \
            importlib.import_module(module_name)
    except ModelError:
        raise
    except Exception as error:  # ImportError, or whatever the user's module raises while it is imported
        raise ModelError([f"{setting} {reference!r}: cannot import {module_name!r} ({type(error).__name__}: "
                          f"{first_line(error)}); a module is found on the Python path (PYTHONPATH), a file by "
                          "its path: path/to/file.py:function"]) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ModelError([f"{setting} {reference!r}: {module_name} has no function {function_name!r}"])
    return factory


def _module_from_file(path: Path):
    if not path.is_file():
        raise ModelError([f"factory file {path} does not exist (give 'path/to/file.py:function' or "
                          "'package.module:function')"])
    path = path.resolve()
    name = f"tuneforge_factory_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _factory_name(reference: str) -> tuple[str, str]:
    """(module name without its package or folder, function name): what must match between a folder and the user."""
    module, _, function = reference.rpartition(":")
    return (Path(module).stem if module.endswith(".py") else module.rpartition(".")[2]), function


def trusted_factory(saved: str, trusted: str | Factory | None, folder: Path) -> Factory:
    """The factory a saved folder was built with, only if the user named it: a folder is data, and loading
    it must never import or call anything written inside it. The user's name must match the folder's by
    module and function name (its package or path may differ, so a model loads from anywhere)."""
    if trusted is None:
        raise ModelError([f"{folder} was built by the factory {saved!r}, and tuneforge never runs code named inside a "
                          f"model folder. If you trust that function, name it yourself: --trust-factory "
                          f"MODULE:FUNCTION or path/to/file.py:FUNCTION (Python: tuneforge.load(path, factory=...))"])
    if callable(trusted):
        matches = getattr(trusted, "__name__", None) == _factory_name(saved)[1]
        given = getattr(trusted, "__qualname__", repr(trusted))
    else:
        matches, given = _factory_name(trusted) == _factory_name(saved), trusted
    if not matches:
        raise ModelError([f"{folder} was built by the factory {saved!r}, not by {given!r} (the trusted factory); "
                          "name the factory the folder was built with"])
    return trusted if callable(trusted) else import_factory(trusted, "--trust-factory")


def _call_factory(factory: Factory, reference: str, kwargs: dict) -> nn.Module:
    try:
        net = factory(**kwargs)
    except Exception as error:  # the user's code: report it with what it was called with
        raise ModelError([f"model.factory {reference!r} failed when called with model.factory_kwargs {kwargs}: "
                          f"{type(error).__name__}: {first_line(error)}"]) from None
    if not isinstance(net, nn.Module):
        raise ModelError([f"model.factory {reference!r} returned {type(net).__name__}, not a torch.nn.Module"])
    return net


def attach_head(net: nn.Module, head: str, num_labels: int, dropout: float, hidden: int | None = None) -> None:
    old = get_module(net, head)
    if not isinstance(old, nn.Linear):
        raise ModelError([f"model.head {head!r} is a {type(old).__name__}; the head to replace must be an nn.Linear"])
    set_module(net, head, new_classifier(old.in_features, num_labels, dropout, hidden))


def build_factory_model(factory: dict, num_labels: int, function: Factory) -> FactoryClassifier:
    """Rebuild a saved factory model's architecture with the user's trusted `function` (weights are loaded
    by the caller)."""
    net = _call_factory(function, factory["factory"], factory.get("factory_kwargs", {}))
    if factory.get("new_head", True):
        attach_head(net, factory["head"], num_labels, factory.get("head_dropout", 0.0), factory.get("head_hidden"))
    return FactoryClassifier(net)


def load_factory_model(spec, labels: list[str], image_spec, function: Factory | None = None) -> LoadedModel:
    """A factory model with a new head. `function`: the factory already resolved (a trusted one, when an adapter
    folder rebuilds its base); else the recipe's model.factory, which the user named, is imported."""
    if image_spec.size is None:
        raise ModelError(["a factory model needs data.image.size (and usually data.image.mean / std) for its preprocessing"])
    net = _call_factory(function or import_factory(spec.factory), spec.factory, spec.factory_kwargs)
    own = net.state_dict()
    report = LoadReport(new=sorted(own))
    if spec.pretrained:
        if not spec.weights:
            raise ModelError(["model.factory needs model.weights (or model.pretrained: false for a random start)"])
        state = read_state_dict(spec.weights, key=spec.weights_key, strip_prefix=spec.strip_prefix,
                                allow_unsafe_pickle=spec.allow_unsafe_pickle)
        fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if not fits:
            raise ModelError([f"model.weights {spec.weights}: none of its {len(state)} tensors fit the network "
                              f"(its keys look like {list(state)[:3]}, the network's like {list(own)[:3]}); "
                              "set model.strip_prefix or model.weights_key"])
        net.load_state_dict(fits, strict=False)
        # Older checkpoints lack BatchNorm's step counters; those are bookkeeping, not weights.
        absent = {k for k in set(own) - set(fits) if not k.endswith("num_batches_tracked")}
        report = LoadReport(sorted(fits), sorted(absent), sorted(set(state) - set(fits)))

    head = spec.head or last_linear(net)
    hidden = spec.freeze.head_hidden
    if spec.new_head:
        attach_head(net, head, len(labels), spec.head_dropout, hidden)
        in_head = lambda key: key.startswith(head + ".")
        report.dropped = sorted(report.dropped + [k for k in report.loaded if in_head(k)])
        report.loaded = [k for k in report.loaded if not in_head(k)]
        report.new = sorted([k for k in report.new if not in_head(k)] + [k for k in net.state_dict() if in_head(k)])
    elif getattr(get_module(net, head), "out_features", len(labels)) != len(labels):
        raise ModelError([f"model.new_head is false but {head} has {get_module(net, head).out_features} outputs "
                          f"for {len(labels)} labels; set model.new_head: true"])
    factory = {"factory": spec.factory, "factory_kwargs": spec.factory_kwargs, "head": head,
               "new_head": spec.new_head, "head_dropout": spec.head_dropout, "head_hidden": hidden}
    return LoadedModel(FactoryClassifier(net), make_image_processor(image_spec), "image",
                       [f"net.{head}"] if spec.new_head else [], report, factory)
