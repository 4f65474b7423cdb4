"""The run directory and the model folder: their layout, their records, and the one way to read and write them.

    RUN/recipe.yaml       the resolved recipe (every section: that is how a run directory is recognised)
    RUN/metrics.jsonl     one JSON record per line: logging steps, evaluations, checkpoints, stages, results
    RUN/eval.json         the final metrics of the best model on every evaluation split
    RUN/model/            the best model: weights, config, preprocessor, and tuneforge.json (ModelInfo)
    RUN/model-merged/     with adapter.save_merged: the adapter folded into the weights
    RUN/checkpoints/      the newest complete checkpoints, for --resume
    RUN/feature_cache/    a frozen prefix's outputs while a run trains (removed at its end)

Every write that a kill could leave half-done goes to a temporary name first and is renamed into place;
`repair_run_dir` undoes what a kill between two renames leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tuneforge.config import DataSpec, read_yaml
from tuneforge.errors import ModelError, TuneforgeError, first_line
from tuneforge.tasks.registry import DEFAULT_TASK, find_task, task_names

MODEL_DIR, CHECKPOINT_DIR, MERGED_DIR, FEATURE_CACHE_DIR = "model", "checkpoints", "model-merged", "feature_cache"
RECIPE_FILE, METRICS_FILE, EVAL_FILE, INFO_FILE = "recipe.yaml", "metrics.jsonl", "eval.json", "tuneforge.json"
RUN_ENTRIES = (RECIPE_FILE, METRICS_FILE, EVAL_FILE, MODEL_DIR, MERGED_DIR, CHECKPOINT_DIR, FEATURE_CACHE_DIR)
INFO_VERSION = 2
RECIPE_SECTIONS = {"model", "data", "task", "train", "optim", "eval", "output"}  # a resolved recipe has every one


# ---------------------------------------------------------------- the model folder's description

class ModelInfo(BaseModel):
    """tuneforge.json: what tuneforge needs, beside the weights, to evaluate and predict with a model."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = INFO_VERSION
    task: str  # a registered task's name
    modality: Literal["text", "image"]
    label_values: list[str]  # output index -> label value (regression: the target columns; text tasks: none)
    label_names: list[str]  # output index -> display name
    max_length: int  # the token limit texts were cut to
    data: dict  # the data settings that reading new inputs needs (columns, format, encoding)
    task_settings: dict  # the recipe's task section (type, labels and the task's own settings)
    task_state: dict = {}  # what training decided beside the settings (a tuned threshold, a target scaling)


def read_model_info(folder: Path) -> ModelInfo:
    """A model folder's tuneforge.json, or a clear error when it is damaged or newer than this tuneforge."""
    path = folder / INFO_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError([f"{path} is damaged ({first_line(error)}); export or train the model again"]) from None
    if not isinstance(raw, dict):
        raise ModelError([f"{path} is not a tuneforge model description"])
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or version > INFO_VERSION:
        raise ModelError([f"{path} was written by a newer tuneforge (format version {version}; this one reads up to "
                          f"{INFO_VERSION}): upgrade tuneforge to load it"])
    info = _validated(path, ModelInfo, _from_version_1(raw) if version == 1 else raw, where=())
    _validated(path, DataSpec, info.data, where=("data",))  # read by every verb that reads new inputs
    return info


def _validated(path: Path, model: type, raw: dict, where: tuple):
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        problem = error.errors()[0]
        raise ModelError([f"{path} is not a valid tuneforge model description: "
                          f"{'.'.join(map(str, where + problem['loc']))}: {problem['msg']}"]) from None


GENERIC_V1_KEYS = {"task", "modality", "label_values", "label_names", "max_length", "data", "task_settings"}


def _from_version_1(raw: dict) -> dict:
    """Folders written before the format was versioned kept the task's state at the top level."""
    task = raw.get("task", DEFAULT_TASK)
    state = {key: value for key, value in raw.items() if key not in GENERIC_V1_KEYS}
    return {"format_version": INFO_VERSION, "task": task, "modality": raw.get("modality"),
            "label_values": raw.get("label_values") or [], "label_names": raw.get("label_names") or [],
            "max_length": raw.get("max_length"), "data": raw.get("data") or {},
            "task_settings": {"type": task, **(raw.get("task_settings") or {})}, "task_state": state}


def task_of(info: ModelInfo, folder: Path) -> type:
    """The registered task a saved model names (tuneforge's own, an installed plug-in's, or one the user's code
    registered, or an installed plug-in whose entry point has that name): the name is looked up, never imported."""
    task_class = find_task(info.task)
    if task_class is None:
        raise ModelError([f"{folder} holds a model of the task {info.task!r}, which is not registered here (known: "
                          f"{', '.join(task_names())}); install or import the package that registers it"])
    return task_class


def write_model_info(folder: Path, info: ModelInfo) -> None:
    write_json_atomic(folder / INFO_FILE, info.model_dump(mode="json"))


