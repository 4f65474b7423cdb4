"""Tasks: what a batch's loss is, what a prediction looks like and which metrics judge it.

Every task has the same small interface, used by the one training loop, evaluation,
prediction, serving and export: loss(outputs, targets), predictions(outputs),
metrics(outputs, targets), summary_keys, info (what must be saved with the model to
predict again), csv_header() and csv_row(prediction).
"""

from __future__ import annotations

import torch

from tuneforge.errors import RecipeError
from tuneforge.config import TEXT_TASK_SETTINGS
from tuneforge.tasks.classification import ClassificationTask, balanced_class_weights
from tuneforge.tasks.detection import DetectionTask
from tuneforge.tasks.generation import CausalLMTask, GenerationTask
from tuneforge.tasks.multilabel import MultiLabelTask
from tuneforge.tasks.regression import RegressionTask
from tuneforge.tasks.qa import QATask
from tuneforge.tasks.segmentation import SegmentationTask

Task = (ClassificationTask | RegressionTask | MultiLabelTask | SegmentationTask | DetectionTask | GenerationTask
        | CausalLMTask | QATask)


def make_task(recipe, data, preprocessor=None) -> Task:
    """The recipe's task for this data (regression's scaling is fitted on the training split). Tasks that read
    or write text (seq2seq, captioning, causal_lm, qa) keep the model's tokenizer, from `preprocessor`."""
    spec = recipe.task
    if spec.type in ("seq2seq", "captioning", "causal_lm", "qa"):
        return text_task(spec.type, spec.model_dump(include=TEXT_TASK_SETTINGS), preprocessor, recipe.model.max_length)
    if spec.type == "regression":
        return RegressionTask.fit(data.label_names, data.targets("train"), spec.normalize_targets)
    if spec.type == "multilabel":
        return MultiLabelTask(data.label_names, 0.5 if spec.threshold == "tune" else spec.threshold)
    if spec.type == "segmentation":
        return SegmentationTask(data.label_names, spec.ignore_index)
    if spec.type == "detection":
        return DetectionTask(data.label_names, spec.score_threshold)
    weights = spec.class_weights
    if weights == "balanced":
        weights = balanced_class_weights(data.targets("train"), len(data.labels))
    elif weights is not None:
        if len(weights) != len(data.labels):
            raise RecipeError([f"task.class_weights has {len(weights)} weights for {len(data.labels)} labels "
                               f"{data.label_names}; give one per label, in that order"])
        weights = torch.tensor(weights, dtype=torch.float)
    return ClassificationTask(data.label_names, spec.label_smoothing, weights)


def task_from_info(info: dict, preprocessor=None) -> Task:
    """The task a saved model folder was trained for, from its tuneforge.json (text tasks: with its tokenizer)."""
    kind, names = info.get("task", "classification"), info["label_names"]
    if kind == "regression":
        return RegressionTask(names, info["target_mean"], info["target_std"], info.get("target_train_mean", info["target_mean"]))
    if kind == "multilabel":
        return MultiLabelTask(names, info["threshold"])
    if kind == "segmentation":
        return SegmentationTask(names, info["ignore_index"])
    if kind == "detection":
        return DetectionTask(names, info["score_threshold"])
    if kind in ("seq2seq", "captioning", "causal_lm", "qa"):
        return text_task(kind, info["task_settings"], preprocessor, info["max_length"])
    return ClassificationTask(names)


def text_task(kind: str, settings: dict, preprocessor, max_length: int) -> Task:
    tokenizer = getattr(preprocessor, "tokenizer", preprocessor)  # captioning: (image processor, tokenizer)
    if kind == "qa":
        return QATask(tokenizer, max_length, settings["stride"], settings["max_answer_length"])
    if kind == "causal_lm":
        return CausalLMTask(tokenizer, settings["num_beams"], settings["max_new_tokens"], max_length)
    return GenerationTask(kind, tokenizer, settings["num_beams"], settings["max_new_tokens"],
                          settings["source_prefix"], max_length)
