"""The training loop: one function, read top to bottom.

zero_grad -> forward -> backward -> clip -> step -> schedule, on Accelerate so the
same code runs on CPU, one GPU, or several processes (torchrun / accelerate launch).
The freezing plan decides, from the step alone, which parameters train; cross-cutting
work (logging, evaluation, checkpoints, early stopping) goes through `hooks`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from tuneforge.strategies.freeze import FreezePlan
from tuneforge.training.checkpoint import TrainState


class LoopHooks(Protocol):
    def on_log(self, state: TrainState, record: dict) -> None: ...
    def on_stage(self, state: TrainState, index: int) -> None: ...
    def on_out_of_memory(self, state: TrainState, micro_batch: int, splits: int) -> None: ...
    def on_nonfinite(self, state: TrainState, window: list[dict], loss: float, grad_norm: float) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...  # periodic evaluation / checkpoint / early stop
    def on_epoch_end(self, state: TrainState) -> None: ...


@dataclass
class StepTools:
    """What a step applies besides forward/backward; each may be left out."""

    augment: Callable[[dict], dict] | None = None  # batch -> augmented batch (train only)
    penalty: Callable[[], torch.Tensor] | None = None  # e.g. L2-SP, added once per optimizer step


class Progress:
    """A rich progress bar with loss, throughput and ETA (main process only)."""

    def __init__(self, total: int, start: int, enabled: bool, console=None):
        self.bar = None
        if enabled and total > 0:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} ex/s"),
                                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", speed="-")
            self.bar.start()

    def update(self, steps: int = 1, **fields) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=steps, **fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))


def _chunks(batch: dict, splits: int) -> list[tuple[dict, float]]:
    """Split a batch into `splits` micro-batches, each with its share of the examples."""
    size = len(batch["labels"])
    bounds = [round(i * size / splits) for i in range(splits + 1)]

    def part(value, a, b):
        return {k: part(v, a, b) for k, v in value.items()} if isinstance(value, dict) else value[a:b]

    return [(part(batch, a, b), (b - a) / size) for a, b in zip(bounds, bounds[1:]) if b > a]


def backward_window(model, task, window: list[dict], accelerator, splits: int, penalty) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step; gradients sync on the last only."""
    pieces = [(chunk, share / len(window)) for batch in window for chunk, share in _chunks(batch, splits)]
    total = torch.zeros((), device=accelerator.device)
    for index, (chunk, weight) in enumerate(pieces):
        last = index == len(pieces) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss = task.compute_loss(model, chunk["inputs"], chunk["labels"])
            scaled = loss * weight
            if last and penalty is not None:
                scaled = scaled + penalty()
            accelerator.backward(scaled)
        total += loss.detach() * weight
    return total


