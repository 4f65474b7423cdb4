"""finetune(): recipe -> data + model -> loop -> run directory.

The run directory holds
  recipe.yaml      the resolved recipe (after overrides and ${VAR} expansion)
  metrics.jsonl    one record per logging step, evaluation, checkpoint and stage of the run
  model/           the best model by eval.metric, as a Hugging Face-style folder (with an adapter:
                   the adapter and head only, over the pretrained base it names)
  model-merged/    with adapter.save_merged: that model with the adapter merged in, a plain folder
  checkpoints/     the latest complete checkpoints, for --resume
  eval.json        final metrics of the best model on every evaluation split
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from rich.console import Console

from tuneforge.models.adapters import adapter_scope, apply_adapter, merged_copy
from tuneforge.training.hooks import (CHECKPOINT_DIR, FEATURE_CACHE_DIR, MERGED_DIR, MODEL_DIR, Run, RunHooks, clear_run_dir,
                                 drop_redone_records, is_run_dir, repair_run_dir, save_run_model, storage_errors,
                                 update_model_info, write_json_atomic)
from tuneforge.training.checkpoint import TrainState, complete_checkpoints, load_checkpoint, verify_checkpoint
from tuneforge.data.augment import build_augmenter
from tuneforge.data.loaders import EpochBatchSampler, balanced_weights, make_dataset, make_loader
from tuneforge.data.preflight import TaskData, load_task_data
from tuneforge.data.text_tasks import make_text_task_dataset
from tuneforge.errors import ModelError, RecipeError, ResumeError
from tuneforge.training.feature_cache import FrozenPrefix, cache_splits, choose_prefix, remove_hooks
from tuneforge.strategies.freeze import FreezePlan, build_plan
from tuneforge.models.groups import layer_groups
from tuneforge.training.loop import StepTools, fit, predict_logits
from tuneforge.training.memory import find_batch_size
from tuneforge.models.loading import LoadedModel, enable_gradient_checkpointing, load_model, restore_saved_weights
from tuneforge.strategies.optim import L2SP, build_optimizer
from tuneforge.config import TEXT_TASKS, Recipe, load_recipe, read_yaml
from tuneforge.strategies.schedules import PlateauState
from tuneforge.tasks import Task, make_task


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
    # Accelerate keeps its settings in a process-wide singleton; forget the previous run's
    # (precision, device) so several runs can follow each other in one Python session.
    AcceleratorState._reset_state()
    # With frozen parameters, DDP must not wait for gradients that never come.
    freezes = recipe.model.freeze.strategy != "full" or recipe.model.freeze.exclude
    accelerator = Accelerator(mixed_precision=spec.mixed_precision, cpu=on_cpu,
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(freezes))])
    if spec.batch_size != "auto" and spec.batch_size % accelerator.num_processes:
        raise RecipeError([f"train.batch_size {spec.batch_size} is not divisible by the {accelerator.num_processes} processes"])
    return accelerator


def _check_run_dir(recipe: Recipe, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before anything is loaded: never clobber a run by accident, never write into (or delete from) a folder
    that is not a run directory, never resume an incompatible run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError([f"output directory {run_dir} is a file; choose a folder with --output-dir or output.dir"])
    has_run = run_dir.is_dir() and is_run_dir(run_dir)
    foreign = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() and not has_run else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RecipeError([f"output directory {run_dir} is not a tuneforge run directory (it holds {shown}); a run goes "
                           "into a new or empty folder, or replaces an earlier run (--overwrite): choose another "
                           "--output-dir"])
    if has_run and not resume and not overwrite:
        raise RecipeError([f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                           "or choose another --output-dir"])
    if resume and has_run:
        _check_resumable(read_yaml(run_dir / "recipe.yaml"), recipe)


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory (main process only), once data and model are known to be good."""
    has_run = run_dir.is_dir() and is_run_dir(run_dir)
    if overwrite and has_run:
        kept = clear_run_dir(run_dir)  # what the earlier run wrote, and nothing else
        if kept:
            print(f"overwrite: kept what the earlier run did not write: {', '.join(kept)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and has_run:
        for repair in repair_run_dir(run_dir):
            print(f"resume: {repair}")
    else:
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())


