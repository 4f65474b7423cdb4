"""The task interface: everything tuneforge knows about one kind of problem, in one class.

The class says what the kind is: its recipe settings (`Spec`), the metrics that judge it, how its data is
read and checked, which model it loads, what a model card says about it. An instance is the task for one
run or one saved model: what the loss of a batch is, how a split is evaluated, what a prediction looks
like, and what must be saved to predict again (`state`). The rest of tuneforge asks the task and never
compares task names; a new task is one subclass registered with `@register_task` (see registry.py and
docs/architecture.md).
"""

from __future__ import annotations

import csv
import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from PIL import Image

from tuneforge.config import Recipe, TaskSpec
from tuneforge.data.common import Split, TaskData
from tuneforge.data.loaders import make_loader
from tuneforge.errors import DataError, ModelError
from tuneforge.models.loading import LoadedModel
from tuneforge.strategies.search import default_space
from tuneforge.tasks.cards import label_table
from tuneforge.tasks.registry import get_task, task_names


class Task(ABC):
    # ---------------------------------------------------------------- what kind of problem
    name: ClassVar[str]  # task.type in a recipe, `task` in a saved model's tuneforge.json
    Spec: ClassVar[type[TaskSpec]] = TaskSpec  # the recipe's task section for this task: its own settings
    description: ClassVar[str] = "model"  # what the fine-tuned model is, for its card ("classifier")
    purpose: ClassVar[str] = "Predicting for"  # the card's intended use, completed by "<modality> inputs like ..."
    metric_names: ClassVar[tuple[str, ...]]  # what eval.metric may be; the first is the default
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss"})
    summary_keys: ClassVar[tuple[str, ...]]  # headline metrics: console lines, serve's /metadata
    card_metrics: ClassVar[tuple[str, ...]] = ()  # the model card's evaluation table (default: summary_keys)
    data_formats: ClassVar[tuple[str, ...]] = ()  # the data.format values it reads
    data_keys: ClassVar[frozenset[str]] = frozenset()  # task-specific data settings it reads (config.TASK_DATA_KEYS)
    has_classes: ClassVar[bool] = True  # whether outputs are labelled classes (a label map, class counts)
    caches_features: ClassVar[bool] = False  # whether the feature cache can store its examples and targets
    export_formats: ClassVar[tuple[str, ...]] = ("hf", "onnx", "torch-export")
    export_note: ClassVar[str] = ""  # why the formats it does not list are refused ("a <task> model ...")
    file_batch_size: ClassVar[int] = 32  # examples a batch when a whole file is evaluated or predicted
    probe_target: ClassVar[str | None] = None  # what a linear probe of frozen features predicts: "class", "number"
    adds_head: ClassVar[bool] = True  # a new head sits on the pretrained model (a language model keeps its own)
    unit: ClassVar[str] = "class"  # what its outputs are called, one by one ("label" for multilabel)
    balanced_sampling: ClassVar[bool] = False  # data.sampler balanced: one class per example to balance
    multi_target: ClassVar[bool] = False  # data.label_column may list several columns
    mixes_labels: ClassVar[bool] = False  # mixup and cutmix blend its targets
    reads_decoder: ClassVar[bool] = False  # model.decoder joins a text decoder to the model
    batch_augmentation: ClassVar[bool] = False  # data.augment transforms its training batches (the targets stay right)

    label_names: list[str]

    # ---------------------------------------------------------------- the recipe

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Settings of other sections this task cannot use (raise ValueError), and its defaults for them."""
        data, kind = recipe.data, cls.name
        readers = lambda ability: ", ".join(name for name in task_names() if getattr(get_task(name), ability))
        if recipe.model.decoder and not cls.reads_decoder:
            raise ValueError(f"model.decoder is for task.type {readers('reads_decoder')}")
        if data.sampler == "balanced" and not cls.balanced_sampling:
            raise ValueError(f"data.sampler balanced draws classes equally often; task.type {kind} has no single class "
                             "per example")
        if isinstance(data.label_column, list) and not cls.multi_target:
            raise ValueError(f"data.label_column is a list, which only task.type {readers('multi_target')} reads (one "
                             "column a target)")
        if data.augment.changes_labels and not cls.mixes_labels:
            mixing = "mixup" if data.augment.mixup else "cutmix"
            raise ValueError(f"data.augment.{mixing} blends labels of classes; task.type {kind} cannot use it")

    # ---------------------------------------------------------------- data

    @classmethod
    @abstractmethod
    def read_split(cls, name: str, where: str, data_spec, notes: list[str], labelled: bool = True) -> Split:
        """One split as read from `where` (problems in split.problems, never raised). `labelled` False: inputs to
        predict, without targets."""

    @classmethod
    def example_groups(cls, split: Split) -> tuple[list, str] | None:
        """What must stay together when a split is carved into two (e.g. every question of one article), and
        what to call one such group; None: rows are independent."""
        return None

    @classmethod
    def check_split(cls, split: Split, data_spec, notes: list[str], labelled: bool = True) -> list[str]:
        """Problems with one split's examples (empty texts, unreadable images; missing targets when `labelled`)."""
        return []

    @classmethod
    def label_set(cls, splits: dict[str, Split], data_spec, spec, notes: list[str],
                  problems: list[str]) -> tuple[list[str], list[str]]:
        """(label values in output order, their display names), every split checked against them (problems
        appended to `problems`). Default: no classes."""
        return [], []

    @classmethod
    def encode_targets(cls, values: list, labels: list[str], data_spec) -> list:
        """What the loss compares outputs with, per example, from the split's raw targets."""
        return list(values)

    @classmethod
    def modality_of(cls, split: Split) -> str:
        return "image" if split.image_paths is not None else "text"

    @classmethod
    def search_space(cls, recipe: Recipe, blocks: int) -> dict:
        """What `tuneforge tune` searches when the recipe names no space (`blocks`: the model's block count)."""
        return default_space(recipe, blocks, cls.adds_head)

    @classmethod
    def head_labels(cls, labels: list[str]) -> list[str]:
        """What the model's head has one output for, given the task's labels: the labels themselves unless
        the task scores them otherwise (one output for a whole ordered scale)."""
        return labels

    @classmethod
    def check_known(cls, split: Split, info) -> list[str]:
        """Problems of a labelled file evaluated with a saved model: targets the model cannot predict."""
        return []

    # ---------------------------------------------------------------- the model

    @classmethod
    @abstractmethod
    def load_model(cls, model_spec, labels: list[str], image_spec, factory=None) -> LoadedModel:
        """The pretrained model with what this task needs on top (a new head, generation settings)."""

    @classmethod
    def refuse_factory(cls, model_spec) -> None:
        """For tasks whose model must be a transformers model of their own kind."""
        if model_spec.factory:
            raise ModelError([f"task.type {cls.name} needs a Hugging Face model (model.name), not a factory model"])

    @classmethod
    @abstractmethod
    def saved_class(cls, folder: Path) -> tuple[type, str]:
        """The transformers class a folder this task saved loads with, and its input modality
        (models.folder.load_model_folder does the loading and checks every weight)."""

    @classmethod
    @abstractmethod
    def saved_processor(cls, folder: Path, modality: str):
        """The preprocessor saved in the folder (tokenizer, image processor)."""

    @classmethod
    @abstractmethod
    def head_of(cls, model) -> list[str]:
        """Module paths of the head the task put on the pretrained model."""

    # ---------------------------------------------------------------- one run, or one saved model

    @classmethod
    @abstractmethod
    def for_run(cls, recipe: Recipe, data: TaskData, preprocessor) -> Task:
        """The task for a training run on `data` (anything fitted to the data, e.g. a target scaling, is fitted
        on its training split)."""

    @classmethod
    @abstractmethod
    def from_info(cls, info, preprocessor) -> Task:
        """The task of a saved model, from its ModelInfo (settings and state)."""

    @classmethod
    def settings_of(cls, info) -> TaskSpec:
        """A saved model's task settings (folders of format version 1 kept some with the task's state)."""
        saved = {**info.task_state, **info.task_settings}
        return cls.Spec.model_validate({key: saved[key] for key in cls.Spec.model_fields if key in saved} | {"type": cls.name})

    @property
    def state(self) -> dict:
        """What training decided that predicting needs beside the settings (saved as ModelInfo.task_state)."""
        return {}

    @abstractmethod
    def dataset(self, split: Split, targets: list, preprocessor, train: bool = False):
        """A torch Dataset of `split` with a `collate` method; batches are {"inputs", "labels", "index", ...}."""

    @abstractmethod
    def compute_loss(self, model, inputs: dict, targets):
        """The training loss of one batch."""

    @abstractmethod
    def evaluate(self, model, loader, accelerator) -> dict:
        """The task's metrics over a loader's whole split (gathered from every process)."""

    def after_training(self, model, loaders: dict, accelerator) -> tuple[dict, str] | None:
        """What the task decides once training is done, on the validation split (e.g. a threshold), kept in its
        `state`: a record for metrics.jsonl and a line for the console; None when it decides nothing."""
        return None

    # ---------------------------------------------------------------- predicting

    @abstractmethod
    def prepare_input(self, item, index: int, modality: str):
        """One input to predict, checked (a DataError naming `index` when it is not one this task takes), and
        opened (an image)."""

    def warm_up_input(self, modality: str):
        """An input of the kind this task takes, for a server's first (slow) forward pass."""
        return Image.new("RGB", (32, 32)) if modality == "image" else "warm up"

    def is_single(self, inputs) -> bool:
        """Whether `inputs` is one input (predicted alone) rather than a list of them."""
        return not isinstance(inputs, (list, tuple))

    @abstractmethod
    def predict(self, loaded: LoadedModel, items: list) -> list[dict]:
        """The prediction for each prepared input."""

    def predict_file(self, loaded: LoadedModel, data_spec, inputs: Path, output: Path, draw: Path | None = None) -> int:
        """Write the prediction for every input of a file (or folder) to `output` (.jsonl or .csv); returns how
        many. By default input by input, in batches of 32; tasks that batch a whole file better override it."""
        items, rows = self.read_inputs(inputs, data_spec)
        prepared = [self.prepare_input(item, index, loaded.modality) for index, item in enumerate(items)]
        size = self.file_batch_size
        predictions = [p for start in range(0, len(prepared), size) for p in self.predict(loaded, prepared[start:start + size])]
        write_predictions(self, rows, predictions, output)
        return len(predictions)

    def file_loader(self, loaded: LoadedModel, dataset):
        """The model and an evaluation loader over a whole file's dataset (batches, shortest text first), prepared
        by Accelerate for this machine: what evaluating or predicting a file runs."""
        accelerator = Accelerator()
        model, loader = accelerator.prepare(loaded.model, make_loader(dataset, self.file_batch_size, "auto"))
        return model, loader, accelerator

    def read_inputs(self, path: Path, data_spec) -> tuple[list, list[str]]:
        """The inputs of a file to predict, with where each came from (a file's row, an image's path)."""
        split = self.read_split("input", str(path), data_spec, [], labelled=False)
        problems = split.problems or self.check_split(split, data_spec, [], labelled=False)
        if problems:
            raise DataError(problems)
        return (split.image_paths if split.image_paths is not None else
                list(zip(split.texts, split.text_pairs)) if split.text_pairs is not None else split.texts), split.rows

    def csv_header(self) -> list[str]:
        return ["prediction"]

    def csv_row(self, prediction: dict) -> list:
        return [prediction]

    # ---------------------------------------------------------------- what the run's records and card say

    def fold_for_export(self, loaded: LoadedModel, info):
        """What exporting changes in the model and its ModelInfo so every format gives the same predictions (a
        regression's target scaling folds into its head); by default nothing."""
        return info

    def train_summary(self, data: TaskData) -> dict:
        """For the model card: what the training split holds (examples per class, or target ranges)."""
        return {"train_examples": len(data.splits["train"])}

    @classmethod
    def card_head(cls, info) -> str:
        return f"a new head for {len(info.label_names)} outputs"

    @classmethod
    def card_input(cls, info) -> str:
        if info.modality == "text":
            return f"text, up to {info.max_length} tokens (longer texts are truncated)"
        return "RGB images"

    @classmethod
    def card_preparation(cls, info) -> str:
        """How inputs must be prepared, as the card says it."""
        if info.modality != "text":
            return "the saved image processor"
        pair = info.data.get("text_pair_column")
        return f"the saved tokenizer, columns {info.data.get('text_column')}" + (f" and {pair}" if pair else "")

    @classmethod
    def card_details(cls, info, recipe: dict | None) -> list[str]:
        """Markdown lines under the card's Model section: by default the label map of a task with classes."""
        return label_table(info, "class index") if cls.has_classes else []

    @classmethod
    def card_regularisation(cls, recipe: dict) -> list[str]:
        """What of its own settings regularises training, for the card's strategy (e.g. label smoothing)."""
        return []

    @classmethod
    def card_split_details(cls, split: str, metrics: dict) -> list[str]:
        """Markdown lines after the evaluation table for one split (per-class tables)."""
        return []

    @classmethod
    def card_limitations(cls, info, data_record: dict) -> list[str]:
        return []


