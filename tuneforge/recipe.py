"""Recipes: one YAML file describes a whole fine-tuning run.

A recipe is validated up front by pydantic. Every problem (unknown key, wrong
type, impossible value) is gathered and reported at once, each with its key
path and what is allowed, before any data is read or any model is loaded.
"""

from __future__ import annotations

import codecs
import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.adapters import AdapterSpec
from tuneforge.data.augment import AugmentSpec
from tuneforge.errors import RecipeError
from tuneforge.freeze import FreezeSpec
from tuneforge.limits import MAX_BATCH, MAX_COUNT, MAX_IMAGE_SIDE, MAX_SEED, MAX_STEPS
from tuneforge.schedules import ScheduleSpec


class Section(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSpec(Section):
    """Where the pretrained network comes from and how its head is replaced."""

    name: str | None = Field(
        None, description="Hugging Face folder or Hub id; 'pkg:PACKAGE/sub/dir' for a folder inside an installed package"
    )
    factory: str | None = Field(None, description="'module:function' returning a torch.nn.Module")
    factory_kwargs: dict[str, Any] = {}
    weights: str | None = Field(None, description="weights file for a factory model (.safetensors, or a legacy torch file)")
    weights_key: str | None = Field(None, description="key of the state dict inside a legacy checkpoint dict, e.g. 'state_dict'")
    strip_prefix: list[str] = Field(default_factory=list, description="key prefixes removed before loading, e.g. 'module.'")
    head: str | None = Field(None, description="attribute path of a factory model's classifier (default: its last Linear)")
    new_head: bool = Field(True, description="replace the classifier with a fresh one sized to the label set")
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pretrained: bool = Field(True, description="false: same architecture, random initialisation (a baseline)")
    max_length: int = Field(128, gt=0, le=MAX_COUNT, description="token limit for text models")
    trust_remote_code: bool = Field(False, description="run the model's own Python code from its folder (needs revision)")
    revision: str | None = None
    allow_unsafe_pickle: bool = Field(False, description="load a weights file that needs full pickle (can run code)")
    freeze: FreezeSpec = FreezeSpec()
    decoder: str | None = Field(None, description="captioning: a text decoder (e.g. GPT-2) joined to the vision encoder "
                                                  "model.name by new cross-attention; without it model.name is a whole "
                                                  "VisionEncoderDecoder model")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of model.name (Hugging Face model) or model.factory ('module:function')")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"model.factory must look like 'package.module:function', got {self.factory!r}")
        if self.weights is not None and self.factory is None:
            raise ValueError("model.weights is for factory models; a Hugging Face folder carries its own weights")
        if self.trust_remote_code and not self.revision:
            raise ValueError("model.trust_remote_code needs model.revision pinned to a commit, so the code cannot change under you")
        return self


class ImageSpec(Section):
    size: int | None = Field(None, gt=0, le=MAX_IMAGE_SIDE,
                             description="square side images are resized to (default: the model's processor)")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class DataSpec(Section):
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "imagefolder", "label-text", "image-masks",
                    "boxes-csv", "voc", "coco", "parallel", "squad", "text"] = Field(
        "auto", description="label-text: plain text, one example a line, the label, a space, then the text; "
                            "parallel: aligned line files <stem>.<source_language>[.gz] and <stem>.<target_language>[.gz] "
                            "(seq2seq; data.train names the stem); squad: SQuAD v1.1 JSON (qa; the default for it); "
                            "text: plain text, one example a non-empty line (causal_lm); "
                            "image-masks: a folder with images/ and masks/ (segmentation; the default for it); "
                            "detection: boxes-csv (a box a row; the default for it), voc (a folder of XML files), "
                            "coco (a JSON file)")
    image_root: str | None = Field(None, description="detection: the folder image file names are relative to (default: "
                                                     "the annotation file's folder; VOC: its <folder> beside the XMLs)")
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    validation_fraction: float | None = Field(None, gt=0.0, lt=1.0, description="split validation off train when no file is given")
    test_fraction: float | None = Field(None, gt=0.0, lt=1.0, description="split a test set off train when no file is "
                                                                          "given (qa: whole articles, never shared)")
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    max_train_examples: int | None = Field(None, gt=0, description="seeded sample of the training split")
    max_validation_examples: int | None = Field(None, gt=0, description="seeded sample of the validation split")
    text_column: str = "text"
    text_pair_column: str | None = None
    target_column: str | None = Field(None, description="seq2seq: the target text (default 'target'); captioning: the "
                                                        "caption (default 'caption')")
    source_language: str | None = Field(None, description="parallel: suffix of the source file (e.g. en)")
    target_language: str | None = Field(None, description="parallel: suffix of the target file (e.g. de)")
    prompt_column: str | None = Field(None, description="causal_lm: instruction format, the prompt column (no loss on it)")
    response_column: str | None = Field(None, description="causal_lm: instruction format, the response column (the loss)")
    label_column: str | list[str] = Field(
        "label", description="the column with the label; regression: the column(s) with the target value(s)")
    label_separator: str = Field(",", min_length=1,
                                 description="multilabel: separates the labels inside one text cell (JSON lists need none)")
    image_column: str | None = Field(None, description="a table whose column holds image paths (relative to the "
                                                       "table's folder) instead of a class-per-folder tree")
    columns: list[str] | None = Field(None, description="column names for a CSV/TSV file without a header row")
    encoding: str = Field("utf-8", description="text encoding of the data files (tables and line files), e.g. latin-1")
    image: ImageSpec = ImageSpec()
    skip_unreadable_images: bool = False
    drop_bad_annotations: bool = Field(False, description="segmentation and detection: leave out images whose mask "
                                                          "or boxes are bad (missing, of another size, outside the "
                                                          "image, of no area, of unknown classes), with a count")
    num_workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = Field(
        "auto", description="loader processes; auto: images are decoded in up to 4 workers, text (tokenised once) needs none")
    group_by_length: bool = Field(True, description="text: batch examples of similar length together (less padding)")
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", description="balanced: draw classes equally often (with replacement)")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="image augmentation of training batches")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r}; e.g. utf-8, latin-1, cp1252, utf-16") from None
        return value

    @model_validator(mode="after")
    def _sources(self) -> DataSpec:
        if self.validation and self.validation_fraction:
            raise ValueError("give data.validation or data.validation_fraction, not both")
        return self


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