def _check_resumable(saved: dict, recipe: Recipe) -> None:
    """Refuse a resume that cannot continue the saved run; list harmless differences."""
    current = recipe.model_dump(mode="json")
    breaking = [f"{section}.{key}" for section in ("model", "task") for key in current[section]
                if saved.get(section, {}).get(key) != current[section][key]]
    breaking += [f"data.{key}" for key in ("train", "text_column", "label_column", "format", "max_train_examples",
                                           "split_seed", "validation_fraction", "test_fraction", "target_column",
                                           "source_language", "target_language", "prompt_column", "response_column")
                 if saved.get("data", {}).get(key) != current["data"][key]]
    breaking += [f"train.{key}" for key in ("batch_size", "grad_accum_steps", "seed")
                 if saved.get("train", {}).get(key) not in (current["train"][key], None) and current["train"][key] != "auto"]
    if breaking:
        raise ResumeError([f"the recipe changed in a way a resumed run cannot follow: {', '.join(breaking)}; "
                           "start a new run (another --output-dir) instead"])
    harmless = [f"{section}.{key}" for section, values in current.items() if isinstance(values, dict)
                for key in values if saved.get(section, {}).get(key) != values[key]]
    if harmless:
        print(f"resume: continuing although these settings changed: {', '.join(harmless)}")


def load_data_and_model(recipe: Recipe, console: Console, main: bool):
    data = load_task_data(recipe.data, recipe.task)
    loaded = load_model(recipe.model, data.label_names, recipe.data.image, recipe.task.type)
    apply_adapter(loaded, recipe.adapter, recipe.model, recipe.data.image)
    if loaded.base is not None:  # an adapter folder rebuilds its base with the task's head
        loaded.base["task"] = recipe.task.type
    config = getattr(loaded.model, "config", None)
    problem = {"classification": "single_label_classification", "regression": "regression",
               "multilabel": "multi_label_classification"}.get(data.kind)
    if problem and config is not None and hasattr(config, "problem_type"):  # transformers' own loss matches, after export
        config.problem_type = problem
    if loaded.modality != data.modality:
        raise ModelError([f"model {recipe.model.name or recipe.model.factory} takes {loaded.modality} input but "
                          f"data.train is {data.modality} data; choose a model for {data.modality} input or other data"])
    positions = getattr(getattr(loaded.model, "config", None), "max_position_embeddings", None)
    if data.modality == "text" and positions and recipe.model.max_length > positions:
        raise ModelError([f"model.max_length {recipe.model.max_length} is more than the {positions} positions this model "
                          f"has; set model.max_length to at most {positions}"])
    if main:
        for note in data.notes:
            console.print(f"[yellow]data:[/] {note}")
        sizes = ", ".join(f"{name} {len(split)}" for name, split in data.splits.items())
        labels = f"{len(data.labels)} labels ({_first_few(data.label_names)})" if data.labels else data.kind
        console.print(f"data: {data.modality}, {labels}; {sizes}")
        console.print(f"model: {loaded.report.summary()}")
    return data, loaded


def _first_few(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f", … (+{len(names) - shown})" if len(names) > shown else "")


