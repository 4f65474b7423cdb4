"""Turn checked splits into batches: tokenise once, decode images lazily, pad per batch."""

from __future__ import annotations

import io
import itertools
import os
import tempfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tuneforge.data.sources import Split


class TextDataset(Dataset):
    """Tokenised once, up front, into flat int32 arrays (4 bytes a token instead of a Python list per
    example) that live in memory-mapped temporary files: pages the OS can drop and re-read, not memory
    the process holds, so the training set's size does not set the memory a run needs. Padding happens
    per batch (dynamic)."""

    CHUNK = 10_000  # texts per tokenizer call: bounds the memory of the tokenizer's own Python lists

    def __init__(self, split: Split, targets: list, tokenizer, max_length: int, memory_map: bool = True):
        files: dict = {}  # memory_map False (a few inputs to predict): in-memory buffers instead of files
        lengths: list[int] = []
        for start in range(0, len(split), self.CHUNK):
            texts = [str(t) for t in split.texts[start:start + self.CHUNK]]
            pairs = [str(t) for t in split.text_pairs[start:start + self.CHUNK]] if split.text_pairs is not None else None
            encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
            for key, values in encoded.items():
                file = files.setdefault(key, tempfile.TemporaryFile(prefix="tuneforge-tokens-") if memory_map
                                        else io.BytesIO())
                file.write(np.fromiter(itertools.chain.from_iterable(values), dtype=np.int32).tobytes())
            lengths += [len(ids) for ids in encoded["input_ids"]]
        self.tokens = {key: _map_int32(file) for key, file in files.items()}
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # example i: offsets[i]:offsets[i+1]
        self.targets = targets
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.targets)

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def __getitem__(self, index: int) -> dict:
        start, end = self.offsets[index], self.offsets[index + 1]
        features = {key: values[start:end] for key, values in self.tokens.items()}
        return {"features": features, "label": self.targets[index], "index": index}

    def collate(self, items: list[dict]) -> dict:
        """Pad to the longest example of the batch, on the tokenizer's padding side, with its pad values."""
        features = [item["features"] for item in items]
        if "attention_mask" not in features[0]:  # the models read it; a tokenizer that leaves it out means all ones
            features = [{**f, "attention_mask": np.ones_like(f["input_ids"])} for f in features]
        width = max(len(f["input_ids"]) for f in features)
        pad_values = {"input_ids": self.tokenizer.pad_token_id or 0, "attention_mask": 0,
                      "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0)}
        left = self.tokenizer.padding_side == "left"
        inputs = {}
        for key in features[0]:
            padded = np.full((len(features), width), pad_values.get(key, 0), dtype=np.int64)
            for row, f in enumerate(features):
                values = f[key]
                if left:
                    padded[row, width - len(values):] = values
                else:
                    padded[row, :len(values)] = values
            inputs[key] = torch.from_numpy(padded)
        return {
            "inputs": inputs,
            "labels": torch.tensor([item["label"] for item in items]),
            "index": torch.tensor([item["index"] for item in items]),
        }


def _map_int32(file) -> np.ndarray:
    """The int32 values written to `file`: memory-mapped read-only from an unlinked temporary file, or an in-memory buffer's."""
    if isinstance(file, io.BytesIO):
        return np.frombuffer(file.getbuffer(), dtype=np.int32)
    file.flush()
    if file.tell() == 0:
        return np.zeros(0, dtype=np.int32)  # mmap cannot map an empty file
    values = np.memmap(file, dtype=np.int32, mode="r")
    file.close()  # the mapping keeps the data; the disk space is freed when the mapping goes
    return values


def load_rgb(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageDataset(Dataset):
    """Images are decoded when a batch asks for them (once per epoch at most)."""

    decodes_images = True  # loader_workers gives it worker processes

    def __init__(self, split: Split, targets: list, image_processor):
        self.paths = split.image_paths
        self.targets = targets
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        pixels = self.image_processor(load_rgb(self.paths[index]), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "label": self.targets[index], "index": index}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return {
            "inputs": {"pixel_values": torch.stack([item["pixel_values"] for item in items])},
            "labels": torch.tensor([item["label"] for item in items]),
            "index": torch.tensor([item["index"] for item in items]),
        }


class SegmentationDataset(Dataset):
    """Image + mask pairs: the image through the model's processor, the mask resized to the same size
    with nearest-neighbour sampling (class indices must never be blended)."""

    decodes_images = True

    def __init__(self, split: Split, masks: list, image_processor):
        self.paths, self.masks, self.image_processor = split.image_paths, masks, image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        pixels = self.image_processor(load_rgb(self.paths[index]), return_tensors="pt")["pixel_values"][0]
        mask = self.masks[index]
        if mask is None:  # an input to predict
            labels = torch.zeros(pixels.shape[-2:], dtype=torch.long)
        else:
            with Image.open(mask) as opened:
                resized = opened.resize((pixels.shape[-1], pixels.shape[-2]), Image.NEAREST)
                labels = torch.from_numpy(np.asarray(resized).astype(np.int64))
        return {"pixel_values": pixels, "label": labels, "index": index}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return {"inputs": {"pixel_values": torch.stack([item["pixel_values"] for item in items])},
                "labels": torch.stack([item["label"] for item in items]),
                "index": torch.tensor([item["index"] for item in items])}


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


def make_dataset(split: Split, targets: list, preprocessor, max_length: int, kind: str = "classification",
                 labels: list[str] | None = None, augment=None) -> Dataset:
    """`labels` and `augment` (a box-aware augmenter for a training split) are for detection."""
    if kind == "segmentation":
        return SegmentationDataset(split, targets, preprocessor)
    if kind == "detection":
        from tuneforge.data.detection import DetectionDataset

        return DetectionDataset(split, targets, preprocessor, {label: i for i, label in enumerate(labels)}, augment)
    if split.image_paths is not None:
        return ImageDataset(split, targets, preprocessor)
    return TextDataset(split, targets, preprocessor, max_length)


def loader_workers(setting: int | str, dataset: Dataset) -> int:
    """auto: decoding images is the slow part of loading, so it gets worker processes (one core stays for
    training); text is tokenised up front and cached features are already decoded, so workers would only add IPC."""
    if setting != "auto":
        return setting
    if not getattr(dataset, "decodes_images", False):
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


def length_order(dataset: Dataset) -> list[int]:
    """Example indices, shortest first for text (stable, so equal lengths keep their order); as is otherwise."""
    if not hasattr(dataset, "lengths"):
        return list(range(len(dataset)))
    return np.argsort(np.asarray(dataset.lengths()), kind="stable").tolist()
