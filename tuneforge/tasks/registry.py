"""The task registry: task name -> task class.

tuneforge's own tasks register when the package is imported; a task from elsewhere registers with
the `register_task` decorator (in code the user runs) or as an entry point in the group
`tuneforge.tasks` of an installed package, named as the task (imported the first time that name is asked
for; a broken plug-in affects only its own name).
A saved model folder names its task, and loading it only looks that name up here: a name is
never turned into an import.
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points

from tuneforge.errors import RecipeError, first_line

ENTRY_POINT_GROUP = "tuneforge.tasks"
DEFAULT_TASK = "classification"  # a recipe without task.type
TASK_TYPES_HELP = ("classification (one label per example), multilabel (any number of labels), regression "
                   "(continuous targets), segmentation (a class per pixel), detection (boxes with classes), seq2seq "
                   "(text to text), qa (extractive question answering), captioning (image to text), causal_lm "
                   "(language modelling), or a task registered by a plug-in")
_TASKS: dict[str, type] = {}


def register_task(task_class: type) -> type:
    """Class decorator: make `task_class` the task named `task_class.name` (a complete Task subclass)."""
    name = getattr(task_class, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
        raise TypeError(f"{task_class.__qualname__}.name must be a plain ASCII identifier, got {name!r}")
    if inspect.isabstract(task_class):
        missing = ", ".join(sorted(getattr(task_class, "__abstractmethods__", ())))
        raise TypeError(f"task {name!r} ({task_class.__qualname__}) does not define: {missing}")
    if not getattr(task_class, "metric_names", None) or not getattr(task_class, "summary_keys", None):
        raise TypeError(f"task {name!r} ({task_class.__qualname__}) needs metric_names and summary_keys")
    known = _TASKS.get(name)
    where = lambda cls: f"{cls.__module__}.{cls.__qualname__}"
    if known is not None and where(known) != where(task_class):  # the same class again (a module re-run) is fine
        raise TypeError(f"task {name!r} is already registered by {where(known)}")
    _TASKS[name] = task_class
    return task_class


def find_task(name: str) -> type | None:
    """The task class registered as `name`, else the installed plug-in whose `tuneforge.tasks` entry point has
    that name (imported now, and checked to register it), else None."""
    if name not in _TASKS:
        for point in entry_points(group=ENTRY_POINT_GROUP, name=name):  # installed: code the user chose to install
            source = f"the entry point {point.name!r} of {point.dist.name if point.dist else 'an installed package'}"
            try:
                point.load()
            except Exception as error:  # a broken plug-in is that plug-in's problem, reported as such
                raise RecipeError([f"task {name!r}: {source} could not be imported ({type(error).__name__}: "
                                   f"{first_line(error)})"]) from None
            if name not in _TASKS:
                raise RecipeError([f"task {name!r}: {source} did not register a task of that name "
                                   "(@tuneforge.register_task on a class whose name is it)"])
    return _TASKS.get(name)


def get_task(name: str) -> type:
    task_class = find_task(name)
    if task_class is None:
        raise RecipeError([f"task.type {name!r} is not a known task; known: {', '.join(task_names())} (a task of "
                           "your own registers with @tuneforge.register_task or an entry point in the group "
                           f"{ENTRY_POINT_GROUP})"])
    return task_class


def task_names() -> list[str]:
    """The tasks registered so far (installed plug-ins join when first named)."""
    return sorted(_TASKS)