def training_length(batches_per_epoch: int, spec) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for a train spec."""
    updates_per_epoch = -(-batches_per_epoch // spec.grad_accum_steps)
    return updates_per_epoch, min(spec.max_steps or 10**12, spec.epochs * updates_per_epoch)


@dataclass
class Assembly:
    """Everything a training run is made of, built and checked before anything is written."""

    data: TaskData
    loaded: LoadedModel
    task: Task
    sampler: EpochBatchSampler
    train_loader: object
    eval_loaders: dict
    groups: list
    updates_per_epoch: int
    total_steps: int
    plan: FreezePlan
    plateau: PlateauState | None
    optimizer: object
    scheduler: object
    tools: StepTools
    datasets: dict
    prefix: FrozenPrefix | None  # what the feature cache will compute once, if anything


def assemble(recipe: Recipe, accelerator: Accelerator, console: Console, run_dir: Path, resume: bool) -> Assembly:
    """Data, model, task, loaders, freezing plan and optimizer, as `train` (and `lr-find`) use them.

    Resolves train.batch_size: auto into the recipe. Raises on any problem; writes nothing.
    """
    data, loaded = load_data_and_model(recipe, console, accelerator.is_main_process)
    saved_info = run_dir / MODEL_DIR / "tuneforge.json"
    saved_labels = json.loads(saved_info.read_text())["label_values"] if resume and saved_info.exists() else None
    if saved_labels is not None and saved_labels != data.labels:
        raise ResumeError([f"the label set changed since {run_dir} was trained ({saved_labels} -> {data.labels}); "
                           "a resumed run cannot change its classes: start a new run"])
    task = make_task(recipe, data, loaded.preprocessor)
    datasets = make_datasets(recipe, data, loaded)
    for name, dataset in datasets.items():  # e.g. overlong texts cut to the model's limit: counted, never a crash
        for note in getattr(dataset, "notes", []):
            data.notes.append(note)
            if accelerator.is_main_process:
                console.print(f"[yellow]data:[/] {note}")
    for split in data.splits.values():  # tokenised into memory-mapped arrays: the raw texts need not stay in memory
        split.texts = split.text_pairs = None
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    if recipe.train.batch_size == "auto":
        recipe.train.batch_size = auto_batch_size(recipe, run_dir, resume, loaded, task, datasets["train"], groups,
                                                   accelerator, console)
    sampler, train_loader, eval_loaders = make_loaders(recipe, data, datasets)
    updates_per_epoch, total_steps = training_length(sampler.batches_per_epoch, recipe.train)
    plan = build_plan(recipe.model.freeze, groups, loaded.head_prefixes, updates_per_epoch, total_steps,
                      adapter_scope(loaded))
    plateau = _plateau(recipe, data)
    optimizer, scheduler = build_optimizer(loaded.model, groups, plan, recipe.optim, max(total_steps, 1), plateau)
    # L2-SP snapshots the pretrained weights now, before a checkpoint can replace them.
    tools = StepTools(augment=make_augmenter(recipe, data, loaded, accelerator.device),
                      penalty=make_l2sp(recipe, loaded, plan))
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(loaded)
    prefix, why_not = choose_prefix(recipe.train.cache_features, plan, loaded.model, tools.augment is not None,
                                    accelerator.num_processes)
    if data.kind not in ("classification", "regression", "multilabel"):  # masks, boxes, token targets: not cached
        prefix, why_not = None, f"the feature cache does not store {data.kind} targets"
    if recipe.train.cache_features is True and prefix is None:
        raise RecipeError([f"train.cache_features is true but there is nothing to cache: {why_not}; "
                           "set it to auto (cache when possible) or false"])
    return Assembly(data, loaded, task, sampler, train_loader, eval_loaders, groups, updates_per_epoch, total_steps,
                    plan, plateau, optimizer, scheduler, tools, datasets, prefix)


def make_datasets(recipe: Recipe, data: TaskData, loaded: LoadedModel) -> dict:
    if data.kind in TEXT_TASKS:
        return {name: make_text_task_dataset(split, data.kind, loaded.preprocessor, recipe)
                for name, split in data.splits.items()}
    boxes_moved = box_augmenter(recipe, data, loaded)
    return {name: make_dataset(split, data.targets(name), loaded.preprocessor, recipe.model.max_length, data.kind,
                               data.labels, boxes_moved if name == "train" else None)
            for name, split in data.splits.items()}


def use_feature_cache(recipe: Recipe, t: Assembly, run: Run, accelerator: Accelerator) -> list:
    """Swap the train and validation loaders for cached ones; returns the replay hooks to remove at the end."""
    started = time.perf_counter()
    model = t.loaded.model.to(accelerator.device)
    splits = {name: t.datasets[name] for name in ("train", "validation") if name in t.datasets}
    eval_batch = recipe.eval.batch_size or 2 * recipe.train.batch_size
    try:
        with storage_errors(run.run_dir / FEATURE_CACHE_DIR):  # a full disk: a clear message, nothing else lost
            cached, handles = cache_splits(model, t.prefix, splits, run.run_dir / FEATURE_CACHE_DIR, eval_batch,
                                           accelerator.device, recipe.data.num_workers)
    except (ValueError, TypeError) as error:
        if recipe.train.cache_features is True:
            raise ModelError([f"train.cache_features: {error}; set it to auto or false"]) from None
        run.console.print(f"[yellow]feature cache: off ({error})[/]")
        return []
    t.train_loader = make_loader(cached["train"], recipe.train.batch_size, recipe.data.num_workers, t.sampler)
    if "validation" in cached:
        t.eval_loaders["validation"] = make_loader(cached["validation"], eval_batch, recipe.data.num_workers)
    seconds = time.perf_counter() - started
    blocks = t.prefix.groups[1:]
    covered = f"{t.prefix.groups[0]} + {blocks[0]}" + (f"…{blocks[-1]}" if len(blocks) > 1 else "")
    if run.main:
        run.console.print(f"feature cache: {covered} computed once for {', '.join(cached)} "
                          f"({seconds:.1f} s); training runs only the layers after it")
    run.record({"type": "feature_cache", "groups": t.prefix.groups, "boundary": t.prefix.boundary,
                "splits": {name: len(dataset) for name, dataset in cached.items()}, "seconds": round(seconds, 2)})
    return handles


def finetune(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, output_dir: str | Path | None = None,
             resume: bool = False, overwrite: bool = False, console: Console | None = None) -> RunResult:
    """Fine-tune as the recipe says; returns the run directory and the final metrics (eval.json)."""
    recipe = load_recipe(recipe, overrides)
    if output_dir is not None:
        recipe.output.dir = str(output_dir)
    run_dir = recipe.output_dir()
    accelerator = make_accelerator(recipe)
    console = console or Console()
    _check_run_dir(recipe, run_dir, resume, overwrite)
    set_seed(recipe.train.seed)
    t = assemble(recipe, accelerator, console, run_dir, resume)  # every check, before any file is written
    # Every check has passed: only now does the run directory appear.
    if accelerator.is_main_process:
        _prepare_run_dir(recipe, run_dir, resume, overwrite)  # the resolved recipe, batch size included
    accelerator.wait_for_everyone()
    run = Run(recipe, run_dir, accelerator, console)
    replay_hooks = use_feature_cache(recipe, t, run, accelerator) if t.prefix is not None else []
    with remove_hooks(replay_hooks):
        result = _train_and_evaluate(recipe, t, run, accelerator, resume, cached=bool(replay_hooks))
    if accelerator.is_main_process:  # only an interrupted run, resumed, would read the cache again
        shutil.rmtree(run_dir / FEATURE_CACHE_DIR, ignore_errors=True)
    return result


def _train_and_evaluate(recipe: Recipe, t: Assembly, run: Run, accelerator: Accelerator, resume: bool,
                        cached: bool) -> RunResult:
    data, loaded, task, spec, plan, plateau = t.data, t.loaded, t.task, recipe.train, t.plan, t.plateau
    optimizer, scheduler, train_loader, eval_loaders = t.optimizer, t.scheduler, t.train_loader, t.eval_loaders
    updates_per_epoch, total_steps, eval_names = t.updates_per_epoch, t.total_steps, list(t.eval_loaders)
    run_dir, main, console = run.run_dir, run.main, run.console
    if spec.compile:
        if cached:
            console.print("[yellow]train.compile: skipped, the feature cache already removes the frozen layers' work[/]")
        else:
            loaded.model.compile()  # in place: parameter names and state dicts stay as they are
    model, optimizer, train_loader, *prepared = accelerator.prepare(loaded.model, optimizer, train_loader,
                                                                    *eval_loaders.values())
    eval_loaders = dict(zip(eval_names, prepared))

    state = _resume(run, model, optimizer, scheduler) if resume else TrainState()
    if plateau is not None and state.plateau:
        plateau.load_state_dict(state.plateau)
    hooks = RunHooks(run, model, optimizer, scheduler, loaded, task, data, eval_loaders, plan, plateau)
    if main:
        total = sum(p.numel() for p in loaded.model.parameters())
        trained = sum(p.numel() for n, p in loaded.model.named_parameters() if n in hooks.trained)
        adapter = f" ({recipe.adapter.method} adapter)" if recipe.adapter.enabled else ""
        console.print(f"parameters: {trained:,} of {total:,} train ({trained / total:.2%}){adapter}")
        run.record({"type": "parameters", "trainable": trained, "total": total, "adapter": recipe.adapter.method})
        # What the model card says about the data and the base model comes from this record.
        run.record({"type": "data", "modality": data.modality, "notes": data.notes,
                    "splits": {name: {"source": split.source, "examples": len(split)} for name, split in data.splits.items()},
                    **_train_target_summary(data), "model_load": loaded.report.summary()})
    if main and total_steps:
        console.print(f"training: {total_steps} steps ({spec.epochs} epochs x {updates_per_epoch}), "
                      f"batch {spec.batch_size}, {accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"precision {spec.mixed_precision}, freezing {plan.strategy}")
    started = time.perf_counter()
    state = fit(model=model, task=task, loader=train_loader, sampler=t.sampler, optimizer=optimizer, scheduler=scheduler,
                accelerator=accelerator, plan=plan, state=state, epochs=spec.epochs, total_steps=total_steps,
                grad_accum_steps=spec.grad_accum_steps, max_grad_norm=spec.max_grad_norm,
                log_every_steps=spec.log_every_steps, hooks=hooks, tools=t.tools, console=console)
    train_seconds = time.perf_counter() - started

    if state.batch_in_epoch:  # stopped inside an epoch (max_steps or early stopping)
        if not state.stopped_early:
            hooks.evaluate(state)
        hooks.checkpoint(state)
    # Decided on state alone, identical in every process (save_best waits for all of them).
    if state.best_step is None:  # no validation split, or nothing trained
        hooks.save_best()
    else:  # evaluate the selected model, not the last one
        restore_saved_weights(accelerator.unwrap_model(model), run_dir / MODEL_DIR)
    if recipe.task.type == "multilabel" and recipe.task.threshold == "tune" and "validation" in eval_loaders:
        threshold = task.tune(*predict_logits(model, eval_loaders["validation"], accelerator))
        if main:
            update_model_info(run_dir / MODEL_DIR, task.info)
            console.print(f"threshold: {threshold} (best micro F1 on validation)")
        run.record({"type": "threshold", "value": threshold})
    metrics = _final_metrics(run, model, task, eval_loaders, state, train_seconds)
    if recipe.adapter.save_merged and main:
        with storage_errors(run_dir / MERGED_DIR):
            merged = dataclasses.replace(loaded, model=merged_copy(accelerator.unwrap_model(model)), base=None)
            save_run_model(merged, run_dir / MERGED_DIR, data, recipe, task)
        console.print(f"merged model (adapter folded into the weights): {run_dir / MERGED_DIR}")
    return RunResult(run_dir, metrics)


def _train_target_summary(data: TaskData) -> dict:
    """For the model card: examples per class (per label for multilabel), or each target's mean and range."""
    if data.kind in TEXT_TASKS:
        return {"train_examples": len(data.splits["train"])}
    if data.kind == "segmentation":  # pixel counts would mean reading every mask again
        return {"train_images": len(data.splits["train"])}
    if data.kind == "detection":
        counts = {name: 0 for name in data.labels}
        for boxes in data.splits["train"].labels:
            for box in boxes:
                counts[box[0]] += 1
        return {"train_class_counts": dict(zip(data.label_names, counts.values())),
                "train_images": len(data.splits["train"])}
    targets = torch.tensor(data.targets("train"))
    if data.kind == "regression":
        return {"train_targets": {name: {"mean": float(column.mean()), "min": float(column.min()), "max": float(column.max())}
                                  for name, column in zip(data.label_names, targets.T)}}
    counts = targets.sum(0) if data.kind == "multilabel" else torch.bincount(targets, minlength=len(data.labels))
    return {"train_class_counts": dict(zip(data.label_names, [int(c) for c in counts]))}


