"""What the tasks with one output vector per example share (classification, multilabel, regression): tables
of texts or images and class-per-folder trees as data, a pretrained classifier with a new head (or a factory
network), texts tokenised once and images decoded per batch, predictions from one forward pass."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from tuneforge.data.common import Split, check_images, check_texts
from tuneforge.data.datasets import ImageDataset, TextDataset
from tuneforge.data.tables import TABLES, read_split
from tuneforge.errors import DataError
from tuneforge.models.factory import load_factory_model
from tuneforge.models.folder import saved_image_processor, saved_tokenizer
from tuneforge.models.heads import hf_head_prefixes
from tuneforge.models.loading import NO_REMOTE_CODE, LoadedModel, hf_modality, load_hf_with_head, open_hf_model
from tuneforge.tasks.base import Task, predict_logits, write_predictions
from tuneforge.tasks.inputs import check_text_input, is_pair, open_image_input


class LabelTask(Task):
    data_formats = (*TABLES, "imagefolder", "label-text")
    caches_features = True
    batch_augmentation = True
    file_batch_size = 64
    problem_type: ClassVar[str]  # transformers' config.problem_type, so its own loss matches after export
    max_length: int = 128  # the token limit texts are cut to
    pairs: bool = False  # texts come as [text, pair]

    # ---------------------------------------------------------------- data

    @classmethod
    def read_split(cls, name: str, where: str, data_spec, notes: list[str], labelled: bool = True) -> Split:
        return read_split(name, where, data_spec, require_labels=labelled)

    @classmethod
    def check_split(cls, split: Split, data_spec, notes: list[str], labelled: bool = True) -> list[str]:
        """Empty texts, unreadable images, no rows; then the task's own check of the targets."""
        problems = []
        if split.image_paths is None:
            problems += check_texts(split, data_spec.text_column, split.texts)
            if split.text_pairs is not None:
                problems += check_texts(split, data_spec.text_pair_column, split.text_pairs)
        else:
            problems += check_images(split, data_spec.skip_unreadable_images, notes)
        if len(split) == 0:
            problems.append(f"{split.name}: split {split.source} has no examples")
        return problems + (cls.check_targets(split, data_spec) if labelled else [])

    @classmethod
    def check_targets(cls, split: Split, data_spec) -> list[str]:
        return []

    # ---------------------------------------------------------------- the model

    @classmethod
    def load_model(cls, model_spec, labels: list[str], image_spec, factory=None) -> LoadedModel:
        if model_spec.factory:
            return load_factory_model(model_spec, labels, image_spec, factory)
        source = open_hf_model(model_spec)
        modality = hf_modality(source.config)
        loaded = load_hf_with_head(model_spec, labels, image_spec, source, cls._auto_class(modality), modality)
        if hasattr(loaded.model.config, "problem_type"):  # transformers' own loss matches, after export too
            loaded.model.config.problem_type = cls.problem_type
        return loaded

    @staticmethod
    def _auto_class(modality: str):
        import transformers

        return (transformers.AutoModelForImageClassification if modality == "image"
                else transformers.AutoModelForSequenceClassification)

    @classmethod
    def saved_class(cls, folder: Path) -> tuple[type, str]:
        from transformers import AutoConfig

        modality = hf_modality(AutoConfig.from_pretrained(folder, **NO_REMOTE_CODE))
        return cls._auto_class(modality), modality

    @classmethod
    def saved_processor(cls, folder: Path, modality: str):
        return saved_tokenizer(folder) if modality == "text" else saved_image_processor(folder)

    @classmethod
    def head_of(cls, model) -> list[str]:
        return hf_head_prefixes(model)

    # ---------------------------------------------------------------- one run, or one saved model

    def configured(self, max_length: int, data_spec) -> LabelTask:
        """This task reading texts as the run did: cut to `max_length` tokens, in pairs when the data had a
        second text column. Every subclass's for_run and from_info end with it."""
        self.max_length, self.pairs = max_length, bool(data_spec.text_pair_column)
        return self

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch's outputs (float32, also under autocast)."""

    @abstractmethod
    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """Every metric of a whole split's outputs, by name (`num_examples` and `loss` among them)."""

    @abstractmethod
    def predictions(self, outputs: torch.Tensor) -> list[dict]:
        """One prediction per row of outputs."""

    def dataset(self, split: Split, targets: list, preprocessor, train: bool = False):
        if split.image_paths is not None:
            return ImageDataset(split, targets, preprocessor)
        return TextDataset(split, targets, preprocessor, self.max_length)

    def compute_loss(self, model, inputs: dict, targets):
        return self.loss(model(**inputs).logits, targets)

    def evaluate(self, model, loader, accelerator) -> dict:
        outputs, targets = predict_logits(model, loader, accelerator)
        return self.metrics(outputs, targets)

    def prepare_input(self, item, index: int, modality: str):
        return open_image_input(item, index) if modality == "image" else check_text_input(item, index, self.pairs)

    def warm_up_input(self, modality: str):
        return ["warm up", "warm up"] if self.pairs and modality == "text" else super().warm_up_input(modality)

    def is_single(self, inputs) -> bool:
        return not isinstance(inputs, (list, tuple)) or (self.pairs and is_pair(inputs))

    def model_inputs(self, loaded: LoadedModel, items: list) -> dict[str, torch.Tensor]:
        """A batch of prepared inputs, through the training path's own tokenisation, truncation and padding."""
        if loaded.modality == "image":
            return {"pixel_values": torch.cat([loaded.preprocessor(image, return_tensors="pt")["pixel_values"]
                                               for image in items])}
        texts = [item[0] if self.pairs else item for item in items]
        split = Split("input", "request", [0] * len(items), [str(i) for i in range(len(items))], texts=texts,
                      text_pairs=[item[1] for item in items] if self.pairs else None)
        dataset = TextDataset(split, [0] * len(items), loaded.preprocessor, self.max_length, memory_map=False)
        return dataset.collate([dataset[i] for i in range(len(items))])["inputs"]

    def predict(self, loaded: LoadedModel, items: list) -> list[dict]:
        with torch.inference_mode():
            return self.predictions(loaded.model(**self.model_inputs(loaded, items)).logits)

    def predict_file(self, loaded: LoadedModel, data_spec, inputs: Path, output: Path, draw: Path | None = None) -> int:
        """The whole file through one evaluation loader (batches, shortest text first)."""
        split = self.read_split("input", str(inputs), data_spec, [], labelled=False)
        problems = split.problems or self.check_split(split, data_spec, [], labelled=False)
        if problems:
            raise DataError(problems)
        logits, _ = predict_logits(*self.file_loader(loaded, self.dataset(split, [0] * len(split), loaded.preprocessor)))
        predictions = self.predictions(logits)
        write_predictions(self, split.rows, predictions, output)
        return len(predictions)