def backward_or_split(model, task, window: list[dict], accelerator, splits: int, penalty, optimizer, hooks: LoopHooks,
                      state: TrainState) -> tuple[torch.Tensor, int]:
    """backward_window; on out-of-memory, again with each batch split in twice as many micro-batches (the
    effective batch is unchanged). Returns the loss and the splits that fitted; any other error propagates."""
    while True:
        try:
            return backward_window(model, task, window, accelerator, splits, penalty), splits
        except Exception as error:  # only out-of-memory is handled; anything else propagates
            if not is_out_of_memory(error) or splits >= len(window[0]["labels"]):
                raise
            optimizer.zero_grad(set_to_none=True)
            splits *= 2
            hooks.on_out_of_memory(state, -(-len(window[0]["labels"]) // splits), splits)


class Meter:
    """The mean loss and the throughput between two log records. Throughput counts training compute only, not
    evaluation or checkpoint time."""

    def __init__(self, device):
        self.loss_sum, self.count, self.examples, self.busy = torch.zeros((), device=device), 0, 0, 0.0

    def add(self, loss: torch.Tensor, examples: int, since: float) -> None:
        self.loss_sum += loss
        self.count += 1
        self.examples += examples
        self.busy += time.perf_counter() - since

    def record(self, accelerator, **fields) -> dict:
        """The log record of the steps since the last one (the loss averaged over processes); starts afresh."""
        mean_loss = float(accelerator.reduce(self.loss_sum, "mean")) / self.count
        record = {"type": "train", "step": fields["step"], "epoch": fields["epoch"], "loss": round(mean_loss, 6),
                  "lr": fields["lr"], "stage": fields["stage"], "grad_norm": fields["grad_norm"],
                  "examples_per_second": round(self.examples / self.busy, 2)}
        self.loss_sum.zero_()
        self.count, self.examples, self.busy = 0, 0, 0.0
        return record


def fit(*, model, task, loader, sampler, optimizer, scheduler, accelerator, plan: FreezePlan, state: TrainState,
        epochs: int, total_steps: int, grad_accum_steps: int, max_grad_norm: float | None, log_every_steps: int,
        hooks: LoopHooks, tools: StepTools = StepTools(), console=None) -> TrainState:
    """Train until `epochs`, `total_steps` or early stopping, resuming from `state` (epoch and data position)."""
    progress = Progress(total_steps, state.step, accelerator.is_main_process, console)
    bare = accelerator.unwrap_model(model)  # parameter names as the plan knows them (no DDP prefix)

    def train_mode(stage: int) -> None:
        model.train()
        plan.train_mode(bare, stage)

    stage = plan.stage_index(state.step)
    plan.apply(bare, stage)
    hooks.on_stage(state, stage)
    splits = 1  # micro-batches per loaded batch; doubles on out-of-memory, keeping the effective batch
    meter = Meter(accelerator.device)
    try:
        while state.epoch < epochs and state.step < total_steps and not state.stopped_early:
            sampler.start_epoch(state.epoch, skip=state.batch_in_epoch)
            batches_in_epoch = sampler.batches_per_epoch
            train_mode(stage)
            window = []
            for batch in loader:
                tick = time.perf_counter()
                position = state.batch_in_epoch + 1
                # Augment once, as the batch arrives, so an out-of-memory retry sees the same images.
                window.append(tools.augment(batch) if tools.augment else batch)
                state.batch_in_epoch = position
                if position % grad_accum_steps and position != batches_in_epoch:
                    meter.busy += time.perf_counter() - tick
                    continue  # the last group of an epoch may be shorter

                if plan.stage_index(state.step) != stage:
                    stage = plan.stage_index(state.step)
                    plan.apply(bare, stage)
                    train_mode(stage)
                    hooks.on_stage(state, stage)
                loss, splits = backward_or_split(model, task, window, accelerator, splits, tools.penalty, optimizer,
                                                 hooks, state)
                # Clipping also measures the gradient norm (an infinite limit only measures).
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
                # With fp16 the gradient scaler handles overflow itself (it skips the step); otherwise a
                # non-finite loss or gradient must never reach the weights.
                gradients_bad = accelerator.scaler is None and not torch.isfinite(grad_norm)
                if not torch.isfinite(loss) or gradients_bad:
                    optimizer.zero_grad(set_to_none=True)
                    hooks.on_nonfinite(state, window, float(loss), float(grad_norm))  # raises in stop mode
                    window = []
                    continue
                state.nonfinite_in_row = 0
                lr = optimizer.param_groups[0]["lr"]  # the LR this step used (first group)
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule does not advance
                    scheduler.step()
                else:
                    state.skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                meter.add(loss, sum(len(b["labels"]) for b in window) * accelerator.num_processes, tick)
                window = []
                if state.step % log_every_steps == 0 or state.step == total_steps:
                    record = meter.record(accelerator, step=state.step, epoch=state.epoch + position / batches_in_epoch,
                                          lr=lr, stage=stage, grad_norm=round(float(grad_norm), 6))
                    hooks.on_log(state, record)
                    progress.update(0, loss=f"{record['loss']:.4f}", speed=f"{record['examples_per_second']:.1f}")
                progress.update(1)
                hooks.on_step_end(state)
                if not model.training:  # a periodic evaluation switched to eval mode
                    train_mode(stage)
                if state.stopped_early or (state.step >= total_steps and position < batches_in_epoch):
                    break
            if state.batch_in_epoch == batches_in_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                hooks.on_epoch_end(state)
    finally:
        progress.close()
    return state