def _plateau(recipe: Recipe, data: TaskData) -> PlateauState | None:
    if recipe.optim.schedule.name != "plateau":
        return None
    if "validation" not in data.splits:
        raise RecipeError(["optim.schedule plateau lowers the LR when eval.metric stops improving on validation; "
                           "give data.validation or data.validation_fraction"])
    return PlateauState(recipe.optim.schedule, recipe.eval.mode)


def box_augmenter(recipe: Recipe, data: TaskData, loaded: LoadedModel):
    """Detection: flips, shifts and zooms that move the boxes with the pixels, applied per training image."""
    if data.kind != "detection" or not recipe.data.augment.is_active:
        return None
    from tuneforge.data.detection import BoxAugmenter

    return BoxAugmenter(recipe.data.augment, loaded.preprocessor.image_mean, loaded.preprocessor.image_std)


def make_augmenter(recipe: Recipe, data: TaskData, loaded: LoadedModel, device):
    """Batch augmentation for training batches only (evaluation never sees it). Detection augments in its
    dataset instead (box_augmenter), since boxes must move with the pixels."""
    spec = recipe.data.augment
    if not spec.is_active or data.kind == "detection":
        return None
    if data.modality != "image":
        raise RecipeError(["data.augment applies to images; this data is text"])
    processor = loaded.preprocessor
    augmenter = build_augmenter(spec, processor.image_mean, processor.image_std, len(data.labels)).to(device)

    def augment(batch: dict) -> dict:
        pixels, targets = augmenter(batch["inputs"]["pixel_values"], batch["labels"])
        return {**batch, "inputs": {**batch["inputs"], "pixel_values": pixels}, "labels": targets}

    return augment


