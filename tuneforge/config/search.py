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
        if self.categorical is not None and len({_key(c) for c in self.categorical}) != len(self.categorical):
            raise ValueError("categorical repeats a choice")
        return self

    @property
    def kind(self) -> str:
        return "float" if self.float_ is not None else "int" if self.int_ is not None else "categorical"

    def holds(self, value) -> bool:
        """Whether `value` is one this key can take (the recipe as written must be one: it is the first trial)."""
        if self.categorical is not None:
            return _key(value) in {_key(c) for c in self.categorical}
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low, high = self.float_ or self.int_
        if self.int_ is not None and not float(value).is_integer():
            return False
        return low <= value <= high

    def describe(self) -> str:
        if self.categorical is not None:
            return f"one of {self.categorical}"
        low, high = self.float_ or self.int_
        return f"{self.kind} in [{low}, {high}]" + (" (log scale)" if self.log else "")


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
    keep_models: int = Field(1, ge=0, le=MAX_COUNT, description="keep the model folders of the best N trials")
    heartbeat_seconds: int = Field(30, ge=1, le=3600, description="a running trial's sign of life; a trial silent for "
                                                                 "three of these is marked failed and retried")
    retries: int = Field(2, ge=0, le=MAX_COUNT, description="how often a failed (interrupted) trial is run again")

    @model_validator(mode="after")
    def _checks(self) -> SearchSpec:
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError("objectives repeats an objective")
        if self.objectives[0] != "metric":
            raise ValueError("the first objective is metric (eval.metric on validation)")
        if len(self.objectives) > 1 and self.pruner != "none":
            raise ValueError("pruning works with one objective; set pruner: none or drop train_seconds")
        if len(self.objectives) > 1 and self.sampler in ("gp", "cmaes"):
            raise ValueError(f"sampler {self.sampler} takes one objective; use tpe, random or nsga2")
        for key, param in (self.space or {}).items():
            if key.startswith("search.") or key.split(".")[0] == "output":
                raise ValueError(f"space: {key} cannot be searched (the search and the output are the study's own)")
            for other in param.when:
                if other == key:
                    raise ValueError(f"space: {key} is conditional on itself")
        return self
