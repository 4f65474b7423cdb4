"""tuneforge: fine-tune pretrained models from a recipe."""

from tuneforge.errors import DataError, ModelError, RecipeError, ResumeError, TuneforgeError
from tuneforge.config import Recipe, load_recipe

__version__ = "0.1.0"


def finetune(recipe, overrides=None, output_dir=None, resume=False, overwrite=False):
    """Fine-tune as the recipe (path, dict or Recipe) says; same as `tuneforge train`."""
    from tuneforge.training.run import finetune as run_finetune

    return run_finetune(recipe, overrides, output_dir=output_dir, resume=resume, overwrite=overwrite)


def load(path, factory=None):
    """A trained model ready to predict: `tuneforge.load("runs/x").predict(["text", ...])` (see predictor.py).
    A factory model needs the factory named by you: `factory=resnet20` or "examples/cifar_resnet.py:resnet20"."""
    from tuneforge.use.predictor import load as load_predictor

    return load_predictor(path, factory)


__all__ = ["DataError", "ModelError", "Recipe", "RecipeError", "ResumeError", "TuneforgeError", "finetune", "load",
           "load_recipe"]
