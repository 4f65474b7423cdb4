"""Checkpoints that a crash cannot corrupt, and that resume a run exactly.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  model.safetensors   all model weights (no pickle)
  optimizer.pt        optimizer state, read back with torch.load(weights_only=True)
  rng.safetensors     torch (and CUDA) generator states
  state.json          step, epoch, data position, scheduler, grad scaler, Python/NumPy RNG, best metric
It is written under a temporary name, fsynced, then renamed into place: a folder
with the final name is always complete. state.json is written last.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

PREFIX = "step-"


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


def save_checkpoint(directory: Path, model, optimizer, scheduler, scaler, state: TrainState, keep: int) -> Path:
    """Write a checkpoint atomically; returns its folder. Older ones beyond `keep` are removed after."""
    final = directory / f"{PREFIX}{state.step:08d}"
    partial = directory / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    save_model(model, str(partial / "model.safetensors"))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    save_file({k: v.contiguous() for k, v in _rng_tensors().items()}, str(partial / "rng.safetensors"))
    record = {**asdict(state), "scheduler": scheduler.state_dict(),
              "scaler": scaler.state_dict() if scaler is not None else None, **_python_rng()}
    (partial / "state.json").write_text(json.dumps(record))
    for file in partial.iterdir():
        _fsync(file)
    _fsync(partial)

    if final.exists():  # the same step saved again (e.g. epoch end right after a periodic save)
        shutil.rmtree(final)
    os.rename(partial, final)
    _fsync(directory)
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint folders with their final name, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(folder: Path, model, optimizer, scheduler, scaler) -> TrainState:
    """Restore everything save_checkpoint wrote. Nothing here unpickles arbitrary objects."""
    record = json.loads((folder / "state.json").read_text())
    load_model(model, str(folder / "model.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(record["scheduler"])
    if scaler is not None and record.get("scaler"):
        scaler.load_state_dict(record["scaler"])

    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = record["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = record["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: record[k] for k in fields if k in record})
