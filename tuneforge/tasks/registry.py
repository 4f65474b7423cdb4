"""The task registry: task name -> task class.

tuneforge's own tasks register when the package is imported; a task from elsewhere registers with
the `register_task` decorator (in code the user runs) or as an entry point in the group
`tuneforge.tasks` of an installed package (found the first time an unknown name is asked for).
A saved model folder names its task, and loading it only looks that name up here: a name is
never turned into an import.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from tuneforge.errors import RecipeError

ENTRY_POINT_GROUP = "tuneforge.tasks"
DEFAULT_TASK = "classification"  # a recipe without task.type
TASK_TYPES_HELP = ("classification (one label per example), multilabel (any number of labels), regression "
                   "(continuous targets), segmentation (a class per pixel), detection (boxes with classes), seq2seq "
                   "(text to text), qa (extractive question answering), captioning (image to text), causal_lm "
                   "(language modelling), or a task registered by a plug-in")
_TASKS: dict[str, type] = {}
_plugins_loaded = False


def register_task(task_class: type) -> type:
    """Class decorator: make `task_class` the task named `task_class.name`."""
    name = getattr(task_class, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{task_class.__qualname__}.name must be a plain identifier, got {name!r}")
    known = _TASKS.get(name)
    where = lambda cls: f"{cls.__module__}.{cls.__qualname__}"
    if known is not None and where(known) != where(task_class):  # the same class again (a module re-run) is fine
        raise TypeError(f"task {name!r} is already registered by {where(known)}")
    _TASKS[name] = task_class
    return task_class


def find_task(name: str) -> type | None:
    """The task class registered as `name`, looking through installed plug-ins once if it is not known yet."""
    global _plugins_loaded
    if name not in _TASKS and not _plugins_loaded:
        _plugins_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):  # installed packages: code the user chose to install
            point.load()
    return _TASKS.get(name)


def get_task(name: str) -> type:
    task_class = find_task(name)
    if task_class is None:
        raise RecipeError([f"task.type {name!r} is not a known task; known: {', '.join(task_names())} (a task of "
                           "your own registers with @tuneforge.register_task or an entry point in the group "
                           f"{ENTRY_POINT_GROUP})"])
    return task_class


def task_names() -> list[str]:
    return sorted(_TASKS)
