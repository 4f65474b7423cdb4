"""What segmentation and detection share: images in, a Hugging Face model of the task's own kind (its head
replaced for the new classes), images prepared by the saved image processor, whole files predicted batch by
batch from one loader."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

from tuneforge.config import Recipe
from tuneforge.data.common import Split, TaskData, check_images
from tuneforge.errors import DataError
from tuneforge.models.folder import saved_image_processor
from tuneforge.models.heads import hf_head_prefixes
from tuneforge.models.loading import LoadedModel, load_hf_with_head, open_hf_model, require_model_type
from tuneforge.tasks.base import Task, write_predictions
from tuneforge.tasks.inputs import open_image_input


class ImageTask(Task):
    auto_class: ClassVar[str]  # transformers' auto class of the task
    model_types: ClassVar[str]  # its mapping of model types (transformers.models.auto.modeling_auto)
    model_examples: ClassVar[str]  # models of that kind, for the message that refuses another
    file_batch_size = 64

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        if recipe.data.format == "auto":
            recipe.data.format = cls.data_formats[0]

    @classmethod
    def check_split(cls, split: Split, data_spec, notes: list[str], labelled: bool = True) -> list[str]:
        problems = check_images(split, data_spec.skip_unreadable_images, notes)
        if len(split) == 0:
            problems.append(f"{split.name}: split {split.source} has no examples")
        return problems

    @classmethod
    def modality_of(cls, split: Split) -> str:
        return "image"

    @classmethod
    def load_model(cls, model_spec, labels: list[str], image_spec, factory=None) -> LoadedModel:
        import transformers

        cls.refuse_factory(model_spec)
        source = open_hf_model(model_spec)
        require_model_type(source, cls.model_types, f"{cls.name} head", cls.model_examples)
        # The heads of these models read several inputs: their dropout is the config's own, never a hook.
        return load_hf_with_head(model_spec, labels, image_spec, source, getattr(transformers, cls.auto_class), "image",
                                 dropout_hook=False)

    @classmethod
    def saved_class(cls, folder: Path) -> tuple[type, str]:
        import transformers

        return getattr(transformers, cls.auto_class), "image"

    @classmethod
    def saved_processor(cls, folder: Path, modality: str):
        return saved_image_processor(folder)

    @classmethod
    def head_of(cls, model) -> list[str]:
        return hf_head_prefixes(model)

    def prepare_input(self, item, index: int, modality: str):
        return open_image_input(item, index)

    def read_inputs(self, path: Path, data_spec) -> tuple[list, list[str]]:
        split = self.input_split(path, data_spec)
        return split.image_paths, split.rows

    def input_split(self, path: Path, data_spec) -> Split:
        """Images to predict (a folder of them, or one), checked."""
        split = self.read_split("input", str(path), data_spec, [], labelled=False)
        problems = split.problems or self.check_split(split, data_spec, [], labelled=False)
        if problems:
            raise DataError(problems)
        return split

    @abstractmethod
    def predict_images(self, model, loader, accelerator, split: Split, output: Path, draw: Path | None) -> list[dict]:
        """The prediction for every image of a file's loader, in the split's order (files beside `output` as the
        task writes them: masks, drawn boxes)."""

    def predict_file(self, loaded: LoadedModel, data_spec, inputs: Path, output: Path, draw: Path | None = None) -> int:
        split = self.input_split(inputs, data_spec)
        dataset = self.dataset(split, [None] * len(split), loaded.preprocessor)
        predictions = self.predict_images(*self.file_loader(loaded, dataset), split, output, draw)
        write_predictions(self, split.rows, predictions, output)
        return len(predictions)

    def train_summary(self, data: TaskData) -> dict:
        return {"train_images": len(data.splits["train"])}
