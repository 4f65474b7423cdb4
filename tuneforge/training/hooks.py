"""What the loop calls back into: the run directory's records, evaluation with best-model
selection and early stopping, checkpoints, stage changes and out-of-memory notes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from accelerate import Accelerator
from rich.console import Console

from tuneforge.training.checkpoint import FROZEN_FILE, TrainState, save_checkpoint, storage_error
from tuneforge.data.preflight import TaskData
from tuneforge.errors import TrainingError, TuneforgeError
from tuneforge.strategies.freeze import FreezePlan
from tuneforge.models.loading import LoadedModel, save_model_folder
from tuneforge.config import TEXT_TASK_SETTINGS, TEXT_TASKS, Recipe, read_yaml
from tuneforge.strategies.schedules import PlateauState, refresh_lr

MODEL_DIR, CHECKPOINT_DIR = "model", "checkpoints"
MERGED_DIR = "model-merged"  # with adapter.save_merged: the best model with its adapter folded into the weights
FEATURE_CACHE_DIR = "feature_cache"  # per split: a frozen prefix's outputs (see feature_cache.py)
RUN_FILES = ("recipe.yaml", "metrics.jsonl", "eval.json")
RUN_ENTRIES = (*RUN_FILES, MODEL_DIR, MERGED_DIR, CHECKPOINT_DIR, FEATURE_CACHE_DIR)  # all that a run directory holds


def _own_names(entries: tuple[str, ...]) -> set[str]:
    """`entries`, and the partial and old copies an interrupted swap of one leaves (.NAME.partial, .NAME.old)."""
    return set(entries) | {f".{name}.{suffix}" for name in entries for suffix in ("partial", "old")}


def foreign_entries(folder: Path, entries: tuple[str, ...] = RUN_ENTRIES) -> list[str]:
    """Names in `folder` that tuneforge did not write there."""
    return sorted(path.name for path in folder.iterdir() if path.name not in _own_names(entries))


def is_run_dir(folder: Path) -> bool:
    """Whether `folder` holds a run: its recipe.yaml is a resolved recipe, with every section a run saves (a
    recipe a person wrote names only some). Only such a folder is resumed into or overwritten."""
    saved = folder / "recipe.yaml"
    try:
        recipe = read_yaml(saved) if saved.is_file() else None
    except TuneforgeError:
        return False
    return isinstance(recipe, dict) and set(recipe) >= {"model", "data", "task", "train", "optim", "eval", "output"}


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


def write_json_atomic(path: Path, content) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=2))
    os.replace(partial, path)


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


def save_run_model(loaded: LoadedModel, folder: Path, data: TaskData, recipe: Recipe, task,
                   trained: set[str] | None = None) -> None:
    """The deployable model folder, plus what tuneforge needs to evaluate and predict with it.

    `trained`: the parameters the plan trains, all that an adapter folder stores besides the buffers."""
    def write(target: Path) -> None:
        save_model_folder(loaded, target, data.label_names, trained)
        info = {"task": recipe.task.type, "modality": data.modality, "label_values": data.labels,
                "label_names": data.label_names, "max_length": recipe.model.max_length, **task.info,
                "data": recipe.data.model_dump(mode="json", include={"format", "text_column", "text_pair_column",
                                                                      "label_column", "label_separator",
                                                                      "image_column", "columns", "encoding", "target_column",
                                                                      "source_language", "target_language",
                                                                      "prompt_column", "response_column"})}
        if recipe.task.type in TEXT_TASKS:  # how its datasets were built, so `evaluate` builds them the same way
            info["task_settings"] = recipe.task.model_dump(mode="json", include=TEXT_TASK_SETTINGS)
        (target / "tuneforge.json").write_text(json.dumps(info, indent=2))
    replace_folder(folder, write)


def update_model_info(folder: Path, values: dict) -> None:
    """Change entries of a saved model's tuneforge.json (e.g. a threshold chosen after training)."""
    with storage_errors(folder):
        info = json.loads((folder / "tuneforge.json").read_text())
        write_json_atomic(folder / "tuneforge.json", {**info, **values})


@contextlib.contextmanager
def storage_errors(target: Path):
    """A failed write (disk full, read-only folder) becomes a StorageError that says what is still safe."""
    try:
        yield
    except OSError as error:
        raise storage_error(target, error, target.parent / CHECKPOINT_DIR) from None


def repair_run_dir(run_dir: Path) -> list[str]:
    """Undo what a kill in the middle of a write can leave behind; returns what was repaired.

    - metrics.jsonl: a last line cut short is dropped (every complete line is kept);
    - model/: a swap interrupted between its two renames leaves only .model.old: put it back.
    """
    repaired = []
    metrics = run_dir / "metrics.jsonl"
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


