"""The training loop: one function, read top to bottom.

zero_grad -> forward -> backward -> clip -> step -> schedule, on Accelerate so
the same code runs on CPU, one GPU, or several processes (torchrun / accelerate launch).
Cross-cutting work (logging, evaluation, checkpoints) goes through `hooks`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import torch

from tuneforge.checkpoint import TrainState


class LoopHooks(Protocol):
    def on_log(self, state: TrainState, record: dict) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...  # periodic evaluation / checkpoint
    def on_epoch_end(self, state: TrainState) -> None: ...


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


def forward_loss(model, task, batch) -> torch.Tensor:
    return task.loss(model(**batch["inputs"]).logits, batch["labels"])


def fit(*, model, task, loader, sampler, optimizer, scheduler, accelerator, state: TrainState,
        epochs: int, total_steps: int, grad_accum_steps: int, max_grad_norm: float | None,
        log_every_steps: int, hooks: LoopHooks, console=None) -> TrainState:
    """Train until `epochs` or `total_steps`, resuming from `state` (its epoch and data position)."""
    progress = Progress(total_steps, state.step, accelerator.is_main_process, console)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Throughput counts training compute only, not evaluation or checkpoint time.
    loss_sum, loss_count, examples, busy = torch.zeros((), device=accelerator.device), 0, 0, 0.0
    try:
        while state.epoch < epochs and state.step < total_steps:
            sampler.start_epoch(state.epoch, skip=state.batch_in_epoch)
            batches_in_epoch = sampler.batches_per_epoch
            model.train()
            for batch in loader:
                tick = time.perf_counter()
                # Accumulate gradients over micro-batches; the last group of an epoch may be shorter.
                position = state.batch_in_epoch + 1
                is_update = position % grad_accum_steps == 0 or position == batches_in_epoch
                sync = contextlib.nullcontext() if is_update else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        loss = forward_loss(model, task, batch)
                    accelerator.backward(loss / grad_accum_steps)
                state.batch_in_epoch = position
                loss_sum += loss.detach()
                loss_count += 1
                examples += len(batch["labels"]) * accelerator.num_processes
                if not is_update:
                    busy += time.perf_counter() - tick
                    continue

                grad_norm = accelerator.clip_grad_norm_(trainable, max_grad_norm) if max_grad_norm else None
                lr = optimizer.param_groups[0]["lr"]  # the LR this step used
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule does not advance
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                busy += time.perf_counter() - tick

                if state.step % log_every_steps == 0 or state.step == total_steps:
                    mean_loss = float(accelerator.reduce(loss_sum, "mean")) / loss_count
                    record = {"type": "train", "step": state.step, "epoch": state.epoch + position / batches_in_epoch,
                              "loss": round(mean_loss, 6), "lr": lr,
                              "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                              "examples_per_second": round(examples / busy, 2)}
                    hooks.on_log(state, record)
                    progress.update(0, loss=f"{mean_loss:.4f}", speed=f"{examples / busy:.1f}")
                    loss_sum.zero_()
                    loss_count, examples, busy = 0, 0, 0.0
                progress.update(1)
                hooks.on_step_end(state)
                model.train()  # a periodic evaluation switched to eval mode
                if state.step >= total_steps and position < batches_in_epoch:
                    break  # max_steps reached inside the epoch
            if state.batch_in_epoch == batches_in_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                hooks.on_epoch_end(state)
    finally:
        progress.close()
    return state


@torch.inference_mode()
def predict_logits(model, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for a whole split, gathered from every process in dataset order."""
    model.eval()
    all_logits, all_labels = [], []
    # Evaluation must not move the training RNG, or a resumed run would diverge.
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            with accelerator.autocast():
                logits = model(**batch["inputs"]).logits
            logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)
