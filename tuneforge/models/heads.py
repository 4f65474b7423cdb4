"""New heads: what replaces a pretrained classifier, and where a model's head is."""

from __future__ import annotations

from torch import nn

from tuneforge.errors import ModelError


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ModelError([f"model.head {path!r}: no such module; modules are: {', '.join(n for n, _ in model.named_children())}"]) from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def last_linear(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(["the factory model has no nn.Linear classifier; name its head with model.head"])
    return names[-1]


def new_classifier(in_features: int, num_labels: int, dropout: float, hidden: int | None = None) -> nn.Sequential:
    """Dropout + linear layer, or with `hidden` a small MLP head (for feature extraction)."""
    if hidden is None:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_labels))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(hidden, num_labels))


def hf_head_prefixes(model: nn.Module) -> list[str]:
    # Whatever sits beside the base model (bert, vit, ...) with parameters is the task head.
    base = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children() if name != base and any(True for _ in child.parameters())]


def add_head_dropout(model: nn.Module, head_prefixes: list[str], p: float) -> None:
    """Dropout on the head's input for architectures whose config has no classifier_dropout.

    A pre-hook adds no parameters, so the exported folder stays loadable by transformers.
    """
    if p <= 0 or not head_prefixes:
        return
    head = model.get_submodule(head_prefixes[0])
    head.register_forward_pre_hook(lambda module, args: (nn.functional.dropout(args[0], p, module.training), *args[1:]))
