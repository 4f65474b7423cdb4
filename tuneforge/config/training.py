"""Recipe sections about training: the loop, the optimizer and its schedule, evaluation, the output."""

from __future__ import annotations

import string
from itertools import pairwise
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from tuneforge.config.base import Section
from tuneforge.limits import MAX_BATCH, MAX_COUNT, MAX_SEED, MAX_STEPS

ScheduleName = Literal["constant", "linear", "cosine", "exponential", "step", "multistep",
                       "one_cycle", "cyclic", "plateau"]

# Settings with no sensible default: a schedule that needs one must be given it.
REQUIRED_SETTINGS = {"exponential": "decay_steps", "step": "step_size",
                     "multistep": "milestones", "cyclic": "cycle_steps"}


class ScheduleSpec(Section):
    """Which learning-rate schedule to run, and its settings (a recipe section)."""


    name: ScheduleName = Field("linear", description="schedule applied after warmup")
    warmup_steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="linear warmup in optimizer steps; overrides warmup_ratio")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="linear warmup as a fraction of total steps")
    # linear, cosine
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="linear/cosine: final LR as a fraction of the base LR")
    # exponential
    decay_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="exponential: steps over which LR is multiplied by decay_rate")
    decay_rate: float = Field(0.96, gt=0.0, le=1.0, description="exponential: multiplier per decay_steps")
    staircase: bool = Field(False, description="exponential: decay in whole steps of decay_steps")
    # step, multistep
    step_size: int | None = Field(None, gt=0, le=MAX_STEPS, description="step: multiply LR by gamma every step_size steps")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step/multistep: multiplier per decay")
    milestones: list[int] | None = Field(None, description="multistep: steps after warmup at which LR is multiplied by gamma")
    # one_cycle
    pct_start: float = Field(0.3, gt=0.0, lt=1.0, description="one_cycle: fraction of the horizon spent rising")
    div_factor: float = Field(25.0, gt=0.0, description="one_cycle: starting multiplier is 1/div_factor")
    final_div_factor: float = Field(1e4, gt=0.0, description="one_cycle: final multiplier is 1/(div_factor*final_div_factor)")
    # cyclic
    cycle_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="cyclic: length of a full up-and-down cycle in steps")
    base_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cyclic: lowest multiplier of the cycle")
    # plateau
    factor: float = Field(0.1, gt=0.0, lt=1.0, description="plateau: multiplier applied at each reduction")
    patience: int = Field(2, ge=0, le=MAX_STEPS, description="plateau: evaluations without improvement tolerated")
    threshold: float = Field(1e-4, ge=0.0, description="plateau: relative improvement that counts as better")
    min_ratio: float = Field(0.0, ge=0.0, le=1.0, description="plateau: lowest multiplier reductions reach")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data):
        # Lets a recipe say `schedule: cosine` instead of `schedule: {name: cosine}`.
        return {"name": data} if isinstance(data, str) else data

    @field_validator("milestones")
    @classmethod
    def _milestones_increasing(cls, milestones: list[int] | None) -> list[int] | None:
        if milestones is None:
            return None
        if any(milestone <= 0 for milestone in milestones):
            raise ValueError(f"milestones must be positive step counts, got {milestones}")
        if any(later <= earlier for earlier, later in pairwise(milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
        return milestones

    @model_validator(mode="after")
    def _required_settings_given(self) -> ScheduleSpec:
        setting = REQUIRED_SETTINGS.get(self.name)
        if setting is not None and not getattr(self, setting):
            raise ValueError(f"{setting} is required when name is {self.name!r}")
        return self



class TrainSpec(Section):
    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and not 0 < value <= MAX_BATCH:
            raise ValueError(f"batch_size must be a positive whole number or 'auto' (at most {MAX_BATCH:,})")
        return value

    epochs: int = Field(3, ge=0, le=MAX_COUNT, description="0 evaluates the pretrained model without training")
    max_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="stop after this many optimizer steps")
    batch_size: int | Literal["auto"] = Field(
        32, description="global batch per loaded batch; auto: the largest that fits in memory (probed before training)")
    grad_accum_steps: int = Field(1, gt=0, le=MAX_COUNT)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = Field(42, ge=0, le=MAX_SEED, description="seeds every random number generator (0 to 2**32 - 1)")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every_steps: int = Field(10, gt=0, le=MAX_STEPS)
    checkpoint_every_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="also checkpoint at every epoch end")
    keep_checkpoints: int = Field(2, gt=0, le=10_000)
    device: Literal["auto", "cpu"] = "auto"
    gradient_checkpointing: bool = Field(False, description="recompute block activations in backward: less memory, more time")
    compile: bool = Field(False, description="torch.compile the model (measure first: on some CPUs it is slower; "
                                             "not combined with the feature cache, which saves more)")
    cache_features: bool | Literal["auto"] = Field(
        "auto", description="compute a frozen prefix (embeddings + leading frozen blocks) once and train the rest on "
                            "its stored outputs; auto: whenever the plan and data allow it, true: require it")
    strict_resume: bool = Field(False, description="refuse to resume when the newest checkpoint is damaged (default: fall back)")
    nonfinite: Literal["stop", "skip"] = Field("stop", description="on a NaN/Inf loss or gradient: stop, or skip the step")
    max_nonfinite_in_row: int = Field(5, gt=0, le=MAX_STEPS, description="skip mode: stop after this many non-finite steps in a row")


