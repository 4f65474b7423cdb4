"""Measuring before training: the data (examples per class, balance, text lengths or image sizes), and how well
the frozen pretrained features already separate the classes, block by block (linear probes).

A linear probe is a logistic regression (a ridge regression for a number) fitted on a block's pooled outputs for
a sample of the training split and scored on a sample of the validation split. One forward pass of the frozen
model computes every block's features at once, so probing every depth costs about one evaluation epoch over the
samples: a small fraction of a fine-tuning run.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from tuneforge.data.common import TaskData, sample
from tuneforge.data.loaders import make_loader
from tuneforge.models.groups import layer_groups
from tuneforge.models.loading import LoadedModel
from tuneforge.tasks.base import Task

PROBE_TRAIN, PROBE_VALIDATION = 2000, 1000  # examples each sample holds at most
SIZE_SAMPLE = 2000  # texts tokenized (or image headers read) to describe lengths and sizes


@dataclass
class DataFacts:
    examples: int
    classes: dict[str, int] = field(default_factory=dict)  # label name -> training examples (tasks with classes)
    tokens: dict | None = None  # median, p95, share cut by model.max_length (text)
    image_size: dict | None = None  # median width and height (images)

    @property
    def smallest_class(self) -> int | None:
        return min(self.classes.values()) if self.classes else None

    @property
    def imbalance(self) -> float | None:
        return max(self.classes.values()) / max(min(self.classes.values()), 1) if self.classes else None


@dataclass
class Probe:
    metric: str  # accuracy (classes) or r2 (a number)
    depths: list[str]  # block.0 ... block.N-1
    scores: list[float]  # on the validation sample, one per depth (mean-pooled block outputs)
    head_input: float  # the same probe on what the new head reads: what training the head alone can reach
    baseline: float  # the majority class's share (accuracy), or 0 (r2 of predicting the mean)
    train_examples: int
    validation_examples: int
    seconds: float

    @property
    def best_depth(self) -> int:
        """The shallowest depth within half a point of the best score: deeper blocks add nothing past it."""
        best = max(self.scores)
        return next(i for i, score in enumerate(self.scores) if score >= best - 0.005)

    @property
    def last(self) -> float:
        return self.scores[-1]


def measure_data(data: TaskData, loaded: LoadedModel, max_length: int, seed: int) -> DataFacts:
    train = data.splits["train"]
    facts = DataFacts(examples=len(train))
    targets = data.targets("train")
    if data.labels and targets and isinstance(targets[0], int):  # one class per example
        counts = Counter(targets)
        facts.classes = {data.label_names[i]: counts.get(i, 0) for i in range(len(data.labels))}
    sampled = sample(train, SIZE_SAMPLE, seed)
    if sampled.texts is not None and hasattr(loaded.preprocessor, "__call__"):
        pairs = sampled.text_pairs or [None] * len(sampled.texts)
        lengths = np.array([len(loaded.preprocessor(t, p)["input_ids"]) if p else len(loaded.preprocessor(t)["input_ids"])
                            for t, p in zip(sampled.texts, pairs)])
        facts.tokens = {"median": int(np.median(lengths)), "p95": int(np.percentile(lengths, 95)),
                        "cut_share": float((lengths > max_length).mean())}
    elif sampled.image_paths is not None:
        sizes = []
        for path in sampled.image_paths:
            try:
                with Image.open(path) as image:
                    sizes.append(image.size)
            except OSError:  # an unreadable image is the data checks' business, not the size's
                continue
        if sizes:
            facts.image_size = {"width": int(np.median([w for w, _ in sizes])),
                                "height": int(np.median([h for _, h in sizes]))}
    return facts


def probe_depths(task: Task, data: TaskData, loaded: LoadedModel, batch_size: int, seed: int) -> Probe | None:
    """Linear probes on every block's pooled output; None for tasks the probe does not cover (it needs one class
    or one number per example and a validation split)."""
    kind = task.probe_target
    if kind is None or "validation" not in data.splits:
        return None
    started = time.perf_counter()
    groups = [g for g in layer_groups(loaded.model, loaded.head_prefixes) if g.name.startswith("block.")]
    if not groups:
        return None
    features, targets = {}, {}
    for name, size in (("train", PROBE_TRAIN), ("validation", PROBE_VALIDATION)):
        split = sample(data.splits[name], size, seed)
        targets[name] = data.encode(split.labels)
        dataset = task.dataset(split, targets[name], loaded.preprocessor)
        features[name] = _block_features(loaded.model, [g.modules[0] for g in groups], loaded.head_prefixes[0],
                                         dataset, batch_size)
    train_y, valid_y = torch.tensor(targets["train"]), torch.tensor(targets["validation"])
    if kind == "number":
        scores = [_ridge_r2(x, train_y.float(), v, valid_y.float()) for x, v in zip(features["train"], features["validation"])]
        baseline = 0.0
    else:
        classes = int(max(train_y.max(), valid_y.max())) + 1
        scores = [_logistic_accuracy(x, train_y, v, valid_y, classes)
                  for x, v in zip(features["train"], features["validation"])]
        baseline = float((valid_y == torch.bincount(train_y, minlength=classes).argmax()).float().mean())
    return Probe("r2" if kind == "number" else "accuracy", [g.name for g in groups], scores[:-1], scores[-1], baseline,
                 len(train_y), len(valid_y), time.perf_counter() - started)


def _block_features(model, modules: list[str], head: str, dataset, batch_size: int) -> list[torch.Tensor]:
    """Each block's output for every example, pooled to one vector (mean over tokens or positions), and last what
    the head reads, in dataset order; the whole model runs once per batch, frozen and in eval mode."""
    grabbed: list = [None] * (len(modules) + 1)

    def grab(index: int):
        def hook(module, args, output):
            grabbed[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def grab_input(module, args):
        grabbed[-1] = args[0]

    handles = [model.get_submodule(name).register_forward_hook(grab(i)) for i, name in enumerate(modules)]
    handles.append(model.get_submodule(head).register_forward_pre_hook(grab_input))
    pooled: list[list] = [[] for _ in grabbed]
    order = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for batch in make_loader(dataset, batch_size, 0):
                inputs = batch["inputs"]
                model(**inputs)
                mask = inputs.get("attention_mask")
                for i, output in enumerate(grabbed):
                    pooled[i].append(_pool(output.float(), mask))
                order.append(batch["index"])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    position = torch.cat(order).argsort()
    return [torch.cat(chunks)[position] for chunks in pooled]


def _pool(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if output.dim() == 3:  # (batch, tokens, width): the mean over real tokens
        weights = mask.unsqueeze(-1).float() if mask is not None and mask.shape == output.shape[:2] else \
            torch.ones(output.shape[:2] + (1,))
        return (output * weights).sum(1) / weights.sum(1).clamp(min=1)
    if output.dim() == 4:  # (batch, channels, height, width): the mean over positions
        return output.mean(dim=(2, 3))
    return output.reshape(output.shape[0], -1)


def _centre(train: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred, not scaled: a head trains on the features as they are, and a direction in which the examples
    barely differ is as hard for the probe (its L2 penalty bounds the weights) as for the head."""
    mean = train.mean(0)
    return train - mean, valid - mean


def _logistic_accuracy(train: torch.Tensor, train_y: torch.Tensor, valid: torch.Tensor, valid_y: torch.Tensor,
                       classes: int, l2: float = 1e-3) -> float:
    """Multinomial logistic regression (L-BFGS, L2 penalty), scored by accuracy on the validation sample."""
    train, valid = _centre(train, valid)
    weights = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weights + bias, train_y) + l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((valid @ weights + bias).argmax(1) == valid_y).float().mean())


def _ridge_r2(train: torch.Tensor, train_y: torch.Tensor, valid: torch.Tensor, valid_y: torch.Tensor,
              l2: float = 1.0) -> float:
    """Ridge regression in closed form, scored by R² on the validation sample (one target: its first column)."""
    train, valid = _centre(train, valid)
    y = train_y.reshape(len(train_y), -1)[:, 0]
    target = valid_y.reshape(len(valid_y), -1)[:, 0]
    gram = train.T @ train + l2 * torch.eye(train.shape[1])
    weights = torch.linalg.solve(gram, train.T @ (y - y.mean()))
    predicted = valid @ weights + y.mean()
    return float(1 - ((predicted - target) ** 2).sum() / ((target - target.mean()) ** 2).sum().clamp(min=1e-12))
