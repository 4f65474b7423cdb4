"""Checkpoints that a crash cannot corrupt, and that resume a run exactly.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  model.safetensors   the model weights (no pickle), except those in frozen.safetensors
  frozen.safetensors  (when the plan freezes something in every stage) the weights no stage trains:
                      written by the run's first checkpoint, hard-linked into every later one
  optimizer.pt        optimizer state, read back with torch.load(weights_only=True)
  rng.safetensors     torch (and CUDA) generator states
  state.json          step, epoch, data position, scheduler, grad scaler, Python/NumPy RNG, best metric
It is written under a temporary name, fsynced, then renamed into place: a folder
with the final name is always complete. state.json is written last.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from tuneforge.errors import StorageError
from tuneforge.models.weights import misfit

PREFIX = "step-"
FROZEN_FILE = "frozen.safetensors"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already trained on
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0  # for early stopping
    stopped_early: bool = False
    skipped_steps: int = 0  # fp16 steps skipped for inf/NaN gradients
    plateau: dict | None = None  # reduce-on-plateau state (PlateauState.state_dict())
    nonfinite_skipped: int = 0  # steps skipped for a NaN/Inf loss or gradient (train.nonfinite: skip)
    nonfinite_in_row: int = 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{index}"] = state
    return states


def _python_rng() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)]}


def _storage(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def _write_weights(model, folder: Path, frozen: set[str], reuse: Path | None) -> None:
    """model.safetensors, plus frozen.safetensors for the parameters named in `frozen`.

    `reuse` is a frozen.safetensors this process wrote earlier for the same names: the frozen
    weights cannot have changed since, so it is hard-linked instead of written again (a frozen
    backbone then costs one write per run, not one per checkpoint, in time and in disk).
    """
    if not frozen:
        save_model(model, str(folder / "model.safetensors"))
        return
    state = model.state_dict()
    shared = Counter(_storage(t) for t in state.values())
    # A frozen weight tied to another (input and output embeddings) stays with the other in model.safetensors.
    fixed = sorted(n for n in frozen if n in state and shared[_storage(state[n])] == 1)
    rest, seen = {}, set()
    for name, tensor in state.items():
        if name not in fixed and _storage(tensor) not in seen:  # tied weights are stored once; loading re-ties them
            seen.add(_storage(tensor))
            rest[name] = tensor.contiguous()
    save_file(rest, str(folder / "model.safetensors"), metadata={"format": "pt"})
    target = folder / FROZEN_FILE
    if reuse is not None and reuse.is_file():
        try:
            os.link(reuse, target)
            return
        except OSError:  # a filesystem without hard links: write the file
            pass
    save_file({n: state[n].contiguous() for n in fixed}, str(target), metadata={"format": "pt"})


def save_checkpoint(directory: Path, model, optimizer, scheduler, scaler, state: TrainState, keep: int,
                    protect: set[int] = frozenset(), frozen: set[str] = frozenset(),
                    reuse_frozen: Path | None = None) -> Path:
    """Write a checkpoint atomically; returns its folder.

    Older checkpoints beyond `keep` are removed only once the new one is complete, and
    never those whose step is in `protect` (the best one). A failed write (disk full,
    read-only folder) removes its partial folder and raises StorageError; the previous
    checkpoints stay as they were. `frozen` names parameters that no stage trains, and
    `reuse_frozen` an earlier checkpoint's frozen.safetensors to link (see _write_weights).
    """
    final = directory / f"{PREFIX}{state.step:08d}"
    partial = directory / f".{final.name}.partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _write_weights(model, partial, frozen, reuse_frozen)
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        save_file({k: v.contiguous() for k, v in _rng_tensors().items()}, str(partial / "rng.safetensors"))
        files = {f.name: f.stat().st_size for f in partial.iterdir()}
        record = {**asdict(state), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict() if scaler is not None else None, **_python_rng(), "files": files}
        (partial / "state.json").write_text(json.dumps(record))  # written last: its presence marks completeness
        for file in partial.iterdir():
            _fsync(file)
        _fsync(partial)
        replaced = final.with_name(f".{final.name}.old")
        if final.exists():  # the same step saved again (e.g. epoch end right after a periodic save)
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)  # kept until the new one is in place: a kill here loses nothing
        os.rename(partial, final)
        _fsync(directory)
        shutil.rmtree(replaced, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise storage_error(final, error, directory) from None
    for old in [c for c in complete_checkpoints(directory) if _step(c) not in protect][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def storage_error(target: Path, error: OSError, checkpoints: Path) -> StorageError:
    """A failed write (disk full, read-only folder), saying which checkpoint is still safe to resume from."""
    complete = complete_checkpoints(checkpoints)
    kept = f"the last checkpoint {complete[-1].name} is intact" if complete else "no checkpoint was written yet"
    return StorageError([f"cannot write {target} ({error.strerror or error}); training stopped and {kept}. "
                         "Free space or choose a writable --output-dir, then resume"])


def _step(folder: Path) -> int:
    return int(folder.name[len(PREFIX):])


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint folders with their final name, oldest first. A checkpoint being replaced by a save of the same
    step (.step-N.old) is put back first when the save was killed before the new one took its name."""
    if not directory.is_dir():
        return []
    for old in directory.glob(f".{PREFIX}*.old"):
        final = directory / old.name[1:-len(".old")]
        if final.exists():  # the new one landed; the kill came before the old one was removed
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=_step)