def drop_redone_records(metrics: Path, step: int) -> int:
    """Before a run resumes from `step`: drop the records of later steps (and the final results), which the
    interrupted attempt wrote and the resumed one writes again, so a reader sees every step once. The file is
    rewritten atomically; returns how many records were dropped."""
    if not metrics.is_file():
        return 0
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not _redone(line, step)]
    if len(kept) != len(lines):
        partial = metrics.with_name(f".{metrics.name}.partial")
        partial.write_text("".join(kept))
        os.replace(partial, metrics)
    return len(lines) - len(kept)


def _redone(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # not ours to judge: keep it
        return False
    return isinstance(record, dict) and (record.get("type") == "final" or
                                         (isinstance(record.get("step"), int) and record["step"] > step))


class Run:
    """State shared by the hooks of one training run."""

    def __init__(self, recipe: Recipe, run_dir: Path, accelerator: Accelerator, console: Console):
        self.recipe, self.run_dir, self.accelerator, self.console = recipe, run_dir, accelerator, console
        self.metrics_file = run_dir / "metrics.jsonl"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def record(self, entry: dict) -> None:
        if self.main:
            with storage_errors(self.metrics_file):
                with self.metrics_file.open("a") as file:
                    file.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")


class RunHooks:
    """Logging, evaluation with best-model selection, and checkpoints for the loop."""

    def __init__(self, run: Run, model, optimizer, scheduler, loaded: LoadedModel, task, data: TaskData, eval_loaders,
                 plan: FreezePlan, plateau: PlateauState | None = None):
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.loaded, self.task, self.data, self.eval_loaders = loaded, task, data, eval_loaders
        self.plan, self.plateau = plan, plateau
        self.spec = run.recipe
        self.trained = plan.ever_trainable()
        self.never_trained = {n for n, _ in run.accelerator.unwrap_model(model).named_parameters() if n not in self.trained}
        self.frozen_file: Path | None = None  # this process's last frozen.safetensors, linked into the next checkpoint

    def on_stage(self, state: TrainState, index: int) -> None:
        stage = self.plan.stages[index]
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.run.record({"type": "stage", "step": state.step, "epoch": state.epoch, "stage": index,
                         "groups": stage.groups, "lr_multiplier": stage.lr_multiplier, "trainable_parameters": trainable})
        if self.run.main and len(self.plan.stages) > 1:
            self.run.console.print(f"stage {index} from step {state.step}: training {', '.join(stage.groups)} "
                                   f"({trainable:,} parameters), LR x{stage.lr_multiplier:g}")

    def on_nonfinite(self, state: TrainState, window: list[dict], loss: float, grad_norm: float) -> None:
        """A NaN/Inf loss or gradient: stop (default), or skip the step and stop after too many in a row."""
        rows = self.data.splits["train"].rows
        examples = [rows[int(i)] for batch in window for i in batch["index"]]
        what = f"loss {loss}, gradient norm {grad_norm}"
        self.run.record({"type": "nonfinite", "step": state.step + 1, "loss": str(loss), "grad_norm": str(grad_norm),
                         "examples": examples})
        shown = ", ".join(examples[:8]) + (f" and {len(examples) - 8} more" if len(examples) > 8 else "")
        spec = self.spec.train
        if spec.nonfinite == "stop":
            raise TrainingError([f"non-finite value at step {state.step + 1} ({what}); the weights were not updated "
                                 f"and the last checkpoint is intact. The batch held: {shown}. Lower optim.lr, "
                                 "check those examples, or set train.nonfinite: skip"])
        state.nonfinite_skipped += 1
        state.nonfinite_in_row += 1
        if self.run.main:
            self.run.console.print(f"[yellow]skipped step {state.step + 1}: {what} "
                                   f"({state.nonfinite_in_row} in a row)[/]")
        if state.nonfinite_in_row >= spec.max_nonfinite_in_row:
            raise TrainingError([f"{state.nonfinite_in_row} non-finite steps in a row (the last at step "
                                 f"{state.step + 1}, {what}; its batch held: {shown}); training stopped, the last "
                                 "checkpoint is intact. Lower optim.lr or check the data"])

    def on_out_of_memory(self, state: TrainState, micro_batch: int, splits: int) -> None:
        self.run.record({"type": "out_of_memory", "step": state.step, "micro_batch": micro_batch, "splits": splits,
                         "grad_accum_steps": self.spec.train.grad_accum_steps * splits})
        if self.run.main:
            self.run.console.print(f"[yellow]out of memory at step {state.step}:[/] retrying the step with micro-batches "
                                   f"of {micro_batch} ({splits} per batch); the effective batch is unchanged")

    def on_log(self, state: TrainState, record: dict) -> None:
        self.run.record(record)
        if self.run.main and not self.run.console.is_terminal:  # logs and CI: no live bar, so print a line
            self.run.console.print(f"step {state.step} epoch {record['epoch']:.2f}: loss {record['loss']:.4f}, "
                                   f"lr {record['lr']:.3g}, {record['examples_per_second']:.1f} examples/s")

    def on_step_end(self, state: TrainState) -> None:
        if self.spec.eval.every_steps and state.step % self.spec.eval.every_steps == 0:
            self.evaluate(state)
        if self.spec.train.checkpoint_every_steps and state.step % self.spec.train.checkpoint_every_steps == 0:
            self.checkpoint(state)

    def on_epoch_end(self, state: TrainState) -> None:
        if not self.spec.eval.every_steps:
            self.evaluate(state)
        self.checkpoint(state)

    def evaluate(self, state: TrainState) -> None:
        if "validation" not in self.eval_loaders:
            return
        metrics = self.task.evaluate(self.model, self.eval_loaders["validation"], self.run.accelerator)
        self.run.record({"type": "eval", "split": "validation", "step": state.step, "epoch": state.epoch, **metrics})
        monitored = metrics[self.spec.eval.metric]
        if monitored is None:  # e.g. AUC on a validation split that lacks a class
            if self.run.main:
                self.run.console.print(f"[yellow]step {state.step}: {self.spec.eval.metric} is undefined on this "
                                       "validation split; no model selection at this evaluation[/]")
            return
        maximise = self.spec.eval.mode == "max"
        better = state.best_metric is None or (monitored > state.best_metric if maximise else monitored < state.best_metric)
        summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in self.task.summary_keys if metrics.get(k) is not None)
        if self.run.main:
            self.run.console.print(f"step {state.step} validation: {summary}" + ("  [green]best[/]" if better else ""))
        self._early_stopping(state, monitored, maximise)
        self._target_reached(state, monitored, maximise)
        if self.plateau is not None and self.plateau.update(monitored):
            refresh_lr(self.scheduler)  # LambdaLR would only pick the new multiplier up at its next step
            self.run.record({"type": "lr_reduced", "step": state.step, "multiplier": self.plateau.multiplier})
        if better:
            state.best_metric, state.best_step = monitored, state.step
            self.save_best()

    def _early_stopping(self, state: TrainState, monitored: float, maximise: bool) -> None:
        rule = self.spec.eval.early_stopping
        if rule is None:
            return
        gain = float("inf") if state.best_metric is None else (
            monitored - state.best_metric if maximise else state.best_metric - monitored)
        state.evals_without_improvement = 0 if gain > rule.min_delta else state.evals_without_improvement + 1
        if state.evals_without_improvement >= rule.patience:
            state.stopped_early = True
            self.run.record({"type": "early_stop", "step": state.step, "epoch": state.epoch,
                             "best_step": state.best_step, "best": state.best_metric})
            if self.run.main:
                self.run.console.print(f"early stopping at step {state.step}: {self.spec.eval.metric} has not improved "
                                       f"by more than {rule.min_delta} in {rule.patience} evaluations")

    def _target_reached(self, state: TrainState, monitored: float, maximise: bool) -> None:
        target = self.spec.eval.target
        if target is None or not (monitored >= target if maximise else monitored <= target):
            return
        state.stopped_early = True
        self.run.record({"type": "target_reached", "step": state.step, "epoch": state.epoch,
                         "metric": self.spec.eval.metric, "value": monitored, "target": target})
        if self.run.main:
            self.run.console.print(f"target reached at step {state.step}: {self.spec.eval.metric} {monitored:.4f} "
                                   f"{'>=' if maximise else '<='} {target}; training stops")

    def save_best(self) -> None:
        if self.run.main:
            with storage_errors(self.run.run_dir / MODEL_DIR):
                save_run_model(self.unwrapped_loaded(), self.run.run_dir / MODEL_DIR, self.data, self.spec, self.task,
                               trained=self.trained)
        self.run.accelerator.wait_for_everyone()

    def unwrapped_loaded(self) -> LoadedModel:
        unwrapped = self.run.accelerator.unwrap_model(self.model)
        return dataclasses.replace(self.loaded, model=unwrapped)

    def checkpoint(self, state: TrainState) -> None:
        accelerator = self.run.accelerator
        state.plateau = self.plateau.state_dict() if self.plateau is not None else None
        if self.run.main:
            folder = save_checkpoint(self.run.run_dir / CHECKPOINT_DIR, accelerator.unwrap_model(self.model),
                                     self.optimizer, self.scheduler, accelerator.scaler, state,
                                     keep=self.spec.train.keep_checkpoints,
                                     protect={state.best_step} if state.best_step is not None else set(),
                                     frozen=self.never_trained, reuse_frozen=self.frozen_file)
            self.frozen_file = folder / FROZEN_FILE if (folder / FROZEN_FILE).exists() else None
            self.run.record({"type": "checkpoint", "step": state.step, "path": str(folder.relative_to(self.run.run_dir))})
        accelerator.wait_for_everyone()
