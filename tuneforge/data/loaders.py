"""Batches: a training order that resumes exactly, and loaders that evaluate shortest text first."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tuneforge.data.datasets import ExampleDataset


class EpochBatchSampler:
    """Shuffled batches whose order depends only on (seed, epoch).

    Because the order is a pure function of the epoch, a resumed run can skip
    exactly the batches it already trained on (start_epoch(epoch, skip=k)) and
    see the same batches in the same order as an uninterrupted run.

    With `lengths`, examples of similar length share a batch (shuffled, then
    sorted within windows of 50 batches, then the batches shuffled), so dynamic
    padding pads little: on SST-2 phrases this halves the tokens a step computes.
    """

    GROUP_WINDOW = 50  # batches per sorting window: enough to match lengths, small enough to stay random

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True,
                 lengths: list[int] | None = None, weights: list[float] | None = None):
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.lengths = lengths
        self.weights = weights  # draw examples with replacement, in proportion (class-balanced sampling)
        self.epoch, self.skip = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        # Not named set_epoch: Accelerate calls set_epoch(n) on batch samplers itself.
        self.epoch, self.skip = epoch, skip

    def epoch_batches(self) -> list[list[int]]:
        if not self.shuffle:
            order = list(range(self.num_examples))
            return [order[i:i + self.batch_size] for i in range(0, self.num_examples, self.batch_size)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(torch.tensor(self.weights, dtype=torch.double), self.num_examples,
                                      replacement=True, generator=generator).tolist()
        else:
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        if self.lengths is None or self.weights is not None:
            return [order[i:i + self.batch_size] for i in range(0, self.num_examples, self.batch_size)]
        window = self.batch_size * self.GROUP_WINDOW
        batches = []
        for start in range(0, self.num_examples, window):
            chunk = sorted(order[start:start + window], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]

    def __iter__(self):
        yield from self.epoch_batches()[self.skip:]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip


def balanced_weights(targets: list[int]) -> list[float]:
    """Per-example sampling weight 1 / (count of its class): every class is drawn equally often."""
    counts = torch.bincount(torch.tensor(targets)).tolist()
    return [1.0 / counts[label] for label in targets]


def loader_workers(setting: int | str, dataset: Dataset) -> int:
    """auto: decoding images is the slow part of loading, so it gets worker processes (one core stays for
    training); text is tokenised up front and cached features are already decoded, so workers would only add IPC."""
    if setting != "auto":
        return setting
    if not dataset.decodes_images:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Dataset, batch_size: int, num_workers: int | str, sampler: EpochBatchSampler | None = None) -> DataLoader:
    """Training batches come from `sampler`; evaluation batches go shortest text first.

    Sorting by length makes dynamic padding pad almost nothing (SST-2 evaluates about 3x
    faster); `predict_logits` puts the results back in dataset order by each example's index.
    """
    workers = loader_workers(num_workers, dataset)
    # Pinned host memory lets batches copy to the GPU while the previous step computes.
    options = {"collate_fn": dataset.collate, "num_workers": workers, "pin_memory": torch.cuda.is_available(),
               "persistent_workers": workers > 0}
    if sampler is not None:
        # A private generator: each new iterator draws a worker seed from it, and drawing from the
        # global RNG instead would shift the dropout masks of a resumed run.
        return DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator().manual_seed(sampler.seed), **options)
    return DataLoader(dataset, batch_size=batch_size, sampler=length_order(dataset), **options)


def length_order(dataset: ExampleDataset) -> list[int]:
    """Example indices, shortest first for text (stable, so equal lengths keep their order); as is otherwise."""
    lengths = dataset.lengths()
    if lengths is None:
        return list(range(len(dataset)))
    return np.argsort(np.asarray(lengths), kind="stable").tolist()