class TrainSpec(Section):
    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and not 0 < value <= MAX_BATCH:
            raise ValueError(f"batch_size must be a positive whole number or 'auto' (at most {MAX_BATCH:,})")
        return value

    epochs: int = Field(3, ge=0, le=MAX_COUNT, description="0 evaluates the pretrained model without training")
    max_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="stop after this many optimizer steps")
    batch_size: int | Literal["auto"] = Field(
        32, description="global batch per loaded batch; auto: the largest that fits in memory (probed before training)")
    grad_accum_steps: int = Field(1, gt=0, le=MAX_COUNT)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = Field(42, ge=0, le=MAX_SEED, description="seeds every random number generator (0 to 2**32 - 1)")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every_steps: int = Field(10, gt=0, le=MAX_STEPS)
    checkpoint_every_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="also checkpoint at every epoch end")
    keep_checkpoints: int = Field(2, gt=0, le=10_000)
    device: Literal["auto", "cpu"] = "auto"
    gradient_checkpointing: bool = Field(False, description="recompute block activations in backward: less memory, more time")
    compile: bool = Field(False, description="torch.compile the model (measure first: on some CPUs it is slower; "
                                             "not combined with the feature cache, which saves more)")
    cache_features: bool | Literal["auto"] = Field(
        "auto", description="compute a frozen prefix (embeddings + leading frozen blocks) once and train the rest on "
                            "its stored outputs; auto: whenever the plan and data allow it, true: require it")
    strict_resume: bool = Field(False, description="refuse to resume when the newest checkpoint is damaged (default: fall back)")
    nonfinite: Literal["stop", "skip"] = Field("stop", description="on a NaN/Inf loss or gradient: stop, or skip the step")
    max_nonfinite_in_row: int = Field(5, gt=0, le=MAX_STEPS, description="skip mode: stop after this many non-finite steps in a row")


class OptimSpec(Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(5e-5, gt=0.0, lt=10.0)
    lr_strategy: Literal["single", "differential", "layerwise_decay"] = "single"
    group_lr: dict[str, float] = Field(default_factory=dict,
                                       description="differential: learning rate per group selector, e.g. {backbone: 1e-5, head: 1e-3}")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="layerwise_decay: LR factor per block from the top")
    l2sp: float = Field(0.0, ge=0.0, description="L2-SP strength: penalty alpha/2 * |w - w_pretrained|^2 on trained pretrained weights")
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec,
                                   description="LR schedule with warmup, e.g. {name: cosine, warmup_ratio: 0.1}")

    @model_validator(mode="after")
    def _strategy_fields(self) -> OptimSpec:
        if self.lr_strategy == "differential" and not self.group_lr:
            raise ValueError("lr_strategy differential needs group_lr, e.g. {backbone: 1.0e-5, head: 1.0e-3}")
        if self.lr_strategy == "layerwise_decay" and self.layer_decay is None:
            raise ValueError("lr_strategy layerwise_decay needs layer_decay, e.g. 0.8")
        if self.group_lr and self.lr_strategy != "differential":
            raise ValueError(f"group_lr is for lr_strategy differential, not {self.lr_strategy}")
        return self


