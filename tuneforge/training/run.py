"""finetune(): recipe -> data + model -> loop -> run directory (its layout: artifacts.py).

Every check runs first (assembly.py); only then does the run directory appear. Training goes through the
one loop (loop.fit) with the hooks that write the run's records, pick the best model and checkpoint it;
at the end the best model is evaluated on every split (eval.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from tuneforge.artifacts import (
    CHECKPOINT_DIR,
    EVAL_FILE,
    FEATURE_CACHE_DIR,
    MERGED_DIR,
    MODEL_DIR,
    drop_redone_records,
    update_task_state,
    write_json_atomic,
)
from tuneforge.config import Recipe, load_recipe
from tuneforge.data.loaders import make_loader
from tuneforge.errors import ModelError, ResumeError, first_line
from tuneforge.models.adapters import merged_copy
from tuneforge.models.folder import restore_saved_weights
from tuneforge.training.advise import resolve_auto
from tuneforge.training.assembly import Assembly, assemble, make_accelerator
from tuneforge.training.checkpoint import TrainState, complete_checkpoints, load_checkpoint, verify_checkpoint
from tuneforge.training.feature_cache import cache_splits, remove_hooks
from tuneforge.training.hooks import Run, RunHooks, save_run_model, storage_errors
from tuneforge.training.loop import fit
from tuneforge.training.run_dir import check_run_dir, prepare_run_dir


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict  # the content of eval.json


@dataclass(frozen=True)
class TrialLink:
    """What a run of a search (tune.py) needs from it: splits kept out of the final evaluation (the test split:
    trials are compared on validation only), a call after each validation (a pruner's report, which may stop the
    run by raising), and a feature cache folder shared by the trials, kept after the run."""

    held_out: tuple[str, ...] = ("test",)
    on_validation: Callable[[float, dict], None] | None = None  # (epochs trained, validation metrics)
    feature_cache: Path | None = None


def finetune(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, output_dir: str | Path | None = None,
             resume: bool = False, overwrite: bool = False, console: Console | None = None,
             trial: TrialLink | None = None) -> RunResult:
    """Fine-tune as the recipe says; returns the run directory and the final metrics (eval.json)."""
    recipe = load_recipe(recipe, overrides)
    if output_dir is not None:
        recipe.output.dir = str(output_dir)
    run_dir = recipe.output_dir()
    console = console or Console()
    if recipe.model.freeze.strategy == "auto" and not resume:
        check_run_dir(recipe, run_dir, resume, overwrite)  # before a minute of measuring, not after it
    recipe, advice = resolve_auto(recipe, run_dir, resume, console)
    accelerator = make_accelerator(recipe)
    check_run_dir(recipe, run_dir, resume, overwrite)
    set_seed(recipe.train.seed)
    t = assemble(recipe, accelerator, console, run_dir, resume)  # every check, before any file is written
    # Every check has passed: only now does the run directory appear.
    if accelerator.is_main_process:
        prepare_run_dir(recipe, run_dir, resume, overwrite)  # the resolved recipe, batch size included
    accelerator.wait_for_everyone()
    run = Run(recipe, run_dir, accelerator, console, trial or TrialLink(held_out=()))
    if advice is not None:
        run.record(advice.record())  # what strategy: auto chose, and why (the model card says it too)
    cache = run.trial.feature_cache or run_dir / FEATURE_CACHE_DIR
    t, replay_hooks = use_feature_cache(recipe, t, run, accelerator, cache) if t.prefix is not None else (t, [])
    with remove_hooks(replay_hooks):
        result = _train_and_evaluate(recipe, t, run, accelerator, resume, cached=bool(replay_hooks))
    if accelerator.is_main_process and run.trial.feature_cache is None:  # only a resumed run would read it again
        shutil.rmtree(cache, ignore_errors=True)
    return result


def prefix_inputs_key(recipe: Recipe) -> str:
    """What a frozen prefix's outputs depend on besides its depth: the data and the model's settings (a study
    that searches max_length or the training sample must not share one store between trials that differ)."""
    model = recipe.model.model_dump(mode="json", exclude={"freeze", "head_dropout"})
    inputs = {"data": recipe.data.model_dump(mode="json"), "task": recipe.task.model_dump(mode="json"), "model": model}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def use_feature_cache(recipe: Recipe, t: Assembly, run: Run, accelerator: Accelerator,
                      folder: Path) -> tuple[Assembly, list]:
    """The assembly with its train and validation loaders reading the cache in `folder`, and the replay hooks to
    remove at the end (the assembly as it was, and none, when the cache cannot be used)."""
    started = time.perf_counter()
    model = t.loaded.model.to(accelerator.device)
    splits = {name: t.loaders.datasets[name] for name in ("train", "validation") if name in t.loaders.datasets}
    eval_batch = recipe.eval.batch_size or 2 * recipe.train.batch_size
    try:
        with storage_errors(folder):  # a full disk: a clear message, nothing else lost
            # A study's shared cache holds one store per prefix (trials freeze different depths).
            where = folder / f"{t.prefix.boundary}-{prefix_inputs_key(recipe)}" if run.trial.feature_cache else folder
            cached, handles = cache_splits(model, t.prefix, splits, where, eval_batch,
                                           accelerator.device, recipe.data.num_workers)
    except (ValueError, TypeError) as error:
        if recipe.train.cache_features is True:
            raise ModelError([f"train.cache_features: {error}; set it to auto or false"]) from None
        run.console.print(f"[yellow]feature cache: off ({error})[/]")
        return t, []
    evaluation = dict(t.loaders.evaluation)
    if "validation" in cached:
        evaluation["validation"] = make_loader(cached["validation"], eval_batch, recipe.data.num_workers)
    train = make_loader(cached["train"], recipe.train.batch_size, recipe.data.num_workers, t.loaders.sampler)
    t = dataclasses.replace(t, loaders=dataclasses.replace(t.loaders, train=train, evaluation=evaluation))
    seconds = time.perf_counter() - started
    blocks = t.prefix.groups[1:]
    covered = f"{t.prefix.groups[0]} + {blocks[0]}" + (f"…{blocks[-1]}" if len(blocks) > 1 else "")
    if run.main:
        run.console.print(f"feature cache: {covered} computed once for {', '.join(cached)} "
                          f"({seconds:.1f} s); training runs only the layers after it")
    run.record({"type": "feature_cache", "groups": t.prefix.groups, "boundary": t.prefix.boundary,
                "splits": {name: len(dataset) for name, dataset in cached.items()}, "seconds": round(seconds, 2)})
    return t, handles


def _train_and_evaluate(recipe: Recipe, t: Assembly, run: Run, accelerator: Accelerator, resume: bool,
                        cached: bool) -> RunResult:
    spec, o = recipe.train, t.optimization
    if spec.compile:
        if cached:
            run.console.print("[yellow]train.compile: skipped, the feature cache already removes the frozen layers' work[/]")
        else:
            t.loaded.model.compile()  # in place: parameter names and state dicts stay as they are
    evaluation = {name: loader for name, loader in t.loaders.evaluation.items() if name not in run.trial.held_out}
    names = list(evaluation)
    model, optimizer, train_loader, *prepared = accelerator.prepare(t.loaded.model, o.optimizer, t.loaders.train,
                                                                    *evaluation.values())
    eval_loaders = dict(zip(names, prepared))
    state = _resume(run, model, optimizer, o.scheduler) if resume else TrainState()
    if o.plateau is not None and state.plateau:
        o.plateau.load_state_dict(state.plateau)
    hooks = RunHooks(run, model, optimizer, o.scheduler, t.loaded, t.task, t.data, eval_loaders, o.plan, o.plateau)
    hooks.batches_per_epoch = len(train_loader)
    _record_start(recipe, t, run, hooks, accelerator)
    started = time.perf_counter()
    state = fit(model=model, task=t.task, loader=train_loader, sampler=t.loaders.sampler, optimizer=optimizer,
                scheduler=o.scheduler, accelerator=accelerator, plan=o.plan, state=state, epochs=spec.epochs,
                total_steps=o.total_steps, grad_accum_steps=spec.grad_accum_steps, max_grad_norm=spec.max_grad_norm,
                log_every_steps=spec.log_every_steps, hooks=hooks, tools=o.tools, console=run.console)
    train_seconds = time.perf_counter() - started
    _keep_best(run, hooks, model, state, accelerator)
    decided = t.task.after_training(model, eval_loaders, accelerator)  # e.g. a threshold, chosen on validation
    if decided is not None:
        record, message = decided
        if run.main:
            with storage_errors(run.run_dir / MODEL_DIR):
                update_task_state(run.run_dir / MODEL_DIR, t.task.state)
            run.console.print(message)
        run.record(record)
    metrics = _final_metrics(run, model, t.task, eval_loaders, state, train_seconds)
    if recipe.adapter.save_merged and run.main:
        with storage_errors(run.run_dir / MERGED_DIR):
            merged = dataclasses.replace(t.loaded, model=merged_copy(accelerator.unwrap_model(model)), base=None)
            save_run_model(merged, run.run_dir / MERGED_DIR, t.data, recipe, t.task)
        run.console.print(f"merged model (adapter folded into the weights): {run.run_dir / MERGED_DIR}")
    return RunResult(run.run_dir, metrics)


def _record_start(recipe: Recipe, t: Assembly, run: Run, hooks: RunHooks, accelerator: Accelerator) -> None:
    """What the run trains, on what data (the model card's source), and for how long."""
    if not run.main:
        return
    model, data, o = t.loaded.model, t.data, t.optimization
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for n, p in model.named_parameters() if n in hooks.trained)
    adapter = f" ({recipe.adapter.method} adapter)" if recipe.adapter.enabled else ""
    run.console.print(f"parameters: {trained:,} of {total:,} train ({trained / total:.2%}){adapter}")
    run.record({"type": "parameters", "trainable": trained, "total": total, "adapter": recipe.adapter.method})
    run.record({"type": "data", "modality": data.modality, "notes": data.notes,
                "splits": {name: {"source": split.source, "examples": len(split)} for name, split in data.splits.items()},
                **t.task.train_summary(data), "model_load": t.loaded.report.summary()})
    if o.total_steps:
        spec = recipe.train
        run.console.print(f"training: {o.total_steps} steps ({spec.epochs} epochs x {o.updates_per_epoch}), "
                          f"batch {spec.batch_size}, {accelerator.num_processes} process(es) on {accelerator.device}, "
                          f"precision {spec.mixed_precision}, freezing {o.plan.strategy}")