def update_task_state(folder: Path, state: dict) -> None:
    """Change the task state of a saved model (e.g. a threshold chosen after training)."""
    info = read_model_info(folder)
    write_model_info(folder, info.model_copy(update={"task_state": {**info.task_state, **state}}))


def model_folder(run: str | Path) -> Path:
    """The model folder of a run directory, or the folder itself when it is one."""
    run = Path(run)
    folder = run / MODEL_DIR if (run / MODEL_DIR / "config.json").is_file() else run
    if not (folder / "config.json").is_file() or not (folder / INFO_FILE).is_file():
        raise ModelError([f"{run} is neither a run directory nor a tuneforge model folder (no model/config.json)"])
    return folder


def run_of(folder: Path) -> Path | None:
    """The run directory a model folder (or a run directory) belongs to, if its records are there."""
    for candidate in (folder, folder.parent):
        if (candidate / RECIPE_FILE).is_file():
            return candidate
    return None


# ---------------------------------------------------------------- writing without half-written files

def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename into place: a reader (or a resume) never sees half of it."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json_atomic(path: Path, content) -> None:
    write_text_atomic(path, json.dumps(content, indent=2))


def replace_folder(folder: Path, write):
    """Write a folder under a temporary name, then swap it in, so a reader never sees half of it.
    Returns what `write(temporary_folder)` returns."""
    partial, old = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        result = write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # never leave a half-written copy behind
        raise
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
    return result


# ---------------------------------------------------------------- the run directory

def _own_names(entries: tuple[str, ...]) -> set[str]:
    """`entries`, and the partial and old copies an interrupted swap of one leaves (.NAME.partial, .NAME.old)."""
    return set(entries) | {f".{name}.{suffix}" for name in entries for suffix in ("partial", "old")}


def foreign_entries(folder: Path, entries: tuple[str, ...] = RUN_ENTRIES) -> list[str]:
    """Names in `folder` that tuneforge did not write there."""
    return sorted(path.name for path in folder.iterdir() if path.name not in _own_names(entries))


def leftovers_only(folder: Path) -> bool:
    """Whether `folder` holds nothing but what a killed first write leaves (.recipe.yaml.partial, ...)."""
    return all(path.name in _own_names(RUN_ENTRIES) - set(RUN_ENTRIES) for path in folder.iterdir())


def is_run_dir(folder: Path) -> bool:
    """Whether `folder` holds a run: its recipe.yaml is a resolved recipe, with every section a run saves (a
    recipe a person wrote names only some). Only such a folder is resumed into or overwritten."""
    saved = folder / RECIPE_FILE
    try:
        recipe = read_yaml(saved) if saved.is_file() else None
    except TuneforgeError:
        return False
    return isinstance(recipe, dict) and set(recipe) >= RECIPE_SECTIONS


def clear_run_dir(run_dir: Path) -> list[str]:
    """Remove a run directory's own entries, and only those: anything else in it stays where it is (returned)."""
    for path in run_dir.iterdir():
        if path.name not in _own_names(RUN_ENTRIES):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return foreign_entries(run_dir)


def repair_run_dir(run_dir: Path) -> list[str]:
    """Undo what a kill in the middle of a write can leave behind; returns what was repaired.

    - metrics.jsonl: a last line cut short is dropped (every complete line is kept);
    - model/: a swap interrupted between its two renames leaves only .model.old: put it back.
    """
    repaired = []
    metrics = run_dir / METRICS_FILE
    if metrics.exists():
        content = metrics.read_bytes()
        if content and not content.endswith(b"\n"):
            with metrics.open("r+b") as file:
                file.truncate(content.rfind(b"\n") + 1)
            repaired.append("dropped a half-written last line of metrics.jsonl")
    model, old = run_dir / MODEL_DIR, run_dir / f".{MODEL_DIR}.old"
    if not model.exists() and old.exists():
        os.rename(old, model)
        repaired.append("restored model/ from an interrupted update")
    shutil.rmtree(run_dir / f".{MODEL_DIR}.partial", ignore_errors=True)
    return repaired


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, record by record (a damaged line is skipped: the records are a log, not a contract)."""
    path = run_dir / METRICS_FILE
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def drop_redone_records(metrics: Path, step: int) -> int:
    """Before a run resumes from `step` (0: from scratch): drop what the resumed attempt writes again, so a reader
    sees every step once and every run fact once: the records of later steps, the stage in effect at `step`,
    the final results, and what each attempt records when it starts (parameters, data). The
    file is rewritten atomically; returns how many records were dropped."""
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not _redone(line, step)]
    if len(kept) != len(lines):
        write_text_atomic(metrics, "".join(kept))
    return len(lines) - len(kept)


PER_ATTEMPT = ("final", "parameters", "data")  # records every attempt of a run writes anew, after its resume


def _redone(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # not ours to judge: keep it
        return False
    if not isinstance(record, dict):
        return False
    at = record.get("step")
    return (record.get("type") in PER_ATTEMPT or (isinstance(at, int) and at > step)
            or (record.get("type") == "stage" and at == step))