class EarlyStoppingSpec(Section):
    patience: int = Field(3, ge=1, le=MAX_STEPS, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change of eval.metric that counts as improvement")


class EvalSpec(Section):
    every_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="default: evaluate at every epoch end")
    early_stopping: EarlyStoppingSpec | None = None
    metric: Literal["accuracy", "loss", "f1_macro", "f1_weighted", "precision_macro", "precision_weighted",
                    "recall_macro", "recall_weighted", "auc_roc", "mse", "rmse", "mae", "r2", "f1_micro",
                    "precision_micro", "recall_micro", "exact_match", "mean_iou", "mean_dice", "pixel_accuracy",
                    "map", "map_50", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor", "f1",
                    "perplexity"] | None = Field(
        None, description="validation metric that picks the best model (and drives early stopping); default: "
                          "accuracy (classification), rmse (regression), f1_micro (multilabel), mean_iou "
                          "(segmentation), map_50 (detection), bleu (seq2seq, captioning), f1 (qa), perplexity "
                          "(causal_lm)")
    mode: Literal["max", "min"] | None = Field(None, description="default: min for loss, mse, rmse, mae and perplexity, "
                                                                 "else max")
    target: float | None = Field(None, description="stop training once eval.metric reaches this value (good enough)")
    batch_size: int | None = Field(None, gt=0, le=MAX_BATCH, description="default: 2x train.batch_size")


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


class OutputSpec(Section):
    dir: str = Field("runs/{name}", description="run directory; {name} is replaced by the recipe's name")

    @field_validator("dir")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        import string

        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]
        except ValueError as error:
            raise ValueError(f"not a valid folder pattern ({error})") from None
        unknown = [field for field in fields if field != "name"]
        if unknown:
            raise ValueError(f"unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; only {{name}} exists")
        return value


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


# ---------------------------------------------------------------- loading

_ENV_PATTERN = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def default_data_dir() -> str:
    """Where the shared datasets live: $TUNEFORGE_DATA, else ../shared/data beside the project."""
    if os.environ.get("TUNEFORGE_DATA"):
        return os.environ["TUNEFORGE_DATA"]
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    return str(candidates[0])


def _expand(value: Any, missing: list[str]) -> Any:
    """Expand ${VAR} and ${VAR:-default} inside strings; TUNEFORGE_DATA has a built-in default.

    As in the shell, an empty variable counts as unset. Unset variables without a
    default are collected in `missing` so they can be reported together.
    """
    if isinstance(value, dict):
        return {key: _expand(item, missing) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item, missing) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        if name == "TUNEFORGE_DATA":
            return default_data_dir()
        missing.append(f"environment variable {name} is not set (used as ${{{name}}}); export it or write ${{{name}:-default}}")
        return match.group(0)

    return _ENV_PATTERN.sub(substitute, value)


MAX_RECIPE_SIZE = 2**20  # characters a recipe may hold once YAML's aliases are expanded


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges; its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one section (lines {seen[key]} and {line}); "
                                    "keep one", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(value, limit: int) -> int:
    """How many characters `value` holds with every shared (aliased) part counted each time it is used, as
    expanding and validating it would copy it; stops counting past `limit`. Shared parts are sized once."""
    sizes: dict[int, int] = {}

    def size(item, depth: int) -> int:
        if isinstance(item, (dict, list)):
            if id(item) not in sizes:
                if depth > 100:
                    raise RecipeError(["the recipe nests sections more than 100 deep"])
                sizes[id(item)] = limit + 1  # a section that contains itself counts as too large
                children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
                total = 1
                for child in children:
                    total += size(child, depth + 1)
                    if total > limit:
                        break
                sizes[id(item)] = total
            return sizes[id(item)]
        return len(item) if isinstance(item, str) else 1

    return size(value, 0)


