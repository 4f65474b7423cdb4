"""One trial of a study: the recipe with the trial's values, trained in its own run directory with the test split
held out, reporting every validation to the pruner. What a finished trial leaves is its run directory's records,
its model only while it is among the best, and `trial.json`."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from rich.console import Console

from tuneforge.artifacts import CHECKPOINT_DIR, EVAL_FILE, FEATURE_CACHE_DIR, METRICS_FILE, MODEL_DIR, write_json_atomic
from tuneforge.config import Recipe, load_recipe
from tuneforge.config.search import ParamSpec
from tuneforge.errors import TuneforgeError
from tuneforge.strategies.search import draw, suggest_with, trial_recipe
from tuneforge.training.run import TrialLink, finetune

TRIALS_DIR, LOGS_DIR, SHARED_CACHE_DIR, TRIAL_FILE = "trials", "logs", "feature-cache", "trial.json"
AS_WRITTEN = "as_written"  # user attribute of the first trial: the recipe exactly as written
ADVISED = "advice"  # user attribute of the trial `tuneforge advise` recommended


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / TRIALS_DIR / f"trial-{number:04d}"


@dataclass
class Objective:
    """Optuna's objective: the validation metric (and training time) of the recipe with one trial's values."""

    study_dir: Path
    base: dict  # the recipe (resolved, as a plain dict), search section included
    space: dict[str, ParamSpec]
    objectives: list[str]
    prunes: bool

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        values = draw(self.space, self.base, suggest_with(trial))
        trial.set_user_attr("values", values)  # exact values, sections included (params hold them as text)
        run_dir = trial_dir(self.study_dir, trial.number)
        if run_dir.exists():  # not made by this trial (a study recreated in its database): never written into
            error = f"{run_dir} already exists; it is not this trial's, so it is left as it is"
            trial.set_user_attr("error", error)
            raise TuneforgeError([error])
        trial.set_user_attr("run_dir", str(run_dir.relative_to(self.study_dir)))
        log = self.study_dir / LOGS_DIR / f"trial-{trial.number:04d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            try:
                recipe = load_recipe(trial_recipe(self.base, values))
                link = TrialLink(held_out=("test",), on_validation=self._reporter(trial, recipe, run_dir),
                                 feature_cache=self.study_dir / SHARED_CACHE_DIR)
                result = finetune(recipe, output_dir=run_dir, console=Console(file=stream, width=120), trial=link)
            except optuna.TrialPruned:
                _finish(run_dir, trial.number, "pruned", values, keep_model=False)
                raise
            except TuneforgeError as error:  # a bad corner of the space (a learning rate that diverges): this trial fails
                trial.set_user_attr("error", "; ".join(error.problems))
                stream.write(error.render() + "\n")
                run_dir.mkdir(parents=True, exist_ok=True)  # made by this trial, or absent until now
                _finish(run_dir, trial.number, "failed", values, keep_model=False, error=error.render())
                raise
        validation = result.metrics["splits"]["validation"]
        metric = recipe.eval.metric
        if validation.get(metric) is None:
            raise optuna.TrialPruned(f"{metric} is undefined on the validation split")
        scores = {"metric": float(validation[metric]), "train_seconds": float(result.metrics["train_seconds"])}
        trial.set_user_attr("validation", {k: v for k, v in validation.items() if isinstance(v, (int, float))})
        _finish(run_dir, trial.number, "complete", values, keep_model=True, scores=scores)
        picked = [scores[name] for name in self.objectives]
        return picked[0] if len(picked) == 1 else tuple(picked)

    def _reporter(self, trial: optuna.Trial, recipe: Recipe, run_dir: Path):
        """Each validation goes to the pruner (step: hundredths of an epoch, comparable across batch sizes);
        the recipe as written (and the advice) is never pruned, so the search always knows what not searching gives."""
        # the recipe as written and the advice (queued with these marks, kept by retries) run to the end
        as_written = trial.user_attrs.get(AS_WRITTEN, False) or trial.user_attrs.get(ADVISED, False)

        def report(epochs: float, metrics: dict) -> None:
            value = metrics.get(recipe.eval.metric)
            if not self.prunes or value is None:
                return
            step = round(epochs * 100)
            trial.report(float(value), step)
            # asked even for the recipe as written: successive halving records a trial's rung when asked
            if trial.should_prune() and not as_written:
                with (run_dir / METRICS_FILE).open("a") as records:
                    records.write(json.dumps({"time": round(time.time(), 3), "type": "pruned", "epochs": round(epochs, 3),
                                              recipe.eval.metric: value}) + "\n")
                raise optuna.TrialPruned(f"pruned after {epochs:.2f} epochs ({recipe.eval.metric} {value:.4f})")
        return report


def _finish(run_dir: Path, number: int, state: str, values: dict, keep_model: bool, scores: dict | None = None,
            error: str | None = None) -> None:
    """trial.json, and only what a finished trial still needs: no checkpoints (trials are not resumed: an
    interrupted one runs again), no model unless it may be among the best."""
    for name in (CHECKPOINT_DIR, FEATURE_CACHE_DIR, *(() if keep_model else (MODEL_DIR,))):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    record = {"number": number, "state": state, "values": values, "scores": scores, "error": error}
    if (run_dir / EVAL_FILE).is_file():
        record["eval"] = EVAL_FILE
    write_json_atomic(run_dir / TRIAL_FILE, record)


def tidy_trials(study: optuna.Study, study_dir: Path, keep: int) -> list[int]:
    """Remove the model folders of finished trials that are not among the `keep` best (returns their numbers),
    and what a killed trial left (its checkpoints and model; trial.json then says it was interrupted). Only this
    study's trial directories are touched (the study folder is claimed by its study.json, and a trial never
    trains into a folder it did not make), and in them only what tuneforge wrote."""
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ranked = sorted(finished, key=lambda t: t.values[0], reverse=study.directions[0] == optuna.study.StudyDirection.MAXIMIZE)
    best = {t.number for t in ranked[:keep]}
    dropped = []
    for t in finished:
        folder = trial_dir(study_dir, t.number) / MODEL_DIR
        if t.number not in best and folder.is_dir() and (folder.parent / TRIAL_FILE).is_file():  # a trial's own
            shutil.rmtree(folder, ignore_errors=True)
            dropped.append(t.number)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        folder = study_dir / t.user_attrs["run_dir"] if "run_dir" in t.user_attrs else None
        if folder is not None and folder.is_dir() and not (folder / TRIAL_FILE).is_file():
            _finish(folder, t.number, "failed", t.user_attrs.get("values", {}), keep_model=False,
                    error="interrupted (its worker stopped sending heartbeats)")
    return dropped
