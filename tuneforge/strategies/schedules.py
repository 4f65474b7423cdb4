"""Learning-rate schedules as pure functions of the optimizer step.

`lr_multiplier(step, ...)` returns a multiplier of the base LR, so the LR at any
step has a closed form and a resumed run recomputes it exactly. The training
loop wraps it in `torch.optim.lr_scheduler.LambdaLR`, which calls it with the
0-based step index: 0 before the first optimizer step, k after k steps.

Warmup composes with every schedule: for step < warmup the multiplier is
step / warmup; from then on the named schedule runs on t = step - warmup over a
horizon of T = total_steps - warmup steps.

The one exception to "pure" is `plateau`, whose multiplier depends on
validation metrics; it lives in a `PlateauState` that is checkpointed with the run.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from functools import partial

from tuneforge.config.training import REQUIRED_SETTINGS, ScheduleName, ScheduleSpec  # noqa: F401


class PlateauState:
    """Reduce-on-plateau multiplier, updated after each validation evaluation."""

    def __init__(self, spec: ScheduleSpec, mode: str):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.spec = spec
        self.mode = mode
        self.best: float | None = None  # None rather than +-inf keeps state_dict plain JSON
        self.bad_evaluations = 0
        self.multiplier = 1.0

    def is_improvement(self, metric: float) -> bool:
        """Better than the best by more than `threshold` of the best's magnitude.

        abs() keeps the margin pointing the right way for negative metrics
        (e.g. log-likelihoods), where best * (1 + threshold) would not.
        """
        if math.isnan(metric):
            return False
        if self.best is None:
            return True
        margin = self.spec.threshold * abs(self.best)
        if self.mode == "max":
            return metric > self.best + margin
        return metric < self.best - margin

    def update(self, metric: float) -> bool:
        """Record one evaluation; True when it reduced the multiplier."""
        if self.is_improvement(metric):
            self.best = float(metric)
            self.bad_evaluations = 0
            return False
        self.bad_evaluations += 1
        if self.bad_evaluations <= self.spec.patience:
            return False
        self.bad_evaluations = 0  # a reduction earns the new LR a fresh `patience`
        reduced = max(self.multiplier * self.spec.factor, self.spec.min_ratio)
        changed = reduced < self.multiplier
        self.multiplier = reduced
        return changed

    def state_dict(self) -> dict:
        return {"mode": self.mode, "best": self.best, "bad_evaluations": self.bad_evaluations,
                "multiplier": self.multiplier}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"plateau state was saved with mode {state['mode']!r}, this run uses {self.mode!r}")
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_evaluations = int(state["bad_evaluations"])
        self.multiplier = float(state["multiplier"])


def warmup_steps_for(spec: ScheduleSpec, total_steps: int) -> int:
    """Warmup length in steps; int() truncation matches tuneforge.strategies.optim."""
    if spec.warmup_steps is not None:
        return spec.warmup_steps
    return int(spec.warmup_ratio * total_steps)


def _floored(fraction: float, floor: float) -> float:
    """Map a 1 -> 0 decay onto 1 -> floor."""
    return floor + (1.0 - floor) * fraction


def _cosine_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Each schedule maps (t steps after warmup, horizon T, spec) to a multiplier.
# Schedules defined relative to T (linear, cosine, one_cycle) hold their final
# value past the end; the others are defined for any t and simply continue.

def _constant(t: int, horizon: int, spec: ScheduleSpec) -> float:
    return 1.0


def _linear(t: int, horizon: int, spec: ScheduleSpec) -> float:
    return _floored(1.0 - min(t / horizon, 1.0), spec.min_lr_ratio)


def _cosine(t: int, horizon: int, spec: ScheduleSpec) -> float:
    return _floored(_cosine_between(1.0, 0.0, min(t / horizon, 1.0)), spec.min_lr_ratio)


def _exponential(t: int, horizon: int, spec: ScheduleSpec) -> float:
    periods = t // spec.decay_steps if spec.staircase else t / spec.decay_steps
    return spec.decay_rate ** periods


def _step(t: int, horizon: int, spec: ScheduleSpec) -> float:
    return spec.gamma ** (t // spec.step_size)


def _multistep(t: int, horizon: int, spec: ScheduleSpec) -> float:
    return spec.gamma ** bisect_right(spec.milestones, t)  # milestones reached so far, t == milestone included


def _one_cycle(t: int, horizon: int, spec: ScheduleSpec) -> float:
    """PyTorch OneCycleLR (cos, two phases), with its step indexing.

    OneCycleLR counts the T steps actually taken as 0..T-1, so the peak falls at
    t = pct_start*T - 1 and the floor at t = T - 1 (the LR of the last update),
    not at pct_start*T and T.
    """
    start = 1.0 / spec.div_factor
    end = start / spec.final_div_factor
    peak_step = spec.pct_start * horizon - 1.0  # a float, as in torch
    last_step = horizon - 1.0
    if t <= peak_step:
        return _cosine_between(start, 1.0, t / peak_step) if peak_step > 0 else 1.0
    span = last_step - peak_step
    progress = min((t - peak_step) / span, 1.0) if span > 0 else 1.0  # torch overshoots the cosine at t = T; hold the floor
    return _cosine_between(1.0, end, progress)


def _cyclic(t: int, horizon: int, spec: ScheduleSpec) -> float:
    position = (t % spec.cycle_steps) / spec.cycle_steps  # 0 at a cycle's start, 0.5 at its top
    height = 1.0 - abs(2.0 * position - 1.0)
    return spec.base_ratio + (1.0 - spec.base_ratio) * height


SCHEDULES: dict[str, Callable[[int, int, ScheduleSpec], float]] = {
    "constant": _constant, "linear": _linear, "cosine": _cosine, "exponential": _exponential,
    "step": _step, "multistep": _multistep, "one_cycle": _one_cycle, "cyclic": _cyclic,
}


def lr_multiplier(step: int, *, spec: ScheduleSpec, total_steps: int, plateau: PlateauState | None = None) -> float:
    """Multiplier of the base LR after `step` optimizer steps (0-based, as LambdaLR counts)."""
    warmup = warmup_steps_for(spec, total_steps)
    warmup_factor = step / warmup if step < warmup else 1.0
    if spec.name == "plateau":
        # Reductions come from evaluations, so they scale the warmup rather than replace it.
        return warmup_factor * (plateau.multiplier if plateau is not None else 1.0)
    if step < warmup:
        return warmup_factor
    horizon = max(1, total_steps - warmup)  # max: total_steps may be 0 (evaluation-only runs) or <= warmup
    return SCHEDULES[spec.name](step - warmup, horizon, spec)


def make_multiplier(spec: ScheduleSpec, total_steps: int,
                    plateau: PlateauState | None = None) -> Callable[[int], float]:
    """The schedule as the one-argument function LambdaLR expects.

    A partial, not a callable object: LambdaLR.state_dict() saves a callable
    object's __dict__, which would drag the spec and PlateauState into the JSON
    checkpoint; a partial's is empty. Checkpoint the PlateauState on its own.
    """
    return partial(lr_multiplier, spec=spec, total_steps=total_steps, plateau=plateau)


def refresh_lr(scheduler) -> None:
    """Re-apply a LambdaLR's multipliers at its current step without advancing it.

    LambdaLR recomputes the LR only inside step(); call this after
    PlateauState.update() reduces the multiplier so the very next optimizer
    step already uses the reduced LR. (get_last_lr() keeps the old value until
    the next scheduler.step().)
    """
    for group, base_lr, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
