"""tuneforge.load(path): a trained model ready to predict, the one way predict, serve and the tests use a model.

    predictor = tuneforge.load("runs/sst2-minilm")        # a run directory or a model folder
    predictor.predict("a gripping, funny film")          # {"label": "positive", "probabilities": {...}} (classification)
    predictor.predict(["good", "bad"])                    # one result per input
Images: a PIL image, a path, or bytes of an image file, alone or in a list. Question answering:
{"question": ..., "context": ...}. What each task answers: its `predict` (tasks/).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from tuneforge.artifacts import ModelInfo, model_folder, read_model_info, task_of
from tuneforge.config import DataSpec
from tuneforge.errors import ModelError, first_line
from tuneforge.models.factory import Factory
from tuneforge.models.folder import load_model_folder
from tuneforge.models.loading import LoadedModel
from tuneforge.tasks.base import Task


class Predictor:
    def __init__(self, path: str | Path, factory: str | Factory | None = None):
        self.folder = model_folder(path)
        self.info, self.loaded, self.task = load_saved(self.folder, factory)
        self.loaded.model.eval()
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


def load_saved(folder: Path, factory: str | Factory | None = None) -> tuple[ModelInfo, LoadedModel, Task]:
    """A model folder's description, its model (every weight checked) and its task, each checked against the
    others: a folder is data from anyone, and what does not fit is a ModelError, never a wrong prediction."""
    info = read_model_info(folder)
    task_class = task_of(info, folder)
    loaded, labels = load_model_folder(folder, task_class, factory)
    expected = task_class.head_labels(info.label_names)
    if info.label_names and len(labels) != len(expected):
        raise ModelError([f"{folder}: the model has {len(labels)} outputs but tuneforge.json names "
                          f"{len(info.label_names)} labels, for {len(expected)} outputs; the folder is damaged: "
                          "export or train it again"])
    try:
        task = task_class.from_info(info, loaded.preprocessor)
    except (ValidationError, KeyError, TypeError, ValueError) as error:
        raise ModelError([f"{folder / 'tuneforge.json'}: the {info.task} task's settings or state are damaged "
                          f"({type(error).__name__}: {first_line(error)})"]) from None
    return info, loaded, task


def load(path: str | Path, factory: str | Factory | None = None) -> Predictor:
    """A run directory (its best model) or a model folder, ready to predict. A model built by a factory
    needs `factory`: the function itself, or its name ('module:function', 'path/to/file.py:function'),
    which must match the one the folder was built with; nothing named inside a folder is ever run."""
    return Predictor(path, factory)