def make_l2sp(recipe: Recipe, loaded: LoadedModel, plan: FreezePlan) -> L2SP | None:
    if not recipe.optim.l2sp:
        return None
    head = {name for name, _ in loaded.model.named_parameters()
            if any(name.startswith(prefix + ".") for prefix in loaded.head_prefixes)}
    return L2SP(loaded.model, recipe.optim.l2sp, plan.ever_trainable() - head)


def auto_batch_size(recipe: Recipe, run_dir: Path, resume: bool, loaded: LoadedModel, task, train_set, groups,
                     accelerator: Accelerator, console: Console) -> int:
    """Probe the largest batch that fits; a resumed run keeps the size it started with."""
    saved = run_dir / "recipe.yaml"
    if resume and saved.exists():
        return int(read_yaml(saved)["train"]["batch_size"])
    plan = build_plan(recipe.model.freeze, groups, loaded.head_prefixes, updates_per_epoch=1, total_steps=10**9,
                      adapter_params=adapter_scope(loaded))
    plan.apply(loaded.model, 0)
    loaded.model.to(accelerator.device)
    per_process, tried = find_batch_size(loaded.model, task, train_set, accelerator.device,
                                         lambda: plan.train_mode(loaded.model, 0))
    # Every process must agree: take the smallest.
    per_process = int(accelerator.gather(torch.tensor([per_process], device=accelerator.device)).min())
    if accelerator.is_main_process:
        verdicts = ", ".join(f"{size} {'fits' if fits else 'too big'}" for size, fits in tried)
        console.print(f"batch size auto: {per_process * accelerator.num_processes} (tried per process: {verdicts})")
    return per_process * accelerator.num_processes