def write_predictions(task: Task, rows: list[str], predictions: list[dict], output: Path) -> None:
    """One prediction a row: JSON lines, or a CSV table of the task's columns."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".csv":
        with output.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["row", *task.csv_header()])
            for row, prediction in zip(rows, predictions):
                writer.writerow([row, *task.csv_row(prediction)])
    else:
        with output.open("w") as file:
            for row, prediction in zip(rows, predictions):
                file.write(json.dumps({"row": row, **prediction}) + "\n")


def predict_logits(model, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for a whole split, gathered from every process, in dataset order.

    Loaders may visit examples in any order (evaluation goes shortest first); each batch carries its
    examples' indices, and the results are sorted back by them. Evaluation runs in a forked RNG, so it
    never moves the training RNG (a resumed run would diverge)."""
    model.eval()
    outputs, targets, indices = [], [], []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        for batch in loader:
            with accelerator.autocast():
                logits = model(**batch["inputs"]).logits
            logits, labels, index = accelerator.gather_for_metrics((logits.float(), batch["labels"], batch["index"]))
            outputs.append(logits.cpu())
            targets.append(labels.cpu())
            indices.append(index.cpu())
    order = torch.cat(indices).argsort()
    return torch.cat(outputs)[order], torch.cat(targets)[order]