def _keep_best(run: Run, hooks: RunHooks, model, state: TrainState, accelerator: Accelerator) -> None:
    """After the loop: the model to evaluate is the best one saved (or, without a validation split, the last)."""
    if state.batch_in_epoch:  # stopped inside an epoch (max_steps or early stopping)
        if not state.stopped_early:
            hooks.evaluate(state)
        hooks.checkpoint(state)
    # Decided on state alone, identical in every process (save_best waits for all of them).
    if state.best_step is None:  # no validation split, or nothing trained
        hooks.save_best()
    else:  # evaluate the selected model, not the last one
        restore_saved_weights(accelerator.unwrap_model(model), run.run_dir / MODEL_DIR)


def _resume(run: Run, model, optimizer, scheduler) -> TrainState:
    """Continue from the newest checkpoint that verifies; a corrupt one is skipped (or refused when strict)."""
    def say(message: str) -> None:
        if run.main:
            run.console.print(message)

    for folder in reversed(complete_checkpoints(run.run_dir / CHECKPOINT_DIR)):
        problem = verify_checkpoint(folder, run.accelerator.unwrap_model(model), optimizer, scheduler)
        if problem is not None:
            if run.recipe.train.strict_resume:
                raise ResumeError([f"checkpoint {folder} is damaged ({problem}); train.strict_resume forbids "
                                   "falling back to an older one"])
            say(f"[yellow]resume: skipping damaged checkpoint {folder}: {problem}[/]")
            run.record({"type": "skipped_checkpoint", "path": str(folder.relative_to(run.run_dir)), "why": problem})
            continue
        try:
            state, warnings = load_checkpoint(folder, run.accelerator.unwrap_model(model), optimizer, scheduler,
                                              run.accelerator.scaler)
        except Exception as error:  # verified, yet not restorable: the model may be half-restored, so no fallback
            raise ResumeError([f"checkpoint {folder} passed its checks but could not be restored ({type(error).__name__}: "
                               f"{first_line(error)}); remove it to resume from an older one"]) from None
        for warning in warnings:
            say(f"[yellow]resume: {warning}[/]")
        say(f"resume: continuing from {folder} (step {state.step}, epoch {state.epoch}, batch {state.batch_in_epoch})")
        dropped = 0
        if run.main:
            with storage_errors(run.metrics_file):
                dropped = drop_redone_records(run.metrics_file, state.step)
        run.record({"type": "resume", "step": state.step, "path": str(folder.relative_to(run.run_dir)),
                    "warnings": warnings, "dropped_records": dropped})
        return state
    say(f"[yellow]resume:[/] no usable checkpoint in {run.run_dir / CHECKPOINT_DIR}; starting from step 0")
    if run.main:  # everything the interrupted attempt recorded is redone
        with storage_errors(run.metrics_file):
            drop_redone_records(run.metrics_file, 0)
    return TrainState()