def make_loaders(recipe: Recipe, data: TaskData, datasets: dict):
    """The train loader's batch order comes from a resumable sampler; evaluation goes in order."""
    spec, workers = recipe.train, recipe.data.num_workers
    lengths = datasets["train"].lengths() if recipe.data.group_by_length and data.modality == "text" else None
    weights = balanced_weights(data.targets("train")) if recipe.data.sampler == "balanced" else None
    sampler = EpochBatchSampler(len(datasets["train"]), spec.batch_size, spec.seed, lengths=lengths, weights=weights)
    train_loader = make_loader(datasets["train"], spec.batch_size, workers, sampler)
    eval_batch = recipe.eval.batch_size or 2 * spec.batch_size
    eval_loaders = {name: make_loader(datasets[name], eval_batch, workers) for name in ("validation", "test") if name in datasets}
    return sampler, train_loader, eval_loaders


def _resume(run: Run, model, optimizer, scheduler) -> TrainState:
    """Continue from the newest checkpoint that verifies; a corrupt one is skipped (or refused when strict)."""
    def say(message: str) -> None:
        if run.main:
            run.console.print(message)

    for folder in reversed(complete_checkpoints(run.run_dir / CHECKPOINT_DIR)):
        problem = verify_checkpoint(folder, run.accelerator.unwrap_model(model), optimizer)
        if problem is not None:
            if run.recipe.train.strict_resume:
                raise ResumeError([f"checkpoint {folder} is damaged ({problem}); train.strict_resume forbids "
                                   "falling back to an older one"])
            say(f"[yellow]resume: skipping damaged checkpoint {folder}: {problem}[/]")
            run.record({"type": "skipped_checkpoint", "path": str(folder.relative_to(run.run_dir)), "why": problem})
            continue
        state, warnings = load_checkpoint(folder, run.accelerator.unwrap_model(model), optimizer, scheduler,
                                          run.accelerator.scaler)
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
        with storage_errors(run.run_dir / "eval.json"):
            write_json_atomic(run.run_dir / "eval.json", result)
        for name, values in splits.items():
            summary = ", ".join(f"{k} {values[k]:.4f}" for k in task.summary_keys if values.get(k) is not None)
            run.console.print(f"final {name}: {summary}")
        run.console.print(f"run directory: {run.run_dir}")
    return result
