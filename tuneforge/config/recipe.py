"""The recipe: one YAML file describes a whole fine-tuning run.

A recipe is validated up front by pydantic. Every problem (unknown key, wrong
type, impossible value) is gathered and reported at once, each with its key
path and what is allowed, before any data is read or any model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, SerializeAsAny, field_validator, model_validator

from tuneforge.config.base import Section
from tuneforge.config.data import DataSpec
from tuneforge.config.model import AdapterSpec, ModelSpec
from tuneforge.config.search import SearchSpec
from tuneforge.config.training import EvalSpec, OptimSpec, OutputSpec, TrainSpec
from tuneforge.tasks.registry import DEFAULT_TASK, TASK_TYPES_HELP, find_task, get_task, task_names


class TaskSpec(Section):
    """The recipe's `task` section: which task, and for tasks with classes their order and names. A task's
    own settings are the fields of its subclass (the task class's `Spec`), chosen by `type`."""

    type: str = Field(DEFAULT_TASK, description="the task: " + TASK_TYPES_HELP)
    labels: list[str] | None = Field(None, description="label values in class-index order (default: sorted labels of train)")
    label_names: list[str] | None = Field(None, description="display names for the labels, same order")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value):
        # Labels compare as text everywhere, so `labels: [0, 1]` means the same as ["0", "1"].
        if isinstance(value, list):
            return [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) if isinstance(v, (int, float)) else v
                    for v in value]
        return value

    @model_validator(mode="after")
    def _names(self) -> TaskSpec:
        for key, values in (("labels", self.labels), ("label_names", self.label_names)):
            if values is not None and len(set(values)) != len(values):
                repeated = sorted({v for v in values if values.count(v) > 1})
                raise ValueError(f"task.{key} repeats {repeated}; each class must appear once")
        if self.label_names is not None:
            if self.labels is None:
                raise ValueError("task.label_names needs task.labels (the raw values they rename)")
            if len(self.label_names) != len(self.labels):
                raise ValueError(f"task.label_names has {len(self.label_names)} names for {len(self.labels)} labels")
        return self


def _without_defaults_of_other_tasks(section: dict, spec: type[TaskSpec]) -> dict:
    """The task section without settings of other tasks that only repeat their defaults: a recipe.yaml saved
    before each task had its own settings lists every task's. A setting of another task with a value of its own
    stays, and is reported."""
    defaults = {name: field.default for other in task_names() for name, field in find_task(other).Spec.model_fields.items()
                if name not in spec.model_fields}
    return {key: value for key, value in section.items() if key not in defaults or value != defaults[key]}


TASK_DATA_KEYS = ("target_column", "source_language", "target_language", "prompt_column", "response_column",
                  "test_fraction")  # data settings only some tasks read (each task's `data_keys` says which)


class Recipe(Section):
    name: str = Field("run", description="the run's name, part of its folder's name (no '/', not starting with '.')")
    model: ModelSpec
    data: DataSpec
    task: SerializeAsAny[TaskSpec] = Field(default_factory=lambda: get_task(DEFAULT_TASK).Spec())
    train: TrainSpec = TrainSpec()
    optim: OptimSpec = OptimSpec()
    eval: EvalSpec = EvalSpec()
    adapter: AdapterSpec = AdapterSpec()
    output: OutputSpec = OutputSpec()
    search: SearchSpec | None = Field(None, description="what `tuneforge tune` searches over; `train` ignores it")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # It becomes part of a path (output.dir runs/{name}): a separator or a leading '.' could leave that folder.
        if not value or len(value) > 128 or value.startswith(".") or any(c in value for c in "/\\") or \
                not value.isprintable():
            raise ValueError("a name is 1 to 128 printable characters, without '/' or '\\' and not starting with "
                             "'.' (it is part of the run's folder name)")
        return value

    @field_validator("task", mode="wrap")
    @classmethod
    def _task_spec(cls, value, handler):
        """The task section is validated by its own task's Spec: its settings, and only its settings."""
        if isinstance(value, TaskSpec):
            value = value.model_dump(exclude_unset=True) | {"type": value.type}
        kind = value.get("type", DEFAULT_TASK) if isinstance(value, dict) else None
        if not isinstance(kind, str):
            return handler(value)  # not a mapping, or no usable type: the base spec reports it
        task = find_task(kind)
        if task is None:  # a ValueError, so pydantic reports it beside every other problem of the recipe
            raise ValueError(f"{kind!r} is not a known task; known: {', '.join(task_names())} (a task of your own "
                             "registers with @tuneforge.register_task or a `tuneforge.tasks` entry point)")
        return task.Spec.model_validate(_without_defaults_of_other_tasks(value, task.Spec))

    @model_validator(mode="after")
    def _task_fits(self) -> Recipe:
        # Resolved here, once, so every reader of the recipe (and the saved recipe.yaml) sees the same choice.
        task, kind = get_task(self.task.type), self.task.type
        metric = self.eval.metric or task.metric_names[0]
        if metric not in task.metric_names:
            if not any(metric in get_task(other).metric_names for other in task_names()):
                raise ValueError(f"eval.metric: {metric!r} is not a metric any task computes; task.type {kind} computes "
                                 f"{', '.join(task.metric_names)}")
            raise ValueError(f"eval.metric {metric} is not computed for task.type {kind}; choose one of "
                             f"{', '.join(task.metric_names)}")
        self.eval.metric = metric
        self.eval.mode = self.eval.mode or ("min" if metric in task.lower_is_better else "max")
        for key in TASK_DATA_KEYS:
            if getattr(self.data, key) is not None and key not in task.data_keys:
                readers = [name for name in task_names() if key in get_task(name).data_keys]
                raise ValueError(f"data.{key} is for task.type {', '.join(readers)}, not {kind}")
        if self.data.format != "auto" and self.data.format not in task.data_formats:
            readers = [name for name in task_names() if self.data.format in get_task(name).data_formats]
            raise ValueError(f"data.format {self.data.format} is for task.type {', '.join(readers)}; task.type {kind} "
                             f"reads data.format {', '.join(task.data_formats)}")
        task.check_recipe(self)
        return self

    @model_validator(mode="after")
    def _adapter_on_pretrained(self) -> Recipe:
        # An adapter's saved folder holds only what differs from the base, rebuilt from its pretrained weights.
        if self.adapter.enabled and not self.model.pretrained:
            raise ValueError("adapter.method needs model.pretrained: true (an adapter adapts pretrained weights; "
                             "for a random-initialisation baseline use adapter.method: none)")
        return self

    def output_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))

    def to_yaml(self) -> str:
        # Without a search section when there is none: a run's recipe.yaml then reads as it always has.
        return yaml.safe_dump(self.model_dump(mode="json", exclude={"search"} if self.search is None else None),
                              sort_keys=False)