def _final_metrics(run: Run, model, task, eval_loaders: dict, state: TrainState, train_seconds: float) -> dict:
    splits = {}
    for name, loader in eval_loaders.items():
        splits[name] = task.evaluate(model, loader, run.accelerator)
        run.record({"type": "final", "split": name, "step": state.best_step or state.step, **splits[name]})
    report_split = "test" if "test" in splits else "validation" if "validation" in splits else None
    result = {
        "report_split": report_split,
        **(splits[report_split] if report_split else {}),
        "splits": splits,
        "best_step": state.best_step,
        "selection_metric": run.recipe.eval.metric,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "nonfinite_skipped": state.nonfinite_skipped,
        "stopped_early": state.stopped_early,
        "train_seconds": round(train_seconds, 1),
        "hardware": {"device": str(run.accelerator.device), "processes": run.accelerator.num_processes,
                     "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    if run.main:
        with storage_errors(run.run_dir / EVAL_FILE):
            write_json_atomic(run.run_dir / EVAL_FILE, result)
        for name, values in splits.items():
            summary = ", ".join(f"{k} {values[k]:.4f}" for k in task.summary_keys if values.get(k) is not None)
            run.console.print(f"final {name}: {summary}")
        run.console.print(f"run directory: {run.run_dir}")
    return result
