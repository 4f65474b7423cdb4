"""What the loop calls back into: the run directory's records, evaluation with best-model
selection and early stopping, checkpoints, stage changes and out-of-memory notes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from accelerate import Accelerator
from rich.console import Console

from tuneforge.artifacts import CHECKPOINT_DIR, METRICS_FILE, MODEL_DIR, ModelInfo, replace_folder, write_model_info
from tuneforge.config import Recipe
from tuneforge.data.common import TaskData
from tuneforge.errors import TrainingError
from tuneforge.models.folder import save_model_folder
from tuneforge.models.loading import LoadedModel
from tuneforge.strategies.freeze import FreezePlan
from tuneforge.strategies.schedules import PlateauState, refresh_lr
from tuneforge.tasks.base import Task
from tuneforge.training.checkpoint import FROZEN_FILE, TrainState, save_checkpoint, storage_error


def save_run_model(loaded: LoadedModel, folder: Path, data: TaskData, recipe: Recipe, task: Task,
                   trained: set[str] | None = None) -> None:
    """The deployable model folder, plus what tuneforge needs to evaluate and predict with it (ModelInfo).

    `trained`: the parameters the plan trains, all that an adapter folder stores besides the buffers."""
    info = ModelInfo(task=task.name, modality=data.modality, label_values=data.labels, label_names=data.label_names,
                     max_length=recipe.model.max_length, data=recipe.data.model_dump(mode="json", include=SAVED_DATA_KEYS),
                     task_settings=recipe.task.model_dump(mode="json"), task_state=task.state)

    def write(target: Path) -> None:
        save_model_folder(loaded, target, data.label_names, trained)
        write_model_info(target, info)
    replace_folder(folder, write)


# The data settings that reading new inputs like the training data needs, saved with the model.
SAVED_DATA_KEYS = {"format", "text_column", "text_pair_column", "label_column", "label_separator", "image_column",
                   "columns", "encoding", "target_column", "source_language", "target_language", "prompt_column",
                   "response_column"}


@contextlib.contextmanager
def storage_errors(target: Path):
    """A failed write (disk full, read-only folder) becomes a StorageError that says what is still safe."""
    try:
        yield
    except OSError as error:
        raise storage_error(target, error, target.parent / CHECKPOINT_DIR) from None


class Run:
    """State shared by the hooks of one training run."""

    def __init__(self, recipe: Recipe, run_dir: Path, accelerator: Accelerator, console: Console, trial=None):
        self.recipe, self.run_dir, self.accelerator, self.console = recipe, run_dir, accelerator, console
        self.metrics_file = run_dir / METRICS_FILE
        self.trial = trial  # run.TrialLink: how a search's trial differs from a plain run

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
        self.recipe = run.recipe
        self.trained = plan.ever_trainable()
        self.never_trained = {n for n, _ in run.accelerator.unwrap_model(model).named_parameters() if n not in self.trained}
        self.frozen_file: Path | None = None  # this process's last frozen.safetensors, linked into the next checkpoint
        self.batches_per_epoch = 0  # set by the run once the training loader is ready

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
        spec = self.recipe.train
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
                         "grad_accum_steps": self.recipe.train.grad_accum_steps * splits})
        if self.run.main:
            self.run.console.print(f"[yellow]out of memory at step {state.step}:[/] retrying the step with micro-batches "
                                   f"of {micro_batch} ({splits} per batch); the effective batch is unchanged")

    def on_log(self, state: TrainState, record: dict) -> None:
        self.run.record(record)
        if self.run.main and not self.run.console.is_terminal:  # logs and CI: no live bar, so print a line
            self.run.console.print(f"step {state.step} epoch {record['epoch']:.2f}: loss {record['loss']:.4f}, "
                                   f"lr {record['lr']:.3g}, {record['examples_per_second']:.1f} examples/s")

    def on_step_end(self, state: TrainState) -> None:
        if self.recipe.eval.every_steps and state.step % self.recipe.eval.every_steps == 0:
            self.evaluate(state)
        if self.recipe.train.checkpoint_every_steps and state.step % self.recipe.train.checkpoint_every_steps == 0:
            self.checkpoint(state)

    def on_epoch_end(self, state: TrainState) -> None:
        if not self.recipe.eval.every_steps:
            self.evaluate(state)
        self.checkpoint(state)

    def evaluate(self, state: TrainState) -> None:
        if "validation" not in self.eval_loaders:
            return
        metrics = self.task.evaluate(self.model, self.eval_loaders["validation"], self.run.accelerator)
        self.run.record({"type": "eval", "split": "validation", "step": state.step, "epoch": state.epoch, **metrics})
        monitored = metrics[self.recipe.eval.metric]
        if monitored is None:  # e.g. AUC on a validation split that lacks a class
            if self.run.main:
                self.run.console.print(f"[yellow]step {state.step}: {self.recipe.eval.metric} is undefined on this "
                                       "validation split; no model selection at this evaluation[/]")
            return
        maximise = self.recipe.eval.mode == "max"
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
        if self.run.trial is not None and self.run.trial.on_validation is not None:
            epochs = state.epoch + state.batch_in_epoch / max(self.batches_per_epoch, 1)
            self.run.trial.on_validation(epochs, metrics)  # a search's pruner may stop the run here

    def _early_stopping(self, state: TrainState, monitored: float, maximise: bool) -> None:
        rule = self.recipe.eval.early_stopping
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
                self.run.console.print(f"early stopping at step {state.step}: {self.recipe.eval.metric} has not improved "
                                       f"by more than {rule.min_delta} in {rule.patience} evaluations")

    def _target_reached(self, state: TrainState, monitored: float, maximise: bool) -> None:
        target = self.recipe.eval.target
        if target is None or not (monitored >= target if maximise else monitored <= target):
            return
        state.stopped_early = True
        self.run.record({"type": "target_reached", "step": state.step, "epoch": state.epoch,
                         "metric": self.recipe.eval.metric, "value": monitored, "target": target})
        if self.run.main:
            self.run.console.print(f"target reached at step {state.step}: {self.recipe.eval.metric} {monitored:.4f} "
                                   f"{'>=' if maximise else '<='} {target}; training stops")

    def save_best(self) -> None:
        if self.run.main:
            with storage_errors(self.run.run_dir / MODEL_DIR):
                save_run_model(self.unwrapped_loaded(), self.run.run_dir / MODEL_DIR, self.data, self.recipe, self.task,
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
                                     keep=self.recipe.train.keep_checkpoints,
                                     protect={state.best_step} if state.best_step is not None else set(),
                                     frozen=self.never_trained, reuse_frozen=self.frozen_file)
            self.frozen_file = folder / FROZEN_FILE if (folder / FROZEN_FILE).exists() else None
            self.run.record({"type": "checkpoint", "step": state.step, "path": str(folder.relative_to(self.run.run_dir))})
        accelerator.wait_for_everyone()
