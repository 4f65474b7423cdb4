"""Read weight files without executing code from them.

safetensors is plain data. Legacy torch files go through torch.load(weights_only=True),
whose unpickler only rebuilds tensors and plain containers; anything else is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from tuneforge.errors import ModelError


def read_state_dict(path: str | Path, key: str | None = None, strip_prefix: list[str] | tuple = ()) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError([f"weights file {path} does not exist (model.weights)"])
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelError([f"{path}: not a valid safetensors file ({error})"]) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ModelError([f"{path}: refused to load: the file needs arbitrary code to unpickle, which could run "
                              f"anything on this machine ({str(error).splitlines()[0]}). Convert it to safetensors "
                              "where you trust its origin"]) from None
        except (RuntimeError, EOFError, OSError) as error:
            raise ModelError([f"{path}: cannot read as a torch weights file ({str(error).splitlines()[0]})"]) from None
    state = _unwrap(state, key, path)
    for prefix in strip_prefix:
        state = {(k.removeprefix(prefix)): v for k, v in state.items()}
    return state


def _unwrap(state, key: str | None, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint such as {'state_dict': ..., 'best_prec1': ...}."""
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            found = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise ModelError([f"{path}: no key {key!r} (model.weights_key); top-level keys: {found}"])
        state = state[key]
    elif isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = [k for k, v in state.items() if isinstance(v, dict)]
        if len(nested) == 1:
            state = state[nested[0]]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError([f"{path}: does not hold a state dict of tensors; name it with model.weights_key"])
    return state
