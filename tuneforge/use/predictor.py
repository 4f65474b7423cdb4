"""tuneforge.load(path): a trained model ready to predict, the one way predict, serve and the tests use a model.

    predictor = tuneforge.load("runs/sst2-minilm")        # a run directory or a model folder
    predictor.predict("a gripping, funny film")          # {"label": "positive", "probabilities": {...}} (classification)
    predictor.predict(["good", "bad"])                    # one result per input
Images: a PIL image, a path, or bytes of an image file, alone or in a list. Question answering:
{"question": ..., "context": ...}. What each task answers: its `predict` (tasks/).
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.artifacts import ModelInfo, model_folder, read_model_info
from tuneforge.config import DataSpec
from tuneforge.errors import ModelError
from tuneforge.models.factory import Factory
from tuneforge.models.folder import load_model_folder
from tuneforge.tasks.base import Task
from tuneforge.tasks.registry import find_task, task_names


class Predictor:
    def __init__(self, path: str | Path, factory: str | Factory | None = None):
        self.folder = model_folder(path)
        self.info = read_model_info(self.folder)
        task_class = task_of(self.info, self.folder)
        self.loaded, self.labels = load_model_folder(self.folder, task_class, factory)
        self.loaded.model.eval()
        self.task = task_class.from_info(self.info, self.loaded.preprocessor)
        self.modality = self.loaded.modality
        self.data_spec = DataSpec(**self.info.data)  # the columns and format the model was trained on

    @property
    def metadata(self) -> dict:
        return {"task": self.info.task, "modality": self.modality, "labels": self.info.label_names,
                "label_values": self.info.label_values, "max_length": self.info.max_length,
                "text_pairs": bool(self.data_spec.text_pair_column), "adapter": self.loaded.base is not None}

    def predict(self, inputs):
        """The task's prediction for one input (a dict back) or a list of inputs (a list back): see each task's
        `predict` (classification {label, probabilities}; multilabel {labels, probabilities}; regression {values};
        segmentation {mask, class_fractions}; detection {boxes}; generators {text}; qa {answer, start, end, ...})."""
        single = self.task.is_single(inputs)
        items = [inputs] if single else list(inputs)
        if not items:
            return []
        results = self.task.predict(self.loaded, self.prepare(items))
        return results[0] if single else results

    def prepare(self, items: list) -> list:
        """Every input checked, and images opened: a bad one is reported with its index before it joins a batch."""
        return [self.task.prepare_input(item, index, self.modality) for index, item in enumerate(items)]


def task_of(info: ModelInfo, folder: Path) -> type[Task]:
    """The registered task a saved model names (tuneforge's own, an installed plug-in's, or one the user's code
    registered); the name is only looked up, never imported."""
    task_class = find_task(info.task)
    if task_class is None:
        raise ModelError([f"{folder} holds a model of the task {info.task!r}, which is not registered here (known: "
                          f"{', '.join(task_names())}); install or import the package that registers it"])
    return task_class


def load(path: str | Path, factory: str | Factory | None = None) -> Predictor:
    """A run directory (its best model) or a model folder, ready to predict. A model built by a factory
    needs `factory`: the function itself, or its name ('module:function', 'path/to/file.py:function'),
    which must match the one the folder was built with; nothing named inside a folder is ever run."""
    return Predictor(path, factory)