def read_yaml(path: Path, what: str = "recipe"):
    """A YAML file as plain data: safe types only, no duplicate keys, aliases expanding to a bounded size."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RecipeError([f"{path}: not valid YAML: {error}"]) from None
    except RecursionError:
        raise RecipeError([f"{path}: the {what} is nested too deeply to read"]) from None
    if _expanded_size(data, MAX_RECIPE_SIZE) > MAX_RECIPE_SIZE:
        raise RecipeError([f"{path}: the {what} grows past {MAX_RECIPE_SIZE:,} characters once its YAML aliases "
                           "(*name) are expanded; write it out without repeated aliases"])
    return data


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply command-line overrides 'key.path=value'; values are parsed as YAML scalars."""
    problems = []
    for override in overrides:
        if "=" not in override:
            problems.append(f"override {override!r}: expected key.path=value, e.g. train.epochs=3")
            continue
        path, text = override.split("=", 1)
        keys = path.strip().split(".")
        node = raw
        for key in keys[:-1]:
            if isinstance(node, list):  # a list item by position, e.g. model.freeze.stages.0.train
                if not key.isdigit() or int(key) >= len(node):
                    problems.append(f"override {override!r}: {key} is not a position in a list of {len(node)}")
                    break
                child = node[int(key)]
            else:
                child = node.get(key)
                if child is None:
                    child = node[key] = {}
            if not isinstance(child, (dict, list)):
                problems.append(f"override {override!r}: {key} is a value, not a section")
                break
            node = child
        else:
            value = yaml.safe_load(text) if text.strip() else None
            last = keys[-1]
            if isinstance(node, list):
                if not last.isdigit() or int(last) >= len(node):
                    problems.append(f"override {override!r}: {last} is not a position in a list of {len(node)}")
                    continue
                node[int(last)] = value
            else:
                node[last] = value
    if problems:
        raise RecipeError(problems)
    return raw


def _key_path(loc: tuple) -> tuple:
    """The recipe keys of an error location, without pydantic's union-member tags such as 'int' or "literal['auto']"."""
    tags = {"int", "float", "str", "bool", "list", "dict", "none"}
    return tuple(part for part in loc if not (isinstance(part, str) and (
        part in tags or "[" in part or part.startswith(("function-", "constrained-")))))


def _describe(error: dict, recipe_fields: type[BaseModel]) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "(recipe)"
    if error["type"] == "extra_forbidden":
        parent = _model_at(recipe_fields, error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the docs"
        return f"{path}: unknown key (allowed here: {allowed})"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"]:
        return f"{path}: {message} (got {error.get('input')!r})"
    return f"{message}"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for key in loc:
        field = model.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_recipe(raw: dict, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError([f"a recipe is a mapping of sections (model, data, task, train, optim, eval, output), "
                           f"not a {type(raw).__name__}"], source=source)
    problems: list[str] = []
    expanded = _expand(raw, problems)
    try:
        recipe = Recipe.model_validate(expanded)
    except ValidationError as error:
        merged: dict[tuple, list[str]] = {}  # a value that fits no member of a union fails once per member
        for item in error.errors():
            item = {**item, "loc": _key_path(item["loc"])}
            # Errors from a section-level check carry the section as location.
            if item["type"] == "value_error" and item["loc"]:
                text = f"{'.'.join(map(str, item['loc']))}: {item['msg'].removeprefix('Value error, ')}"
            else:
                text = _describe(item, Recipe)
            merged.setdefault(item["loc"], [])
            if text not in merged[item["loc"]]:
                merged[item["loc"]].append(text)
        for loc, texts in merged.items():
            prefix = f"{'.'.join(map(str, loc))}: "
            problems.append(texts[0] if len(texts) == 1 else prefix + " or ".join(t.removeprefix(prefix) for t in texts))
    if problems:
        raise RecipeError(problems, source=source) from None
    return recipe


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML path, a dict or a Recipe, then apply 'key.path=value' overrides."""
    if isinstance(source, Recipe):
        raw, name = source.model_dump(mode="json"), "recipe"
    elif isinstance(source, dict):
        raw, name = copy.deepcopy(source), "recipe"  # overrides must not change the caller's dict
    else:
        path = Path(source)
        if path.is_dir():
            found = sorted(p.name for p in path.glob("*.yaml"))[:3]
            raise RecipeError([f"recipe {path} is a folder; give the recipe's YAML file"
                               + (f", e.g. {path / found[0]}" if found else "")])
        if not path.is_file():
            raise RecipeError([f"recipe file {path} does not exist"])
        raw = read_yaml(path) or {}
        name = str(path)
    if overrides and isinstance(raw, dict):  # a non-mapping is reported as such by parse_recipe
        raw = apply_overrides(raw, overrides)
    return parse_recipe(raw, source=name)
