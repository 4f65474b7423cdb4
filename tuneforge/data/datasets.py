"""Datasets of examples with a label, a target value or a mask: texts tokenised once into memory-mapped
arrays and padded per batch, images decoded when a batch asks for them."""

from __future__ import annotations

import io
import itertools
import tempfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tuneforge.data.common import Split


class ExampleDataset(Dataset):
    """What the loaders, the memory probe and the feature cache may ask of any task's dataset: examples as dicts,
    `collate` to a batch {"inputs", "labels", "index", ...}, and three things with defaults."""

    decodes_images = False  # its examples decode images: loader worker processes help
    notes: tuple[str, ...] | list[str] = ()  # what building it found worth saying (e.g. texts cut to the limit)

    def lengths(self) -> list[int] | None:
        """Each example's length in tokens (batches group examples of similar length), or None."""
        return None

    def collate(self, items: list[dict]) -> dict:
        raise TypeError(f"{type(self).__name__} defines no collate")


class TextDataset(ExampleDataset):
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


class ImageDataset(ExampleDataset):
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


class SegmentationDataset(ExampleDataset):
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
