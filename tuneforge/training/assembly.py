"""Everything a training run is made of, built and checked before anything is written: the data read by the
task, the model with its head (and adapter), the datasets and loaders, the freezing plan, the optimizer and
its schedule. `train` and `lr-find` both start here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from rich.console import Console

from tuneforge.artifacts import INFO_FILE, MODEL_DIR, RECIPE_FILE, read_model_info
from tuneforge.config import Recipe, read_yaml
from tuneforge.data.augment import build_augmenter
from tuneforge.data.common import TaskData, read_task_data
from tuneforge.data.loaders import EpochBatchSampler, balanced_weights, make_loader
from tuneforge.errors import ModelError, RecipeError, ResumeError
from tuneforge.models.adapters import adapter_scope, apply_adapter
from tuneforge.models.groups import LayerGroup, layer_groups
from tuneforge.models.loading import LoadedModel, enable_gradient_checkpointing
from tuneforge.strategies.freeze import FreezePlan, build_plan
from tuneforge.strategies.optim import L2SP, build_optimizer
from tuneforge.strategies.schedules import PlateauState
from tuneforge.tasks.base import Task
from tuneforge.tasks.registry import get_task
from tuneforge.training.feature_cache import FrozenPrefix, choose_prefix
from tuneforge.training.loop import StepTools
from tuneforge.training.memory import find_batch_size


@dataclass(frozen=True)
class Loaders:
    """The datasets and their loaders: training batches in a resumable order, evaluation shortest first."""

    datasets: dict
    sampler: EpochBatchSampler
    train: object
    evaluation: dict  # split name -> loader


@dataclass(frozen=True)
class Optimization:
    """How the model learns: which groups train when (the plan), at which learning rates, for how long."""

    groups: list[LayerGroup]
    plan: FreezePlan
    optimizer: object
    scheduler: object
    plateau: PlateauState | None
    tools: StepTools
    updates_per_epoch: int
    total_steps: int


@dataclass(frozen=True)
class Assembly:
    data: TaskData
    loaded: LoadedModel
    task: Task
    loaders: Loaders
    optimization: Optimization
    prefix: FrozenPrefix | None  # what the feature cache will compute once, if anything


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


def load_data_and_model(recipe: Recipe, console: Console, main: bool) -> tuple[TaskData, LoadedModel]:
    """The recipe's data read and checked by its task, and the pretrained model with the task's head."""
    task = get_task(recipe.task.type)
    data = read_task_data(recipe.data, task, recipe.task)
    loaded = task.load_model(recipe.model, data.label_names, recipe.data.image)
    apply_adapter(loaded, recipe.adapter, recipe.model, recipe.data.image)
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
        labels = f"{len(data.labels)} labels ({first_few(data.label_names)})" if data.labels else task.name
        console.print(f"data: {data.modality}, {labels}; {sizes}")
        console.print(f"model: {loaded.report.summary()}")
    return data, loaded


def first_few(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f", … (+{len(names) - shown})" if len(names) > shown else "")


def training_length(batches_per_epoch: int, spec) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for a train spec."""
    updates_per_epoch = -(-batches_per_epoch // spec.grad_accum_steps)
    return updates_per_epoch, min(spec.max_steps or 10**12, spec.epochs * updates_per_epoch)


def assemble(recipe: Recipe, accelerator: Accelerator, console: Console, run_dir: Path, resume: bool) -> Assembly:
    """Data, model, task, loaders, freezing plan and optimizer, as `train` (and `lr-find`) use them.

    Resolves train.batch_size: auto into the recipe. Raises on any problem; writes nothing.
    """
    data, loaded = load_data_and_model(recipe, console, accelerator.is_main_process)
    saved = run_dir / MODEL_DIR
    trained = read_model_info(saved).label_values if resume and (saved / INFO_FILE).exists() else data.labels
    if trained != data.labels:
        raise ResumeError([f"the label set changed since {run_dir} was trained ({trained} -> {data.labels}); a resumed "
                           "run cannot change its classes: start a new run"])
    task = get_task(recipe.task.type).for_run(recipe, data, loaded.preprocessor)
    datasets = {name: task.dataset(split, data.targets(name), loaded.preprocessor, train=name == "train")
                for name, split in data.splits.items()}
    for dataset in datasets.values():  # e.g. overlong texts cut to the model's limit: counted, never a crash
        for note in dataset.notes:
            data.notes.append(note)
            if accelerator.is_main_process:
                console.print(f"[yellow]data:[/] {note}")
    for split in data.splits.values():  # tokenised into memory-mapped arrays: the raw texts need not stay in memory
        split.texts = split.text_pairs = None
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    if recipe.train.batch_size == "auto":
        recipe.train.batch_size = auto_batch_size(recipe, run_dir, resume, loaded, task, datasets["train"], groups,
                                                   accelerator, console)
    loaders = make_loaders(recipe, data, datasets)
    optimization = make_optimization(recipe, data, loaded, task, groups, loaders.sampler, accelerator)
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(loaded)
    prefix, why_not = choose_prefix(recipe.train.cache_features, optimization.plan, loaded.model,
                                    optimization.tools.augment is not None, accelerator.num_processes)
    if not task.caches_features:  # masks, boxes, token targets: not cached
        prefix, why_not = None, f"the feature cache does not store {task.name} targets"
    if recipe.train.cache_features is True and prefix is None:
        raise RecipeError([f"train.cache_features is true but there is nothing to cache: {why_not}; "
                           "set it to auto (cache when possible) or false"])
    return Assembly(data, loaded, task, loaders, optimization, prefix)


def make_optimization(recipe: Recipe, data: TaskData, loaded: LoadedModel, task: Task, groups: list[LayerGroup],
                      sampler: EpochBatchSampler, accelerator: Accelerator) -> Optimization:
    updates_per_epoch, total_steps = training_length(sampler.batches_per_epoch, recipe.train)
    plan = build_plan(recipe.model.freeze, groups, loaded.head_prefixes, updates_per_epoch, total_steps,
                      adapter_scope(loaded))
    plateau = make_plateau(recipe, data)
    optimizer, scheduler = build_optimizer(loaded.model, groups, plan, recipe.optim, max(total_steps, 1), plateau)
    # L2-SP snapshots the pretrained weights now, before a checkpoint can replace them.
    tools = StepTools(augment=make_augmenter(recipe, data, loaded, task, accelerator.device),
                      penalty=make_l2sp(recipe, loaded, plan))
    return Optimization(groups, plan, optimizer, scheduler, plateau, tools, updates_per_epoch, total_steps)


def make_plateau(recipe: Recipe, data: TaskData) -> PlateauState | None:
    if recipe.optim.schedule.name != "plateau":
        return None
    if "validation" not in data.splits:
        raise RecipeError(["optim.schedule plateau lowers the LR when eval.metric stops improving on validation; "
                           "give data.validation or data.validation_fraction"])
    return PlateauState(recipe.optim.schedule, recipe.eval.mode)


def make_augmenter(recipe: Recipe, data: TaskData, loaded: LoadedModel, task: Task, device):
    """Batch augmentation for training batches only (evaluation never sees it), for tasks whose targets stay
    right when pixels move (a detector's boxes move in its dataset instead)."""
    spec = recipe.data.augment
    if not spec.is_active or not task.batch_augmentation:
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


def auto_batch_size(recipe: Recipe, run_dir: Path, resume: bool, loaded: LoadedModel, task: Task, train_set,
                    groups: list[LayerGroup], accelerator: Accelerator, console: Console) -> int:
    """Probe the largest batch that fits; a resumed run keeps the size it started with."""
    saved = run_dir / RECIPE_FILE
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


def make_loaders(recipe: Recipe, data: TaskData, datasets: dict) -> Loaders:
    """The train loader's batch order comes from a resumable sampler; evaluation goes in order."""
    spec, workers = recipe.train, recipe.data.num_workers
    lengths = datasets["train"].lengths() if recipe.data.group_by_length and data.modality == "text" else None
    weights = balanced_weights(data.targets("train")) if recipe.data.sampler == "balanced" else None
    sampler = EpochBatchSampler(len(datasets["train"]), spec.batch_size, spec.seed, lengths=lengths, weights=weights)
    eval_batch = recipe.eval.batch_size or 2 * spec.batch_size
    evaluation = {name: make_loader(datasets[name], eval_batch, workers) for name in ("validation", "test")
                  if name in datasets}
    return Loaders(datasets, sampler, make_loader(datasets["train"], spec.batch_size, workers, sampler), evaluation)
