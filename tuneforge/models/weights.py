"""Read weight files without executing code from them.

safetensors is plain data. Legacy torch files go through torch.load(weights_only=True),
whose unpickler only rebuilds tensors and plain containers; anything else is refused.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from tuneforge.errors import ModelError, first_line


def read_state_dict(path: str | Path, key: str | None = None, strip_prefix: list[str] | tuple = (),
                    allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
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
        state = _read_torch_file(path, allow_unsafe_pickle)
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


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive; the legacy format starts with a pickle protocol byte."""
    with open(path, "rb") as file:
        head = file.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


def _read_torch_file(path: Path, allow_unsafe_pickle: bool):
    if path.stat().st_size == 0:
        raise ModelError([f"{path}: the weights file is empty"])
    if not _looks_like_torch_file(path):
        raise ModelError([f"{path}: not a torch weights file (nor safetensors); it may be damaged"])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not _pickle_calls_code(path):  # plain data the weights-only loader does not take: not a weights file
            raise ModelError([f"{path}: cannot read as a torch weights file: it was not written by torch.save, "
                              "or it is damaged"]) from None
        if not allow_unsafe_pickle:
            raise ModelError([f"{path}: refused to load: the file needs arbitrary code to unpickle, which could run "
                              f"anything on this machine ({first_line(error)}). Convert it to safetensors, "
                              "or, only for a file you trust, set model.allow_unsafe_pickle: true"]) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ModelError([f"{path}: cannot read as a torch weights file ({first_line(error)})"]) from None
    # Reached only with the user's explicit model.allow_unsafe_pickle: true, after the safe load refused.
    warnings.warn(f"{path}: loading with full pickle (model.allow_unsafe_pickle): this can run code", stacklevel=3)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # an unpickler given garbage raises almost anything
        raise ModelError([f"{path}: cannot read as a torch weights file ({first_line(error)})"]) from None


CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}
# torch.save's legacy (pre-zip) format writes this many pickles in a row: magic number, protocol version, system
# info, the object, the storage keys. The tensors' raw bytes follow; they are not pickle opcodes.
LEGACY_PICKLES = 5


def _pickle_calls_code(path: Path) -> bool:
    """Whether any pickle of a torch file imports or calls anything.

    pickletools only reads the opcodes; nothing is executed.
    """
    try:
        return any(op.name in CODE_OPCODES for op, _, _ in _opcodes(path))
    except Exception:  # not even a readable pickle (found before any code opcode)
        return False


def _opcodes(path: Path):
    """Every opcode of every pickle in a torch file: the .pkl members of torch.save's zip, or each pickle of the
    legacy format. Scanning only the first legacy pickle (the magic number) would miss the object itself."""
    import pickletools

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".pkl"):
                    yield from pickletools.genops(archive.read(name))
        return
    size = path.stat().st_size
    with open(path, "rb") as file:
        for _ in range(LEGACY_PICKLES):
            if file.tell() == size:  # a file from plain pickle.dump holds one pickle
                return
            yield from pickletools.genops(file)  # reads up to this pickle's STOP, where the next one begins


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from a safetensors file's header (the data is not read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


def weights_fit(required: dict, found: dict, allowed: dict | None = None) -> str | None:
    """Why tensors `found` (name -> shape) do not fit a model, or None: a `required` weight absent, a weight of
    another shape, or a name outside `allowed` (name -> shape; default: the required ones)."""
    allowed = required if allowed is None else allowed
    wrong = [f"{key} {tuple(found[key])} instead of {tuple(allowed[key])}" for key in sorted(set(found) & set(allowed))
             if tuple(found[key]) != tuple(allowed[key])]
    return misfit(missing=sorted(set(required) - set(found)), wrong=wrong, unexpected=sorted(set(found) - set(allowed)))


def misfit(missing: list[str], wrong: list[str], unexpected: list[str]) -> str | None:
    """One line naming what does not fit (a few names of each kind), or None when nothing is wrong."""
    def show(keys: list[str]) -> str:
        keys = sorted(keys)  # the same message whatever order the loader reported them in
        return ", ".join(keys[:5]) + (f" … (+{len(keys) - 5})" if len(keys) > 5 else "")

    parts = [f"{what} {len(keys)}: {show(keys)}" for what, keys in
             (("missing", missing), ("wrong shape", wrong), ("unexpected", unexpected)) if keys]
    return "; ".join(parts) or None
