"""tuneforge from Python: the verbs of the command line as plain functions, and the building blocks they are
made of for code that composes its own run.

    tuneforge.finetune("recipe.yaml", ["train.epochs=1"])   # train: returns the run directory and eval.json
    tuneforge.load("runs/x").predict([...])                 # a finished model, ready to predict
    tuneforge.tune("recipe.yaml", trials=20)                # search: returns the study's summary
    load_model(spec, labels, image_spec, "classification")  # a pretrained model with a task's new head
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.artifacts import model_folder
from tuneforge.config import DataSpec, ImageSpec, ModelSpec, TaskSpec
from tuneforge.data.common import TaskData, read_task_data
from tuneforge.models.factory import Factory
from tuneforge.models.loading import LoadedModel
from tuneforge.tasks.registry import DEFAULT_TASK, get_task
from tuneforge.training.run import RunResult, finetune
from tuneforge.tuning.report import StudySummary
from tuneforge.tuning.study import tune
from tuneforge.use.evaluate import evaluate_run, predict_run
from tuneforge.use.predictor import Predictor, load, load_saved


def load_model(spec: ModelSpec, labels: list[str], image_spec: ImageSpec, task: str = DEFAULT_TASK,
               factory: Factory | None = None) -> LoadedModel:
    """The pretrained model of `spec` with what task `task` puts on top (a new head for `labels`)."""
    return get_task(task).load_model(spec, labels, image_spec, factory)


def load_model_folder(path: str | Path, factory: str | Factory | None = None) -> tuple[LoadedModel, list[str]]:
    """A saved model (a run directory or a model folder) and its label names, loaded as its task says."""
    info, loaded, _ = load_saved(model_folder(path), factory)
    return loaded, info.label_names


def load_task_data(data_spec: DataSpec, task_spec: TaskSpec) -> TaskData:
    """A recipe's data, read and checked by its task."""
    return read_task_data(data_spec, get_task(task_spec.type), task_spec)


__all__ = ["Predictor", "RunResult", "StudySummary", "evaluate_run", "finetune", "load", "load_model", "load_model_folder",
           "load_task_data", "predict_run", "tune"]
