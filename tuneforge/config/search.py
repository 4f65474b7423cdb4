"""The recipe's `search` section: what `tuneforge tune` searches over, and how.

    search:
      space:
        optim.lr: {float: [1.0e-5, 1.0e-3], log: true}
        model.freeze.strategy: {categorical: [full, partial, head_only]}
        model.freeze.trainable_blocks: {int: [1, 6], when: {model.freeze.strategy: partial}}

Every key of `space` is a recipe key path; its values are drawn from one distribution. A `when`
condition names other keys (searched, or fixed in the recipe) and the value(s) they must have for the key to
be searched at all. Without `space`, the task's default space is searched (strategies/search.py).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from tuneforge.config.base import Section
from tuneforge.limits import MAX_COUNT

Scalar = bool | int | float | str | None


class ParamSpec(Section):
    """One searched key: exactly one of float, int or categorical."""

    float_: tuple[float, float] | None = Field(None, alias="float", description="[low, high], both included")
    int_: tuple[int, int] | None = Field(None, alias="int", description="[low, high], both included")
    categorical: list[Any] | None = Field(None, min_length=1, description="the choices, each a value or a section")
    log: bool = Field(False, description="float or int: draw on a log scale (low must be above 0)")
    step: float | None = Field(None, gt=0, description="float or int: draw multiples of step from low")
    when: dict[str, Scalar | list[Scalar]] = Field(
        default_factory=dict, description="search this key only where each named key has this value (or one of these)")

    model_config = {**Section.model_config, "populate_by_name": True}

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        kinds = [name for name, value in (("float", self.float_), ("int", self.int_), ("categorical", self.categorical))
                 if value is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of float: [low, high], int: [low, high] or categorical: [choices]"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
        bounds = self.float_ or self.int_
        if bounds is not None:
            low, high = bounds
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError(f"[low, high] must be finite with low <= high (got [{low}, {high}])")
            if self.log and low <= 0:
                raise ValueError(f"log: true needs low above 0 (got {low})")
            if self.log and self.step is not None:
                raise ValueError("step and log: true do not combine (a log scale has no fixed step)")
        elif self.log or self.step is not None:
            raise ValueError("log and step are for float and int, not categorical")
        if self.int_ is not None and self.step is not None and not float(self.step).is_integer():
            raise ValueError(f"an int key's step must be a whole number (got {self.step})")
        if bounds is not None and self.step is not None:
            steps = (bounds[1] - bounds[0]) / self.step
            if not math.isclose(steps, round(steps), abs_tol=1e-9):
                raise ValueError(f"high - low must be a whole number of steps (got [{bounds[0]}, {bounds[1]}] in steps "
                                 f"of {self.step:g})")
        if self.categorical is not None and len({_key(c) for c in self.categorical}) != len(self.categorical):
            raise ValueError("categorical repeats a choice")
        return self

    @property
    def kind(self) -> str:
        return "float" if self.float_ is not None else "int" if self.int_ is not None else "categorical"

    def holds(self, value) -> bool:
        """Whether `value` is one this key can take (the recipe as written must be one: it is the first trial)."""
        if self.categorical is not None:
            return any(matches(choice, value) for choice in self.categorical)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low, high = self.float_ or self.int_
        if self.int_ is not None and not float(value).is_integer():
            return False
        if self.step is not None and not math.isclose((value - low) / self.step, round((value - low) / self.step),
                                                      abs_tol=1e-9):
            return False  # the search only draws low, low + step, ...
        return low <= value <= high

    def describe(self) -> str:
        if self.categorical is not None:
            return f"one of {self.categorical}"
        low, high = self.float_ or self.int_
        return f"{self.kind} in [{low}, {high}]" + (" (log scale)" if self.log else "") + \
            (f" in steps of {self.step:g} from {low}" if self.step else "")


def matches(choice, value) -> bool:
    """Whether a recipe's value is this choice. A section choice names only some keys of the section (the rest as
    the recipe has them), so it matches a section that has those keys with those values."""
    if isinstance(choice, dict) and isinstance(value, dict):
        return all(key in value and matches(item, value[key]) for key, item in choice.items())
    if _number(choice) and _number(value):
        return choice == value  # 0 is 0.0, 3 is 3.0
    return _key(choice) == _key(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _key(value) -> str:
    """A choice as comparable text: sections (dicts, lists) compare by content."""
    return repr(value)


class SearchSpec(Section):
    """How `tuneforge tune` searches (`tuneforge train` runs the recipe as written and ignores this section)."""

    space: dict[str, ParamSpec] | None = Field(
        None, description="recipe key path -> distribution; default: the task's space (docs/strategies.md)")
    sampler: Literal["tpe", "random", "gp", "cmaes", "nsga2"] = Field(
        "tpe", description="tpe (default), random, gp (Gaussian process), cmaes, nsga2 (several objectives)")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="stop unpromising trials early from their validation metric: median, hyperband "
                              "(successive halving over several budgets), none")
    objectives: list[Literal["metric", "train_seconds"]] = Field(
        default_factory=lambda: ["metric"], min_length=1, max_length=2,
        description="metric (eval.metric on validation); add train_seconds to also minimise the training time")
    keep_models: int = Field(1, ge=1, le=MAX_COUNT, description="keep the model folders of the best N trials (the "
                                                                "best one is evaluated on the test split)")
    heartbeat_seconds: int = Field(30, ge=1, le=3600, description="a running trial's sign of life; a trial silent for "
                                                                 "three of these is marked failed and retried")
    retries: int = Field(2, ge=0, le=MAX_COUNT, description="how often a failed (interrupted) trial is run again")
    advice_first: bool = Field(True, description="where the space searches model.freeze.strategy, trial 1 is what "
                                                 "`tuneforge advise` recommends (within the space)")

    @model_validator(mode="after")
    def _checks(self) -> SearchSpec:
        problems = []  # all of them at once
        if len(set(self.objectives)) != len(self.objectives):
            problems.append("objectives repeats an objective")
        if self.objectives[0] != "metric":
            problems.append("the first objective is metric (eval.metric on validation)")
        if len(self.objectives) > 1 and self.pruner != "none":
            problems.append("pruning works with one objective; set pruner: none or drop train_seconds")
        if len(self.objectives) > 1 and self.sampler in ("gp", "cmaes"):
            problems.append(f"sampler {self.sampler} takes one objective; use tpe, random or nsga2")
        if self.space is not None and not self.space:
            problems.append("space is empty; leave it out to search the task's default space")
        for key, param in (self.space or {}).items():
            why = unsearchable(key)
            if why:
                problems.append(f"space: {key} cannot be searched ({why})")
            if key in param.when:
                problems.append(f"space: {key} is conditional on itself")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# Data keys that change what a trial learns from, not what it is measured on
SEARCHABLE_DATA = ("data.max_train_examples", "data.sampler", "data.group_by_length", "data.augment", "data.num_workers")


def unsearchable(key: str) -> str | None:
    """Why a recipe key cannot be searched, or None: trials are compared on one validation split by one metric,
    and write where the study puts them."""
    top = key.split(".")[0]
    if top in ("search", "output"):
        return "the search and the output are the study's own"
    if key in ("task", "task.type", "task.labels", "task.label_names") or key.split(".")[-1].endswith("threshold"):
        return "every trial solves the same task and is measured the same way"
    if key in ("eval", "eval.metric", "eval.mode"):
        return "trials are compared by one metric"
    if top == "data" and not any(key == k or key.startswith(k + ".") for k in SEARCHABLE_DATA):
        return ("trials are measured on the same validation split; of data, only "
                + ", ".join(k.removeprefix("data.") for k in SEARCHABLE_DATA) + " can be searched")
    return None