def verify_checkpoint(folder: Path, model=None, optimizer=None, scheduler=None) -> str | None:
    """Why a checkpoint cannot be trusted (None if it can), read without changing anything.

    Every file is opened as loading would open it: JSON, safetensors headers and data,
    the optimizer state through the weights-only unpickler (which refuses code), and every
    value restoring it would use is checked on throwaway objects (random states, counters).
    Given the model, optimizer and scheduler, the checkpoint must also fit them: every weight
    by name and shape, the optimizer's parameter groups and the shapes of its state.
    """
    try:
        record = json.loads((folder / "state.json").read_text())
        for name, size in record.get("files", {}).items():
            actual = (folder / name).stat().st_size
            if actual != size:
                return f"{name} has {actual} bytes, {size} were written"
        shapes = {}
        for name in _weight_files(folder, record):
            with safe_open(str(folder / name), framework="pt") as weights:
                for key in weights.keys():
                    shapes[key] = tuple(weights.get_tensor(key).shape)
        optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = load_file(str(folder / "rng.safetensors")) if (folder / "rng.safetensors").exists() else None
        problem = _state_problem(record, rng, scheduler) or _optimizer_shape_problem(optimizer_state)
        if problem:
            return problem
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except pickle.UnpicklingError:
        return "optimizer.pt needs code execution to load (refused: it is not a plain tensor file)"
    except Exception as error:  # any parse failure means the same thing: do not load it
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    problem = _weights_misfit(model, shapes) if model is not None else None
    if problem is None and optimizer is not None:
        problem = _optimizer_misfit(optimizer, optimizer_state)
    return problem


def _state_problem(record: dict, rng: dict | None, scheduler) -> str | None:
    """Why state.json (and the random states) could not be restored: each value tried on a throwaway object."""
    if not isinstance(record, dict):
        return "state.json is not a mapping"
    counters = [key for key in ("step", "epoch", "batch_in_epoch", "skipped_steps", "nonfinite_skipped",
                                "evals_without_improvement", "nonfinite_in_row")
                if key in record and not (type(record[key]) is int and record[key] >= 0)]
    if counters or not isinstance(record.get("step"), int):
        return f"state.json: {', '.join(counters) or 'step'} must be a whole number of at least 0"
    saved = record.get("scheduler")
    if scheduler is not None and not (isinstance(saved, dict) and set(saved) == set(scheduler.state_dict())):
        return "state.json: the scheduler's state is not one of this run's scheduler"
    if rng is not None and "python" in record and "numpy" in record:
        if "torch" not in rng:
            return "rng.safetensors holds no torch random state"
        torch.Generator().set_state(rng["torch"])
        version, internal, gauss = record["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        name, keys, position, has_gauss, cached = record["numpy"]
        np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    return None


def _optimizer_shape_problem(saved) -> str | None:
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("param_groups"), list)
            and all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in saved["param_groups"])):
        return "optimizer.pt is not an optimizer's state (state and param_groups)"
    return None


