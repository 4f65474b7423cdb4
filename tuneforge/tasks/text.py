"""What the tasks without classes share (seq2seq, captioning, causal_lm, qa): a Hugging Face model of the
task's own kind with its tokenizer, data of their own formats or tables, settings saved for predicting, and
export as a transformers folder only (their outputs come from a loop around the model, not one forward pass)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import model_validator

from tuneforge.config import Recipe, TaskSpec
from tuneforge.data.common import Split, check_images, check_texts
from tuneforge.errors import DataError
from tuneforge.models.folder import saved_tokenizer
from tuneforge.models.loading import LoadedModel, open_hf_model, require_model_type
from tuneforge.models.text import lm_head_prefixes, load_text_model, set_special_tokens
from tuneforge.tasks.base import Task
from tuneforge.tasks.inputs import check_unicode


class TextSpec(TaskSpec):
    """No classes: task.labels and label names have nothing to name."""

    @model_validator(mode="after")
    def _no_classes(self) -> TextSpec:
        if self.labels is not None or self.label_names is not None:
            raise ValueError(f"task.labels names classes; task.type {self.type} has none")
        return self


class TextTask(Task):
    Spec = TextSpec
    has_classes = False
    export_formats = ("hf",)
    auto_class: ClassVar[str]  # transformers' class of the task's models
    model_types: ClassVar[str]  # its mapping of model types (transformers.models.auto.modeling_auto)
    model_examples: ClassVar[str]  # models of that kind, for the message that refuses another

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        if recipe.data.augment.is_active:
            raise ValueError(f"data.augment is for image classification and detection, not task.type {cls.name}")

    @classmethod
    def check_split(cls, split: Split, data_spec, notes: list[str], labelled: bool = True) -> list[str]:
        if len(split) == 0:
            return [f"{split.name}: {split.source} has no examples"]
        if split.image_paths is not None:
            return check_images(split, data_spec.skip_unreadable_images, notes)
        return check_texts(split, cls.input_column(data_spec), split.texts)

    @classmethod
    def input_column(cls, data_spec) -> str:
        return data_spec.text_column

    @classmethod
    def load_model(cls, model_spec, labels: list[str], image_spec, factory=None) -> LoadedModel:
        loaded = cls.load_text_model(model_spec)
        set_special_tokens(loaded.model, loaded.preprocessor)
        return loaded

    @classmethod
    def load_text_model(cls, model_spec) -> LoadedModel:
        """The pretrained model as the task's transformers class, with its tokenizer and the task's head."""
        cls.refuse_factory(model_spec)
        source = open_hf_model(model_spec)
        require_model_type(source, cls.model_types, f"{cls.name} model", cls.model_examples)
        loaded = load_text_model(model_spec, source, cls.auto_class)
        loaded.head_prefixes = cls.head_of(loaded.model)
        return loaded

    @classmethod
    def saved_class(cls, folder: Path) -> tuple[type, str]:
        import transformers

        return getattr(transformers, cls.auto_class), "text"

    @classmethod
    def saved_processor(cls, folder: Path, modality: str):
        return saved_tokenizer(folder)

    @classmethod
    def head_of(cls, model) -> list[str]:
        return lm_head_prefixes(model)

    @property
    def label_names(self) -> list[str]:  # no classes to name
        return []

    @classmethod
    def settings(cls, recipe: Recipe) -> dict:
        """The task settings its instance keeps (every field of its Spec but the type and the labels), as keyword
        arguments of its constructor."""
        return recipe.task.model_dump(exclude={"type", "labels", "label_names"})

    @classmethod
    def saved_settings(cls, info) -> dict:
        """The same, from a saved model's ModelInfo."""
        return cls.settings_of(info).model_dump(exclude={"type", "labels", "label_names"})

    def compute_loss(self, model, inputs: dict, targets):
        """The model's own token loss from `labels` (padding and prompts are -100, which it skips)."""
        return model(**inputs, labels=targets).loss

    def prepare_input(self, item, index: int, modality: str):
        if not isinstance(item, str):
            raise DataError([f"input {index} is not text"])
        check_unicode([item], index)
        return item

    def csv_header(self) -> list[str]:
        return ["text"]

    def csv_row(self, prediction: dict) -> list:
        return [prediction["text"]]

    limitation: ClassVar[str] = ""  # what its metrics do not tell, for the model card
    head: ClassVar[str] = ""  # what sits on top of the pretrained model, for the model card

    @classmethod
    def card_head(cls, info) -> str:
        settings = cls.settings_of(info)
        return f"{cls.head}; generation with beam width {settings.num_beams}, at most {settings.max_new_tokens} new tokens"

    @classmethod
    def card_limitations(cls, info, data_record: dict) -> list[str]:
        return [cls.limitation]
