"""tuneforge inspect: a model's layer groups with parameter counts, and what a recipe's freezing plan trains."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from tuneforge.artifacts import INFO_FILE, MODEL_DIR, model_folder
from tuneforge.config import ImageSpec, ModelSpec, load_recipe
from tuneforge.models.adapters import adapter_scope
from tuneforge.models.groups import layer_groups, render_groups
from tuneforge.models.loading import LoadedModel
from tuneforge.strategies.freeze import build_plan, describe_plan
from tuneforge.tasks.registry import DEFAULT_TASK, get_task
from tuneforge.training.assembly import load_data_and_model, training_length
from tuneforge.use.predictor import load_saved


def inspect_model(reference: str | None, weights: str | None = None, num_labels: int = 2,
                  recipe: str | None = None, overrides: list[str] | None = None, factory=None) -> list:
    """Print the layer groups (stem/embeddings, each block, neck, head) with parameter counts,
    and with a recipe, what trains in each stage of its freezing plan."""
    console = Console()
    if recipe is not None:
        loaded, plan_rows, fixed = _recipe_model_and_plan(recipe, overrides or [])
    else:
        loaded, plan_rows, fixed = _reference_model(reference, weights, num_labels, factory), None, []
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    console.print(render_groups(groups))
    if plan_rows:
        table = Table(title="freezing plan")
        for column in ("stage", "starts at step", "epoch", "groups that train", "LR x", "trainable parameters"):
            table.add_column(column)
        for row in plan_rows:
            table.add_row(str(row["stage"]), str(row["start_step"]), str(row["start_epoch"]), ", ".join(row["groups"]),
                          f"{row['lr_multiplier']:g}", f"{row['trainable_parameters']:,}")
        console.print(table)
        console.print(f"fixed prefix (frozen in every stage, eval mode, computed once by the feature cache): "
                      f"{', '.join(fixed) if fixed else 'none'}", soft_wrap=True)
    return groups


def _reference_model(reference: str, weights: str | None, num_labels: int, factory=None) -> LoadedModel:
    """A run's model, a Hugging Face folder or Hub id, or a factory ('module:function', with --weights)."""
    path = Path(reference)
    if (path / INFO_FILE).is_file() or (path / MODEL_DIR / INFO_FILE).is_file():
        return load_saved(model_folder(path), factory)[1]
    if ":" in reference and not reference.startswith("pkg:") and not path.exists():
        spec = ModelSpec(factory=reference, weights=weights, pretrained=weights is not None)
    else:
        spec = ModelSpec(name=reference)
    return get_task(DEFAULT_TASK).load_model(spec, [str(i) for i in range(num_labels)], ImageSpec(size=32))


def _recipe_model_and_plan(recipe_path: str, overrides: list[str]) -> tuple[LoadedModel, list[dict], list[str]]:
    """The recipe's model with the recipe's labels, and its freezing plan resolved against it."""
    recipe = load_recipe(recipe_path, overrides)
    data, loaded = load_data_and_model(recipe, Console(quiet=True), main=False)
    batch = recipe.train.batch_size if recipe.train.batch_size != "auto" else 32  # auto is only known by probing
    updates_per_epoch, total = training_length(-(-len(data.splits["train"]) // batch), recipe.train)
    groups = layer_groups(loaded.model, loaded.head_prefixes)
    plan = build_plan(recipe.model.freeze, groups, loaded.head_prefixes, updates_per_epoch, total, adapter_scope(loaded))
    return loaded, describe_plan(plan, groups, updates_per_epoch), [g.name for g in plan.fixed]
