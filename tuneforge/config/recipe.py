"""The recipe: one YAML file describes a whole fine-tuning run.

A recipe is validated up front by pydantic. Every problem (unknown key, wrong
type, impossible value) is gathered and reported at once, each with its key
path and what is allowed, before any data is read or any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from tuneforge.config.base import Section
from tuneforge.config.data import DataSpec
from tuneforge.config.model import AdapterSpec, ModelSpec
from tuneforge.config.training import EvalSpec, OptimSpec, OutputSpec, TrainSpec
from tuneforge.limits import MAX_COUNT

# Tasks whose model writes text: trained with the model's own token loss, judged on generated text (or perplexity).
GENERATIVE_TASKS = ("seq2seq", "captioning", "causal_lm")
# Tasks without classes: their data is read by tuneforge.data.text_tasks, not the label machinery.
TEXT_TASKS = (*GENERATIVE_TASKS, "qa")
TEXT_TASK_SETTINGS = {"source_prefix", "max_target_length", "num_beams", "max_new_tokens", "stride", "max_answer_length",
                      "packing"}


class TaskSpec(Section):
    type: Literal["classification", "regression", "multilabel", "segmentation", "detection", "seq2seq", "qa",
                  "captioning", "causal_lm"] = Field(
        "classification", description="classification: one label per example; multilabel: a list of labels per example "
                                      "(sigmoid outputs); regression: one or more continuous targets; segmentation: "
                                      "a class per pixel, from image + mask pairs; detection: boxes with classes; "
                                      "seq2seq: text to text (translation, summarisation); qa: extractive question "
                                      "answering; captioning: image to text; causal_lm: language modelling")
    ignore_index: int = Field(255, ge=0, le=2**31 - 1, description="segmentation: mask value of pixels that count nowhere")
    score_threshold: float = Field(0.5, ge=0.0, lt=1.0, description="detection: boxes `predict` reports score above "
                                                                    "this (metrics use every box)")
    normalize_targets: bool = Field(True, description="regression: train on targets scaled to mean 0, std 1 (by the "
                                                      "training split); predictions come back in the data's units")
    threshold: float | Literal["tune"] = Field(
        "tune", description="multilabel: probability above which a label is predicted; tune: the one that maximises "
                            "micro F1 on the validation split (0.5 without one)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    source_prefix: str = Field("", description="seq2seq: text put before every source, e.g. T5's "
                                               "'translate English to German: '")
    max_target_length: int = Field(128, gt=0, le=MAX_COUNT, description="seq2seq, captioning: token limit of target texts")
    num_beams: int = Field(4, ge=1, le=1000, description="seq2seq, captioning, causal_lm: beam search width when generating")
    max_new_tokens: int = Field(64, ge=1, le=MAX_COUNT, description="seq2seq, captioning, causal_lm: the most tokens one generation adds")
    stride: int = Field(128, gt=0, le=MAX_COUNT, description="qa: tokens shared by consecutive windows of a long context (default: a "
                                               "quarter of model.max_length)")
    max_answer_length: int = Field(30, gt=0, le=MAX_COUNT, description="qa: the longest answer span, in tokens")
    packing: bool = Field(True, description="causal_lm: concatenate texts into blocks of model.max_length tokens "
                                            "(false: one text an example, padded)")
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None, description="loss weight per class: 'balanced' (n / (k * count)) or one weight per label")
    labels: list[str] | None = Field(None, description="label values in class-index order (default: sorted labels of train)")
    label_names: list[str] | None = Field(None, description="display names for the labels, same order")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value):
        # Labels compare as text everywhere, so `labels: [0, 1]` means the same as ["0", "1"].
        if isinstance(value, list):
            return [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) if isinstance(v, (int, float)) else v
                    for v in value]
        return value

    @field_validator("threshold")
    @classmethod
    def _probability(cls, value):
        if value != "tune" and not 0.0 < value < 1.0:
            raise ValueError("threshold must be between 0 and 1 (exclusive), or tune")
        return value

    @model_validator(mode="after")
    def _names(self) -> TaskSpec:
        if self.type != "classification":
            used = [key for key in ("label_smoothing", "class_weights") if getattr(self, key)]
            if used:
                raise ValueError(f"{', '.join(used)} applies to task.type classification, not {self.type}")
        if self.type in GENERATIVE_TASKS + ("qa",) and (self.labels is not None or self.class_weights is not None):
            raise ValueError(f"task.labels and class weights name classes; task.type {self.type} has none")
        if self.type == "regression" and self.labels is not None:
            raise ValueError("task.labels names classes; a regression's targets are data.label_column")
        for key, values in (("labels", self.labels), ("label_names", self.label_names)):
            if values is not None and len(set(values)) != len(values):
                repeated = sorted({v for v in values if values.count(v) > 1})
                raise ValueError(f"task.{key} repeats {repeated}; each class must appear once")
        if self.label_names is not None:
            if self.labels is None:
                raise ValueError("task.label_names needs task.labels (the raw values they rename)")
            if len(self.label_names) != len(self.labels):
                raise ValueError(f"task.label_names has {len(self.label_names)} names for {len(self.labels)} labels")
        return self


TASK_METRICS = {
    "classification": ("accuracy", "loss", "f1_macro", "f1_weighted", "precision_macro", "precision_weighted",
                       "recall_macro", "recall_weighted", "auc_roc"),
    "regression": ("rmse", "mse", "mae", "r2", "loss"),
    "multilabel": ("f1_micro", "f1_macro", "precision_micro", "recall_micro", "precision_macro", "recall_macro",
                   "auc_roc", "exact_match", "loss"),
    "segmentation": ("mean_iou", "mean_dice", "pixel_accuracy", "loss"),
    "detection": ("map_50", "map", "mean_iou", "loss"),
    "seq2seq": ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor", "loss"),
    "captioning": ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor", "loss"),
    "qa": ("f1", "exact_match", "loss"),
    "causal_lm": ("perplexity", "loss"),
}
DEFAULT_METRIC = {"classification": "accuracy", "regression": "rmse", "multilabel": "f1_micro", "segmentation": "mean_iou",
                  "detection": "map_50", "seq2seq": "bleu", "captioning": "bleu", "qa": "f1", "causal_lm": "perplexity"}
LOWER_IS_BETTER = ("loss", "mse", "rmse", "mae", "perplexity")



class Recipe(Section):
    name: str = Field("run", description="the run's name, part of its folder's name (no '/', not starting with '.')")
    model: ModelSpec
    data: DataSpec
    task: TaskSpec = TaskSpec()
    train: TrainSpec = TrainSpec()
    optim: OptimSpec = OptimSpec()
    eval: EvalSpec = EvalSpec()
    adapter: AdapterSpec = AdapterSpec()
    output: OutputSpec = OutputSpec()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # It becomes part of a path (output.dir runs/{name}): a separator or a leading '.' could leave that folder.
        if not value or len(value) > 128 or value.startswith(".") or any(c in value for c in "/\\") or \
                not value.isprintable():
            raise ValueError("a name is 1 to 128 printable characters, without '/' or '\\' and not starting with "
                             "'.' (it is part of the run's folder name)")
        return value

    @model_validator(mode="after")
    def _task_settings(self) -> Recipe:
        # Resolved here, once, so every reader of the recipe (and the saved recipe.yaml) sees the same choice.
        kind = self.task.type
        metric = self.eval.metric or DEFAULT_METRIC[kind]
        allowed = TASK_METRICS[kind]
        if metric not in allowed:
            raise ValueError(f"eval.metric {metric} is not computed for task.type {kind}; choose one of {', '.join(allowed)}")
        self.eval.metric = metric
        self.eval.mode = self.eval.mode or ("min" if metric in LOWER_IS_BETTER else "max")
        if isinstance(self.data.label_column, list) and kind != "regression":
            raise ValueError("data.label_column is a list, which only task.type regression reads (one column a target)")
        if kind != "classification" and self.data.sampler == "balanced":
            raise ValueError(f"data.sampler balanced draws classes equally often; task.type {kind} has no single class "
                             "per example")
        if kind == "segmentation":
            if self.data.format not in ("auto", "image-masks"):
                raise ValueError("task.type segmentation reads data.format image-masks (a folder with images/ and "
                                 f"masks/), not {self.data.format}")
            self.data.format = "image-masks"
            if self.data.augment.is_active:
                raise ValueError("data.augment moves pixels but not the masks; task.type segmentation cannot use it yet")
        elif self.data.format == "image-masks":
            raise ValueError("data.format image-masks is for task.type segmentation")
        boxes = ("boxes-csv", "voc", "coco")
        if kind == "detection":
            if self.data.format not in ("auto", *boxes):
                raise ValueError(f"task.type detection reads data.format boxes-csv, voc or coco, not {self.data.format}")
            self.data.format = "boxes-csv" if self.data.format == "auto" else self.data.format
            augment = self.data.augment
            unsupported = [k for k in ("rotation", "shear", "random_erasing", "mixup", "cutmix", "color_jitter")
                           if getattr(augment, k)]
            if unsupported:
                raise ValueError(f"data.augment.{unsupported[0]}: detection moves boxes with horizontal_flip, "
                                 "width_shift, height_shift and zoom only")
        elif self.data.format in boxes:
            raise ValueError(f"data.format {self.data.format} is for task.type detection")
        self._text_task_data(kind)
        mixing = [key for key in ("mixup", "cutmix") if getattr(self.data.augment, key, 0)]
        if kind != "classification" and mixing:
            raise ValueError(f"data.augment.{mixing[0]} blends labels of classes; task.type {kind} cannot use it")
        return self

    def _text_task_data(self, kind: str) -> None:
        """The formats and columns of seq2seq, qa, captioning and causal_lm data, and their defaults."""
        data, own = self.data, {"seq2seq": ("parallel",), "qa": ("squad",), "causal_lm": ("text",), "captioning": ()}
        tables = ("auto", "csv", "tsv", "jsonl", "parquet")
        for other, formats in own.items():
            if other != kind and data.format in formats:
                raise ValueError(f"data.format {data.format} is for task.type {other}")
        if kind not in own:
            for key in ("target_column", "source_language", "target_language", "prompt_column", "response_column",
                        "test_fraction"):
                if getattr(data, key) is not None:
                    raise ValueError(f"data.{key} is for task.type seq2seq, qa, captioning or causal_lm, not {kind}")
            if self.model.decoder:
                raise ValueError("model.decoder is for task.type captioning")
            return
        if data.format not in (*tables, *own[kind]):
            raise ValueError(f"task.type {kind} reads data.format {', '.join((*tables[1:], *own[kind]))}, not {data.format}")
        if data.augment.is_active:
            raise ValueError(f"data.augment is for image classification and detection, not task.type {kind}")
        if kind == "qa" and data.format == "auto":
            data.format = "squad"
        if kind == "qa":
            if "stride" not in self.task.model_fields_set:  # a quarter of the window: 96 of 384, as is usual for BERT
                self.task.stride = max(1, self.model.max_length // 4)
            if self.task.stride >= self.model.max_length // 2:
                raise ValueError(f"task.stride {self.task.stride} must be less than half of model.max_length "
                                 f"{self.model.max_length}: consecutive windows share that many tokens, and each also holds "
                                 "the question")
        if kind == "seq2seq":
            data.target_column = data.target_column or "target"
            if data.format == "parallel" and not (data.source_language and data.target_language):
                raise ValueError("data.format parallel needs data.source_language and data.target_language (the files' "
                                 "suffixes, e.g. en and de)")
        if kind == "captioning":
            data.target_column, data.image_column = data.target_column or "caption", data.image_column or "image"
        if (data.prompt_column is None) != (data.response_column is None):
            raise ValueError("the instruction format needs both data.prompt_column and data.response_column")
        if data.prompt_column and kind != "causal_lm":
            raise ValueError("data.prompt_column and data.response_column are for task.type causal_lm")
        if self.model.decoder and kind != "captioning":
            raise ValueError("model.decoder is for task.type captioning")

    @model_validator(mode="after")
    def _adapter_on_pretrained(self) -> Recipe:
        # An adapter's saved folder holds only what differs from the base, rebuilt from its pretrained weights.
        if self.adapter.enabled and not self.model.pretrained:
            raise ValueError("adapter.method needs model.pretrained: true (an adapter adapts pretrained weights; "
                             "for a random-initialisation baseline use adapter.method: none)")
        return self

    def output_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
