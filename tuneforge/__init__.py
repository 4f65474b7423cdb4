"""tuneforge: fine-tune pretrained models from a recipe.

    tuneforge.finetune("recipe.yaml", ["train.epochs=1"])   # same as `tuneforge train`
    tuneforge.load("runs/x").predict(["text", ...])          # a trained model, ready to predict
    tuneforge.tune("recipe.yaml", trials=20)                  # same as `tuneforge tune`: search, then report
    @tuneforge.register_task                                  # a task of your own (docs/architecture.md)
"""

from tuneforge.api import finetune, load, tune
from tuneforge.config import Recipe, load_recipe
from tuneforge.errors import DataError, ModelError, RecipeError, ResumeError, TuneforgeError
from tuneforge.tasks import builtin as _builtin_tasks  # noqa: F401  (registers tuneforge's own tasks)
from tuneforge.tasks.base import Task
from tuneforge.tasks.registry import register_task

__version__ = "0.1.0"

__all__ = ["DataError", "ModelError", "Recipe", "RecipeError", "ResumeError", "Task", "TuneforgeError", "finetune",
           "load", "load_recipe", "register_task", "tune"]