class OptimSpec(Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(5e-5, gt=0.0, lt=10.0)
    lr_strategy: Literal["single", "differential", "layerwise_decay"] = "single"
    group_lr: dict[str, float] = Field(default_factory=dict,
                                       description="differential: learning rate per group selector, e.g. {backbone: 1e-5, head: 1e-3}")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="layerwise_decay: LR factor per block from the top")
    l2sp: float = Field(0.0, ge=0.0, le=1e6,
                        description="L2-SP strength: penalty alpha/2 * |w - w_pretrained|^2 on trained pretrained weights")
    weight_decay: float = Field(0.01, ge=0.0, le=10.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec,
                                   description="LR schedule with warmup, e.g. {name: cosine, warmup_ratio: 0.1}")

    @model_validator(mode="after")
    def _strategy_fields(self) -> OptimSpec:
        if self.lr_strategy == "differential" and not self.group_lr:
            raise ValueError("lr_strategy differential needs group_lr, e.g. {backbone: 1.0e-5, head: 1.0e-3}")
        if self.lr_strategy == "layerwise_decay" and self.layer_decay is None:
            raise ValueError("lr_strategy layerwise_decay needs layer_decay, e.g. 0.8")
        if self.group_lr and self.lr_strategy != "differential":
            raise ValueError(f"group_lr is for lr_strategy differential, not {self.lr_strategy}")
        return self


class EarlyStoppingSpec(Section):
    patience: int = Field(3, ge=1, le=MAX_STEPS, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change of eval.metric that counts as improvement")


class EvalSpec(Section):
    every_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="default: evaluate at every epoch end")
    early_stopping: EarlyStoppingSpec | None = None
    metric: str | None = Field(
        None, description="validation metric that picks the best model (and drives early stopping); one the task "
                          "computes, by default its first (accuracy for classification, rmse for regression, ...: "
                          "docs/tasks.md lists them)")
    mode: Literal["max", "min"] | None = Field(None, description="default: min for a loss or an error (loss, rmse, "
                                                                 "perplexity, ...), else max")
    target: float | None = Field(None, description="stop training once eval.metric reaches this value (good enough)")
    batch_size: int | None = Field(None, gt=0, le=MAX_BATCH, description="default: 2x train.batch_size")



class OutputSpec(Section):
    dir: str = Field("runs/{name}", description="run directory; {name} is replaced by the recipe's name")

    @field_validator("dir")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(value)
                      if field is not None]
        except ValueError as error:
            raise ValueError(f"not a valid folder pattern ({error})") from None
        unknown = [field for field, _, _ in fields if field != "name"]
        if unknown:
            raise ValueError(f"unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; only {{name}} exists")
        if any(spec or conversion for _, spec, conversion in fields):  # {name:>99999999} would pad without end
            raise ValueError("write the placeholder as {name}, without a format or conversion")
        return value