def gather_by_index(accelerator, indices: list[int], values: list) -> dict:
    """{example index: value} over every process. Each example counts once: when processes pad their last
    batch with repeated examples (so batches stay even), the repeats land on the same index."""
    if accelerator.num_processes > 1:
        indices = accelerator.gather_for_metrics(indices, use_gather_object=True)
        values = accelerator.gather_for_metrics(values, use_gather_object=True)
    return dict(zip(indices, values))


def example_nll(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> list[tuple[float, int]]:
    """Per example: (summed token negative log-likelihood, tokens counted), positions labelled -100 left out.
    shift: a causal LM predicts token t+1 at position t; a seq2seq decoder's logits line up with its labels."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return list(zip(nll.sum(1).tolist(), (labels != -100).sum(1).tolist()))


def mean_token_loss(per_example) -> tuple[float, int]:
    """(mean over every token of the split, token count) from example_nll's pairs."""
    total = sum(nll for nll, _ in per_example)
    tokens = sum(count for _, count in per_example)
    return total / max(tokens, 1), int(tokens)


def torchmetrics_functions(kind: str):
    """torchmetrics' functions of one kind ('classification', 'regression'), imported when first needed:
    importing torchmetrics takes seconds, and `tuneforge --help` should not wait for it."""
    return importlib.import_module(f"torchmetrics.functional.{kind}")
