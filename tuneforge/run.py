"""finetune(): recipe -> data + model -> loop -> run directory.

The run directory holds
  recipe.yaml      the resolved recipe (after overrides and ${VAR} expansion)
  metrics.jsonl    one record per logging step, evaluation, checkpoint and stage of the run
  model/           the best model by eval.metric, as a Hugging Face-style folder
  checkpoints/     the latest complete checkpoints, for --resume
  eval.json        final metrics of the best model on every evaluation split
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from rich.console import Console

from tuneforge.checkpoint import TrainState, complete_checkpoints, load_checkpoint, save_checkpoint
from tuneforge.data.loaders import EpochBatchSampler, make_dataset, make_loader
from tuneforge.data.preflight import TaskData, load_task_data
from tuneforge.errors import RecipeError, ResumeError
from tuneforge.loop import fit, predict_logits
from tuneforge.models import LoadedModel, load_model, load_model_folder, save_model_folder
from tuneforge.optim import build_optimizer
from tuneforge.recipe import Recipe, load_recipe
from tuneforge.tasks.classification import ClassificationTask

MODEL_DIR, CHECKPOINT_DIR = "model", "checkpoints"
SUMMARY_KEYS = ("accuracy", "f1_macro", "auc_roc", "loss")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict  # the content of eval.json


def make_accelerator(recipe: Recipe) -> Accelerator:
    spec = recipe.train
    if spec.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError(["train.mixed_precision: fp16 needs a GPU; use bf16 on CPU"])
    # split_batches: train.batch_size is the global batch, shared out between processes,
    # so 1 process and N processes take the same optimizer steps.
    # Accelerate only sets up multi-process CPU training (gloo) when told it runs on the CPU.
    on_cpu = spec.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=spec.mixed_precision, cpu=on_cpu,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if spec.batch_size % accelerator.num_processes:
        raise RecipeError([f"train.batch_size {spec.batch_size} is not divisible by the {accelerator.num_processes} processes"])
    return accelerator


def write_json_atomic(path: Path, content) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=2))
    os.replace(partial, path)


def replace_folder(folder: Path, write) -> None:
    """Write a folder under a temporary name, then swap it in, so a reader never sees half of it."""
    partial, old = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(partial, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_run_model(loaded: LoadedModel, folder: Path, data: TaskData, recipe: Recipe) -> None:
    """The deployable model folder, plus what tuneforge needs to evaluate and predict with it."""
    def write(target: Path) -> None:
        save_model_folder(loaded, target, data.label_names)
        info = {"task": recipe.task.type, "modality": data.modality, "label_values": data.labels,
                "label_names": data.label_names, "max_length": recipe.model.max_length,
                "data": recipe.data.model_dump(mode="json", include={"format", "text_column", "text_pair_column",
                                                                      "label_column", "columns"})}
        (target / "tuneforge.json").write_text(json.dumps(info, indent=2))
    replace_folder(folder, write)


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
            with self.metrics_file.open("a") as file:
                file.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")


class RunHooks:
    """Logging, evaluation with best-model selection, and checkpoints for the loop."""

    def __init__(self, run: Run, model, optimizer, scheduler, loaded: LoadedModel, task, data: TaskData, eval_loaders):
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.loaded, self.task, self.data, self.eval_loaders = loaded, task, data, eval_loaders
        self.spec = run.recipe

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
        logits, labels = predict_logits(self.model, self.eval_loaders["validation"], self.run.accelerator)
        metrics = self.task.metrics(logits, labels)
        self.run.record({"type": "eval", "split": "validation", "step": state.step, "epoch": state.epoch, **metrics})
        monitored = metrics.get(self.spec.eval.metric)
        better = state.best_metric is None or (
            monitored > state.best_metric if self.spec.eval.mode == "max" else monitored < state.best_metric)
        summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in SUMMARY_KEYS if metrics.get(k) is not None)
        if self.run.main:
            self.run.console.print(f"step {state.step} validation: {summary}" + ("  [green]best[/]" if better else ""))
        if better:
            state.best_metric, state.best_step = monitored, state.step
            self.save_best()

    def save_best(self) -> None:
        if self.run.main:
            save_run_model(self.unwrapped_loaded(), self.run.run_dir / MODEL_DIR, self.data, self.spec)
        self.run.accelerator.wait_for_everyone()

    def unwrapped_loaded(self) -> LoadedModel:
        unwrapped = self.run.accelerator.unwrap_model(self.model)
        return LoadedModel(unwrapped, self.loaded.preprocessor, self.loaded.modality, self.loaded.head_prefixes,
                           self.loaded.report, self.loaded.factory)

    def checkpoint(self, state: TrainState) -> None:
        accelerator = self.run.accelerator
        if self.run.main:
            folder = save_checkpoint(self.run.run_dir / CHECKPOINT_DIR, accelerator.unwrap_model(self.model),
                                     self.optimizer, self.scheduler, accelerator.scaler, state,
                                     keep=self.spec.train.keep_checkpoints)
            self.run.record({"type": "checkpoint", "step": state.step, "path": str(folder.relative_to(self.run.run_dir))})
        accelerator.wait_for_everyone()


def _refuse_existing_run(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if (run_dir / "recipe.yaml").exists() and not resume and not overwrite:
        raise RecipeError([f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                           "or choose another --output-dir"])


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory (main process only), once data and model are known to be good."""
    has_run = (run_dir / "recipe.yaml").exists()
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and has_run:
        _check_resumable(yaml.safe_load((run_dir / "recipe.yaml").read_text()), recipe)
    else:
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())


