"""tuneforge.load(path): a trained model ready to predict, the one way predict, serve and the tests use a model.

    predictor = tuneforge.load("runs/sst2-minilm")        # a run directory or a model folder
    predictor.predict("a gripping, funny film")          # {"label": "positive", "probabilities": {...}} (classification)
    predictor.predict(["good", "bad"])                    # one result per input
Images: a PIL image, a path, or bytes of an image file, alone or in a list. Question answering:
{"question": ..., "context": ...}.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from tuneforge.data.loaders import TextDataset
from tuneforge.data.sources import Split
from tuneforge.errors import DataError
from tuneforge.use.inference import model_folder, read_model_info
from tuneforge.models.loading import Factory, load_model_folder
from tuneforge.config import DataSpec
from tuneforge.tasks import task_from_info


class Predictor:
    def __init__(self, path: str | Path, factory: str | Factory | None = None):
        self.folder = model_folder(path)
        self.info = read_model_info(self.folder)
        self.loaded, self.labels = load_model_folder(self.folder, factory)
        self.loaded.model.eval()
        self.task = task_from_info(self.info, self.loaded.preprocessor)
        self.modality = self.loaded.modality
        self.pairs = bool(self.info["data"].get("text_pair_column"))
        self.data_spec = DataSpec(**self.info["data"])  # the columns and format the model was trained on

    @property
    def metadata(self) -> dict:
        return {"task": self.info["task"], "modality": self.modality, "labels": self.info["label_names"],
                "label_values": self.info["label_values"], "max_length": self.info["max_length"],
                "text_pairs": self.pairs, "adapter": self.loaded.base is not None}

    def predict(self, inputs):
        """The task's prediction for one input (a dict back) or a list of inputs (a list back): classification
        {label, probabilities}; multilabel {labels, probabilities}; regression {values}; segmentation {mask,
        class_fractions} at the image's size; detection {boxes: [{label, score, box}]} in the image's pixels;
        seq2seq, captioning and causal_lm {text} (causal_lm: the continuation only); qa {answer, start, end, score,
        probability} for {question, context} inputs or [question, context] pairs (start, end: characters of the context)."""
        single = not isinstance(inputs, (list, tuple)) or ((self.pairs or self.task.name == "qa") and _is_pair(inputs))
        items = [inputs] if single else list(inputs)
        if not items:
            return []
        items = self.prepare(items)
        with torch.inference_mode():
            if hasattr(self.task, "predict_items"):  # generation, or QA's windows: the task runs the model itself
                results = self.task.predict_items(self.loaded, items)
            else:
                results = self.task.predict(self.loaded.model(**self._batch(items)), items)
        return results[0] if single else results

    def prepare(self, items: list) -> list:
        """Every input checked, and images opened: a bad one is reported with its index before it joins a batch."""
        if self.modality == "image":
            return [_image(item, index) for index, item in enumerate(items)]
        if self.task.name == "qa":
            return [_question(item, index) for index, item in enumerate(items)]
        for index, item in enumerate(items):
            if not (_is_pair(item) if self.pairs else isinstance(item, str)):
                raise DataError([f"input {index} must be a [text, pair] list of two strings" if self.pairs
                                 else f"input {index} is not text"])
            _check_unicode(item if self.pairs else [item], index)
        return items

    def _batch(self, items: list) -> dict[str, torch.Tensor]:
        """Model inputs for prepared items."""
        if self.modality == "text":
            # The training path's own tokenisation, truncation and padding.
            texts = [item[0] if self.pairs else item for item in items]
            split = Split("input", "request", [0] * len(items), [str(i) for i in range(len(items))], texts=texts,
                          text_pairs=[item[1] for item in items] if self.pairs else None)
            dataset = TextDataset(split, [0] * len(items), self.loaded.preprocessor, self.info["max_length"],
                                  memory_map=False)
            return dataset.collate([dataset[i] for i in range(len(items))])["inputs"]
        return {"pixel_values": torch.cat([self.loaded.preprocessor(image, return_tensors="pt")["pixel_values"]
                                           for image in items])}


def _is_pair(item) -> bool:
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)


def _question(item, index: int) -> dict:
    """A QA input: {"question": ..., "context": ...}, or a [question, context] pair."""
    if _is_pair(item):
        item = {"question": item[0], "context": item[1]}
    if not (isinstance(item, dict) and all(isinstance(item.get(k), str) and item[k].strip() for k in ("question", "context"))):
        raise DataError([f"input {index} must be {{\"question\": text, \"context\": text}} or a [question, context] pair, "
                         "both non-empty"])
    _check_unicode([item["question"], item["context"]], index)
    return item


def _check_unicode(texts, index: int) -> None:
    """A Python str may hold a lone surrogate (JSON's "\\ud800" decodes to one) that no UTF-8 encoder or tokenizer
    takes. Found here it is this input's error; found in the tokenizer it would fail every input batched with it."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            # repr, so that the message itself stays encodable
            raise DataError([f"input {index} is not valid Unicode: it holds the lone surrogate "
                             f"{text[error.start]!r}"]) from None


def _image(item, index: int) -> Image.Image:
    try:
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        source = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, TypeError) as error:
        raise DataError([f"input {index} is not a readable image ({type(error).__name__}: {error})"]) from None


def load(path: str | Path, factory: str | Factory | None = None) -> Predictor:
    """A run directory (its best model) or a model folder, ready to predict. A model built by a factory
    needs `factory`: the function itself, or its name ('module:function', 'path/to/file.py:function'),
    which must match the one the folder was built with; nothing named inside a folder is ever run."""
    return Predictor(path, factory)
