"""The run directory before training: never clobber a run by accident, never write into (or delete from) a
folder that is not a run directory, never resume a run the recipe no longer describes."""

from __future__ import annotations

from pathlib import Path

from tuneforge.artifacts import RECIPE_FILE, clear_run_dir, is_run_dir, leftovers_only, repair_run_dir, write_text_atomic
from tuneforge.config import Recipe, read_yaml
from tuneforge.errors import RecipeError, ResumeError


def check_run_dir(recipe: Recipe, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Before anything is loaded: never clobber a run by accident, never write into (or delete from) a folder
    that is not a run directory, never resume an incompatible run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError([f"output directory {run_dir} is a file; choose a folder with --output-dir or output.dir"])
    has_run = run_dir.is_dir() and is_run_dir(run_dir)
    foreign = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() and not has_run else []
    if foreign and not leftovers_only(run_dir):
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RecipeError([f"output directory {run_dir} is not a tuneforge run directory (it holds {shown}); a run goes "
                           "into a new or empty folder, or replaces an earlier run (--overwrite): choose another "
                           "--output-dir"])
    if has_run and not resume and not overwrite:
        raise RecipeError([f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                           "or choose another --output-dir"])
    if resume and has_run:
        _check_resumable(read_yaml(run_dir / RECIPE_FILE), recipe)


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory (main process only), once data and model are known to be good."""
    has_run = run_dir.is_dir() and is_run_dir(run_dir)
    if overwrite and has_run:
        kept = clear_run_dir(run_dir)  # what the earlier run wrote, and nothing else
        if kept:
            print(f"overwrite: kept what the earlier run did not write: {', '.join(kept)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and has_run:
        for repair in repair_run_dir(run_dir):
            print(f"resume: {repair}")
    else:
        write_text_atomic(run_dir / RECIPE_FILE, recipe.to_yaml())


def _check_resumable(saved: dict, recipe: Recipe) -> None:
    """Refuse a resume that cannot continue the saved run; list harmless differences."""
    current = recipe.model_dump(mode="json")
    breaking = [f"{section}.{key}" for section in ("model", "task") for key in current[section]
                if saved.get(section, {}).get(key) != current[section][key]]
    breaking += [f"data.{key}" for key in ("train", "text_column", "label_column", "format", "max_train_examples",
                                           "split_seed", "validation_fraction", "test_fraction", "target_column",
                                           "source_language", "target_language", "prompt_column", "response_column")
                 if saved.get("data", {}).get(key) != current["data"][key]]
    breaking += [f"train.{key}" for key in ("batch_size", "grad_accum_steps", "seed")
                 if saved.get("train", {}).get(key) not in (current["train"][key], None) and current["train"][key] != "auto"]
    if breaking:
        raise ResumeError([f"the recipe changed in a way a resumed run cannot follow: {', '.join(breaking)}; "
                           "start a new run (another --output-dir) instead"])
    harmless = [f"{section}.{key}" for section, values in current.items() if isinstance(values, dict)
                for key in values if saved.get(section, {}).get(key) != values[key]]
    if harmless:
        print(f"resume: continuing although these settings changed: {', '.join(harmless)}")