def _check_resumable(saved: dict, recipe: Recipe) -> None:
    current = recipe.model_dump(mode="json")
    breaking = [f"{section}.{key}" for section in ("model", "task") for key in current[section]
                if saved.get(section, {}).get(key) != current[section][key]]
    for key in ("train", "text_column", "label_column", "format"):
        if saved.get("data", {}).get(key) != current["data"][key]:
            breaking.append(f"data.{key}")
    if breaking:
        raise ResumeError([f"the recipe changed in a way a resumed run cannot follow: {', '.join(breaking)}; "
                           "start a new run (another --output-dir) instead"])


def _load_everything(recipe: Recipe, console: Console, main: bool):
    data = load_task_data(recipe.data, recipe.task)
    loaded = load_model(recipe.model, data.label_names, recipe.data.image)
    if main:
        for note in data.notes:
            console.print(f"[yellow]data:[/] {note}")
        sizes = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
        console.print(f"data: {data.modality}, {len(data.labels)} labels {data.label_names}; {sizes}")
        console.print(f"model: {loaded.report.summary()}")
    return data, loaded


def finetune(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, output_dir: str | Path | None = None,
             resume: bool = False, overwrite: bool = False, console: Console | None = None) -> RunResult:
    """Fine-tune as the recipe says; returns the run directory and the final metrics (eval.json)."""
    recipe = load_recipe(recipe, overrides)
    if output_dir is not None:
        recipe.output.dir = str(output_dir)
    run_dir = recipe.output_dir()
    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    console = console or Console()
    _refuse_existing_run(run_dir, resume, overwrite)
    set_seed(recipe.train.seed)
    data, loaded = _load_everything(recipe, console, main)  # every data and model check, before any file is written
    if main:
        _prepare_run_dir(recipe, run_dir, resume, overwrite)
    accelerator.wait_for_everyone()
    run = Run(recipe, run_dir, accelerator, console)
    task = ClassificationTask(data.label_names)
    spec = recipe.train
    sampler, train_loader, eval_loaders = _make_loaders(recipe, data, loaded)
    eval_names = list(eval_loaders)

    updates_per_epoch = -(-sampler.batches_per_epoch // spec.grad_accum_steps)
    total_steps = min(spec.max_steps or 10**12, spec.epochs * updates_per_epoch)
    optimizer, scheduler = build_optimizer(loaded.model, recipe.optim, max(total_steps, 1))
    model, optimizer, train_loader, *prepared = accelerator.prepare(loaded.model, optimizer, train_loader,
                                                                    *eval_loaders.values())
    eval_loaders = dict(zip(eval_names, prepared))

    state = TrainState()
    if resume:
        state = _resume(run, model, optimizer, scheduler)
    hooks = RunHooks(run, model, optimizer, scheduler, loaded, task, data, eval_loaders)
    if main and total_steps:
        console.print(f"training: {total_steps} steps ({spec.epochs} epochs x {updates_per_epoch}), "
                      f"batch {spec.batch_size}, {accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"precision {spec.mixed_precision}")
    started = time.perf_counter()
    state = fit(model=model, task=task, loader=train_loader, sampler=sampler, optimizer=optimizer, scheduler=scheduler,
                accelerator=accelerator, state=state, epochs=spec.epochs, total_steps=total_steps,
                grad_accum_steps=spec.grad_accum_steps, max_grad_norm=spec.max_grad_norm,
                log_every_steps=spec.log_every_steps, hooks=hooks, console=console)
    train_seconds = time.perf_counter() - started

    if state.step and state.step % updates_per_epoch:  # stopped by max_steps mid-epoch
        hooks.evaluate(state)
        hooks.checkpoint(state)
    # Decided on state alone, identical in every process (save_best waits for all of them).
    if state.best_step is None:  # no validation split, or nothing trained
        hooks.save_best()
    else:  # evaluate the selected model, not the last one
        best = load_model_folder(run_dir / MODEL_DIR)[0].model
        accelerator.unwrap_model(model).load_state_dict(best.state_dict())
    metrics = _final_metrics(run, model, task, eval_loaders, state, train_seconds)
    return RunResult(run_dir, metrics)


def _make_loaders(recipe: Recipe, data: TaskData, loaded: LoadedModel):
    """Datasets encoded once; the train loader's batch order comes from a resumable sampler."""
    datasets = {name: make_dataset(split, data.label_ids(name), loaded.preprocessor, recipe.model.max_length)
                for name, split in data.splits.items()}
    spec, workers = recipe.train, recipe.data.num_workers
    lengths = datasets["train"].lengths() if recipe.data.group_by_length and data.modality == "text" else None
    sampler = EpochBatchSampler(len(datasets["train"]), spec.batch_size, spec.seed, lengths=lengths)
    train_loader = make_loader(datasets["train"], spec.batch_size, workers, sampler)
    eval_batch = recipe.eval.batch_size or 2 * spec.batch_size
    eval_loaders = {name: make_loader(datasets[name], eval_batch, workers) for name in ("validation", "test") if name in datasets}
    return sampler, train_loader, eval_loaders


def _resume(run: Run, model, optimizer, scheduler) -> TrainState:
    checkpoints = complete_checkpoints(run.run_dir / CHECKPOINT_DIR)
    if not checkpoints:
        if run.main:
            run.console.print(f"[yellow]resume:[/] no complete checkpoint in {run.run_dir / CHECKPOINT_DIR}; starting from step 0")
        return TrainState()
    latest = checkpoints[-1]
    state = load_checkpoint(latest, run.accelerator.unwrap_model(model), optimizer, scheduler, run.accelerator.scaler)
    if run.main:
        run.console.print(f"resume: continuing from {latest} (step {state.step}, epoch {state.epoch}, "
                          f"batch {state.batch_in_epoch})")
    run.record({"type": "resume", "step": state.step, "path": str(latest.relative_to(run.run_dir))})
    return state


def _final_metrics(run: Run, model, task, eval_loaders: dict, state: TrainState, train_seconds: float) -> dict:
    splits = {}
    for name, loader in eval_loaders.items():
        logits, labels = predict_logits(model, loader, run.accelerator)
        splits[name] = task.metrics(logits, labels)
        run.record({"type": "final", "split": name, "step": state.best_step or state.step, **splits[name]})
    report_split = "test" if "test" in splits else "validation" if "validation" in splits else None
    result = {
        "report_split": report_split,
        **(splits[report_split] if report_split else {}),
        "splits": splits,
        "best_step": state.best_step,
        "selection_metric": run.recipe.eval.metric,
        "steps": state.step,
        "train_seconds": round(train_seconds, 1),
        "hardware": {"device": str(run.accelerator.device), "processes": run.accelerator.num_processes,
                     "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    if run.main:
        write_json_atomic(run.run_dir / "eval.json", result)
        for name, values in splits.items():
            summary = ", ".join(f"{k} {values[k]:.4f}" for k in SUMMARY_KEYS if values.get(k) is not None)
            run.console.print(f"final {name}: {summary}")
        run.console.print(f"run directory: {run.run_dir}")
    return result
