"""find_lr(): the learning-rate range test (Leslie Smith, "Cyclical Learning Rates", 2017).

Train the recipe's model for a few steps while the LR grows exponentially from
start_lr to end_lr, record the loss at every step, and read a good LR off the
curve. Everything but the LR is as in training: data and batch order, model, the
freezing plan's first stage, parameter groups, optimizer settings, clipping, precision.

The trained weights are thrown away: the command writes only
  lr_find.png   loss vs LR (log axis) with the suggestions marked
  lr_find.json  suggestion, min_loss_lr, conservative_suggestion, stopped_early_at,
                start_lr, end_lr, steps, reference_group, group_lr_ratios, and per
                step lrs, losses, smoothed_losses (null where not finite)
into DIR (default: the recipe's run directory with suffix -lr-find).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed
from rich.console import Console

from tuneforge.artifacts import write_json_atomic
from tuneforge.config import Recipe, load_recipe
from tuneforge.errors import RecipeError
from tuneforge.training.assembly import assemble, make_accelerator
from tuneforge.training.loop import Progress, backward_window

SMOOTHING = 0.98  # beta of the loss's exponential moving average
DIVERGENCE_FACTOR = 4.0  # stop once the smoothed loss exceeds this many times the best one
NOISY_FRACTION = 0.1  # leading share of the curve the suggestion ignores
PLOT_FILE, JSON_FILE = "lr_find.png", "lr_find.json"


@dataclass
class LRFindResult:
    suggestion: float | None  # LR at the steepest descent of the smoothed loss
    min_loss_lr: float | None  # LR at the lowest smoothed loss
    conservative_suggestion: float | None  # min_loss_lr / 10
    stopped_early_at: int | None  # step index at which the loss diverged (the last one recorded)
    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    plot_path: Path
    json_path: Path


def exponential_lr(step: int, start_lr: float, end_lr: float, steps: int) -> float:
    """LR of step `step` (0-based): start_lr at step 0, end_lr at step steps - 1."""
    return start_lr * (end_lr / start_lr) ** (step / (steps - 1))


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    problems = []
    # `not x > 0` also rejects NaN.
    if not start_lr > 0 or not end_lr > 0:
        problems.append(f"--start-lr and --end-lr must be positive (got {start_lr:g} and {end_lr:g})")
    elif not start_lr < end_lr:
        problems.append(f"--start-lr ({start_lr:g}) must be below --end-lr ({end_lr:g}): "
                        "the LR grows from one to the other")
    if steps < 10:
        problems.append(f"--steps must be at least 10 to draw a curve (got {steps})")
    if problems:
        raise RecipeError(problems)


def default_output_dir(recipe: Recipe) -> Path:
    run_dir = recipe.output_dir()
    return run_dir.with_name(run_dir.name + "-lr-find")


class SmoothedLoss:
    """Exponential moving average with bias correction, so early values are not pulled towards 0."""

    def __init__(self, beta: float = SMOOTHING):
        self.beta, self.average, self.count = beta, 0.0, 0

    def update(self, loss: float) -> float:
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        return self.average / (1 - self.beta ** self.count)


def suggest(lrs: list[float], smoothed: list[float], stopped_early_at: int | None) -> tuple[float | None, float | None]:
    """(steepest-descent LR, min-loss LR) of a range test's curve.

    Both look only at the curve before divergence (the diverged point is left out), and
    both skip its first len // 10 points: their average still rests on a few losses, and
    one lucky first batch must not become the minimum. The steepest descent is the most
    negative np.gradient of the smoothed loss with respect to log10(LR), the gradient
    taken over the whole curve before divergence. None where there is no curve to read
    (the steepest descent needs 3 points).
    """
    end = len(lrs) if stopped_early_at is None else stopped_early_at
    skip = int(end * NOISY_FRACTION)
    if end == 0:
        return None, None
    losses = np.asarray(smoothed[:end], dtype=float)
    min_loss_lr = lrs[skip + int(np.argmin(losses[skip:]))]
    if end < 3:
        return None, min_loss_lr
    slopes = np.gradient(losses, np.log10(lrs[:end]))
    return lrs[skip + int(np.argmin(slopes[skip:]))], min_loss_lr


def find_lr(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None,
            output_dir: str | Path | None = None, start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100,
            console: Console | None = None) -> LRFindResult:
    """Run the LR range test for a recipe; write DIR/lr_find.png and DIR/lr_find.json.

    The LR of step i is start_lr * (end_lr / start_lr) ** (i / (steps - 1)) for the
    reference group: the parameter group whose LR is the recipe's optim.lr, else the
    first group. Every other group's LR is scaled by the same factor, so the ratios of
    the LR strategy (differential, layerwise_decay) hold throughout; the suggestions are
    LRs of the reference group, i.e. values for optim.lr (or that group's group_lr).
    The stage's lr_multiplier and the recipe's schedule and warmup do not apply.

    One step per batch (grad accumulation 1, the recipe's batch size), cycling through
    the training batches in training order as long as needed. The loss is smoothed by
    an exponential moving average (beta 0.98, bias-corrected); the test stops early when
    the smoothed loss exceeds 4x the best smoothed loss so far, or is NaN/inf.

    Two suggestions:
      suggestion               the LR where the smoothed loss falls fastest per decade of
                               LR (steepest descent; see `suggest`): the usual choice
      conservative_suggestion  min_loss_lr / 10, a tenth of the LR at the lowest smoothed
                               loss: safer where the curve is noisy or flat
    """
    check_range(start_lr, end_lr, steps)
    recipe = load_recipe(recipe, overrides)
    out = Path(output_dir) if output_dir is not None else default_output_dir(recipe)
    console = console or Console()
    accelerator = make_accelerator(recipe)
    main = accelerator.is_main_process
    set_seed(recipe.train.seed)
    # Built for the recipe's real training length: a recipe `train` would refuse is refused here too.
    t = assemble(recipe, accelerator, console, recipe.output_dir(), resume=False)
    o, spec, sampler = t.optimization, recipe.train, t.loaders.sampler
    plan, optimizer = o.plan, o.optimizer  # the schedule goes unused
    augment, penalty = t.optimization.tools.augment, t.optimization.tools.penalty
    reference, scales = _lr_scales(optimizer, recipe.optim.lr)
    plan.apply(t.loaded.model, 0)
    model, optimizer, train_loader = accelerator.prepare(t.loaded.model, optimizer, t.loaders.train)
    plan.train_mode(t.loaded.model, 0)  # the bare model: names match the plan's under DDP too

    if main:
        console.print(f"lr-find: {steps} steps, LR {start_lr:g} -> {end_lr:g} for group "
                      f"{optimizer.param_groups[reference]['name']}, batch {spec.batch_size}, "
                      f"freezing {plan.strategy} (stage 0)")
    batches = _cycle(train_loader, sampler)

    def step_on_next_batch() -> float:
        batch = next(batches)
        return _train_step(model, t.task, augment(batch) if augment else batch, optimizer, accelerator,
                           spec.max_grad_norm, penalty)

    progress = Progress(steps, 0, main, console)
    try:
        lrs, losses, smoothed, stopped_early_at = _sweep(step_on_next_batch, optimizer.param_groups, reference, scales,
                                                         start_lr, end_lr, steps, progress)
    finally:
        progress.close()

    suggestion, min_loss_lr = suggest(lrs, smoothed, stopped_early_at)
    result = LRFindResult(suggestion, min_loss_lr, None if min_loss_lr is None else min_loss_lr / 10, stopped_early_at,
                          lrs, losses, smoothed, out / PLOT_FILE, out / JSON_FILE)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(result, start_lr, end_lr, steps, optimizer, reference, scales)
        _plot(result)
        _report(result, steps, console)
    return result


def _lr_scales(optimizer, base_lr: float) -> tuple[int, list[float]]:
    """Index of the reference group and every group's LR relative to it, as the LR strategy set them."""
    # LambdaLR moved the schedule's step-0 value (0 under warmup) into "lr"; "initial_lr" keeps the group's own LR.
    initial = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    reference = next((i for i, lr in enumerate(initial) if lr == base_lr), 0)
    return reference, [lr / initial[reference] for lr in initial]


def _sweep(take_step, param_groups: list[dict], reference: int, scales: list[float], start_lr: float, end_lr: float,
           steps: int, progress: Progress) -> tuple[list[float], list[float], list[float], int | None]:
    """Steps with exponentially growing LRs until `steps` or divergence.

    Returns (lrs, losses, smoothed losses, stopped_early_at).
    """
    lrs, losses, smoothed = [], [], []
    average, best = SmoothedLoss(), math.inf
    for step in range(steps):
        lr = exponential_lr(step, start_lr, end_lr, steps)
        for group, scale in zip(param_groups, scales):
            group["lr"] = lr * scale  # the reference group's scale is 1.0: its LR is exactly `lr`
        losses.append(take_step())
        lrs.append(param_groups[reference]["lr"])
        smoothed.append(average.update(losses[-1]))
        progress.update(1, loss=f"{smoothed[-1]:.4f}")
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > DIVERGENCE_FACTOR * best:
            return lrs, losses, smoothed, step
        best = min(best, smoothed[-1])
    return lrs, losses, smoothed, None


def _cycle(loader, sampler):
    """Training batches in training order, epoch after epoch, for as long as they are asked for."""
    for epoch in itertools.count():
        sampler.start_epoch(epoch)
        yield from loader


def _train_step(model, task, batch: dict, optimizer, accelerator, max_grad_norm: float | None, penalty) -> float:
    """One optimizer step on one batch, as the training loop does it; returns the task loss (mean over processes)."""
    loss = backward_window(model, task, [batch], accelerator, 1, penalty)
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(loss.float(), "mean"))


def _finite(values: list[float]) -> list[float | None]:
    # JSON has no NaN or Infinity: a diverged loss is written as null.
    return [value if math.isfinite(value) else None for value in values]


def _write_json(result: LRFindResult, start_lr: float, end_lr: float, steps: int, optimizer, reference: int,
                scales: list[float]) -> None:
    names = [group["name"] for group in optimizer.param_groups]
    write_json_atomic(result.json_path, {
        "suggestion": result.suggestion,
        "min_loss_lr": result.min_loss_lr,
        "conservative_suggestion": result.conservative_suggestion,
        "stopped_early_at": result.stopped_early_at,
        "start_lr": start_lr, "end_lr": end_lr, "steps": steps,
        "reference_group": names[reference],
        "group_lr_ratios": dict(zip(names, scales)),
        "lrs": result.lrs,
        "losses": _finite(result.losses),
        "smoothed_losses": _finite(result.smoothed_losses),
    })


def _plot(result: LRFindResult) -> None:
    # The object API on an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    losses, smoothed = _finite(result.losses), _finite(result.smoothed_losses)  # None: a gap in the line
    for values, style in ((losses, {"alpha": 0.3, "linewidth": 1, "label": "loss"}),
                          (smoothed, {"linewidth": 2, "label": "smoothed loss"})):
        axes.plot(result.lrs, [math.nan if v is None else v for v in values], color="tab:blue", **style)
    if result.suggestion is not None:
        index = result.lrs.index(result.suggestion)
        axes.axvline(result.suggestion, color="tab:red", linestyle="--", linewidth=1)
        axes.plot([result.suggestion], [result.smoothed_losses[index]], "o", color="tab:red",
                  label=f"steepest descent {result.suggestion:.2e}")
    if result.conservative_suggestion is not None:
        axes.axvline(result.conservative_suggestion, color="tab:green", linestyle=":", linewidth=1,
                     label=f"min-loss LR / 10 {result.conservative_suggestion:.2e}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    finite = [value for value in smoothed if value is not None]
    low, high = min(finite, default=0.0), min(max(finite, default=0.0), DIVERGENCE_FACTOR * min(finite, default=0.0))
    if high > low:  # the smoothed curve fills the plot; raw spikes and the divergence do not flatten it
        axes.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    diverged = f" (diverged after {result.stopped_early_at + 1} steps)" if result.stopped_early_at is not None else ""
    axes.set_title("LR range test" + diverged)
    axes.legend()
    figure.savefig(result.plot_path, dpi=100)


def _report(result: LRFindResult, steps: int, console: Console) -> None:
    if result.stopped_early_at is not None:
        console.print(f"lr-find: the loss diverged after {result.stopped_early_at + 1} of {steps} steps "
                      f"(LR {result.lrs[-1]:.2e}); stopped early")
    if result.suggestion is None:
        console.print("[yellow]lr-find:[/] too few steps before the loss diverged to suggest an LR; "
                      "lower --start-lr or raise --steps")
    else:
        console.print(f"suggested LR: {result.suggestion:.2e} (steepest descent of the loss)")
    if result.conservative_suggestion is not None:
        console.print(f"conservative LR: {result.conservative_suggestion:.2e} (a tenth of {result.min_loss_lr:.2e}, "
                      "where the loss was lowest)")
    console.print(f"plot: {result.plot_path}")
    console.print(f"curve: {result.json_path}")