def _weights_misfit(model, shapes: dict[str, tuple]) -> str | None:
    """Why saved weights (name -> shape) do not fit `model`. Tied weights are saved under one of their names."""
    state = model.state_dict()
    tied: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        tied.setdefault(_storage(tensor), []).append(name)
    missing = [names[0] for names in tied.values() if not any(name in shapes for name in names)]
    wrong = [f"{name} {shapes[name]} instead of {tuple(state[name].shape)}" for name in shapes
             if name in state and shapes[name] != tuple(state[name].shape)]
    problem = misfit(sorted(missing), wrong, sorted(set(shapes) - set(state)))
    return f"its weights do not fit the model: {problem}" if problem else None


def _optimizer_misfit(optimizer, saved: dict) -> str | None:
    """Why a saved optimizer state does not fit `optimizer`: other parameter groups, or moments of other shapes."""
    groups = [len(group["params"]) for group in optimizer.param_groups]
    saved_groups = [len(group.get("params", [])) for group in saved.get("param_groups", [])]
    if groups != saved_groups:
        return f"its optimizer has parameter groups of {saved_groups} parameters, this run's of {groups}"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    for param, index in zip(params, ids):
        for key, value in saved.get("state", {}).get(index, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                return f"its optimizer's {key} has shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}"
    return None


def _weight_files(folder: Path, record: dict) -> list[str]:
    recorded = FROZEN_FILE in record.get("files", {}) or (folder / FROZEN_FILE).exists()
    return ["model.safetensors"] + ([FROZEN_FILE] if recorded else [])


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight a checkpoint holds, from both of its weight files."""
    weights = {}
    for name in _weight_files(folder, {}):
        weights.update(load_file(str(folder / name)))
    return weights


def load_weights(folder: Path, model) -> None:
    """Load a checkpoint's weights into `model`; every parameter and buffer must be found in its files."""
    if not (folder / FROZEN_FILE).exists():
        load_model(model, str(folder / "model.safetensors"))
        return
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    fixed = load_file(str(folder / FROZEN_FILE))
    _, unexpected_fixed = model.load_state_dict(fixed, strict=False)
    missing = sorted(set(missing) - set(fixed))
    if missing or unexpected or unexpected_fixed:
        raise RuntimeError(f"{folder} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {(list(unexpected) + list(unexpected_fixed))[:5]}")


def load_checkpoint(folder: Path, model, optimizer, scheduler, scaler) -> tuple[TrainState, list[str]]:
    """Restore everything save_checkpoint wrote; returns the state and warnings about what was missing.

    Nothing here unpickles arbitrary objects.
    """
    warnings = []
    record = json.loads((folder / "state.json").read_text())
    load_weights(folder, model)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(record["scheduler"])
    if scaler is not None and record.get("scaler"):
        scaler.load_state_dict(record["scaler"])

    if (folder / "rng.safetensors").exists() and "python" in record and "numpy" in record:
        rng = load_file(str(folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, internal, gauss = record["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, position, has_gauss, cached = record["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    else:
        warnings.append(f"{folder.name} has no random-number state: training continues, but dropout and "
                        "shuffling will differ from an uninterrupted run (reproducibility is lost)")
    if "batch_in_epoch" not in record or "epoch" not in record:
        warnings.append(f"{folder.name} has no data position: the epoch restarts from its first batch "
                        "(reproducibility is lost)")
        record.setdefault("epoch", 0)
        record["batch_in_epoch"] = 0
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: record[k] for k in fields if k in record}), warnings
