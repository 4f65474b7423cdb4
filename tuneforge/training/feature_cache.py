"""Frozen-feature caching: compute a frozen prefix of the model once, train the rest on its outputs.

When every stage of a freezing plan keeps the embeddings (or stem) and the first K blocks
frozen, those layers compute the same function of the same inputs in every epoch (the plan
runs them in eval mode). So their outputs are computed once, in one inference pass, stored
per example in a memory-mapped file, and every training step replays them: the prefix's
modules are swapped for stand-ins only for the duration of a forward call (the model's
own forward runs unchanged, so its masks, pooling and head behave as without the cache).

Text stores each example's unpadded rows (one per token) and re-pads them to each batch's
length; images store one fixed-shape tensor per example and are not decoded again. The
cache is keyed by a hash of the prefix's weights and the examples' inputs and
preprocessing, so any change rebuilds it; the replay is checked against a full forward on
a real batch before training uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tuneforge.data.datasets import ExampleDataset, ImageDataset, TextDataset
from tuneforge.data.loaders import length_order, loader_workers
from tuneforge.models.groups import covering_modules

CACHE_KEY = "cached_features"  # the entry of a batch's inputs that carries the replayed outputs
TOLERANCE = 1e-4  # replayed vs full forward, max absolute logit difference, float32


class _StandIn(nn.Module):
    """Takes a prefix module's place during one forward call.

    Attributes it lacks come from the module it replaces: a model's forward may read its
    submodules' settings (ViT reads the patch projection's dtype) before calling them.
    """

    def __init__(self, original: nn.Module, value: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not registered: no parameters of its own
        self.value = value  # the first stand-in returns the cached outputs; the others hand on their input

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *args, **kwargs):
        if self.value is not None:
            return self.value
        return args[0] if args else kwargs["hidden_states"]


@dataclass
class FrozenPrefix:
    groups: list[str]  # layer groups it covers, e.g. embeddings, block.0, block.1
    modules: list[str]  # whole modules computing it, in forward order

    @property
    def boundary(self) -> str:
        return self.modules[-1]  # the last frozen block: its output is what is cached


def install_replay(model: nn.Module, prefix: FrozenPrefix):
    """Let `model(**inputs, cached_features=...)` skip the prefix; returns handles to remove the hooks."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def before(module, args, kwargs):
        if CACHE_KEY not in kwargs:
            return None
        value = kwargs.pop(CACHE_KEY)
        for index, path in enumerate(prefix.modules):
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent)
            original = owner._modules[name]
            swapped.append((owner, name, original))
            owner._modules[name] = _StandIn(original, value if index == 0 else None)
        return args, kwargs

    def after(module, args, output):
        while swapped:  # also after an exception (always_call), so the real modules always come back
            owner, name, original = swapped.pop()
            owner._modules[name] = original

    return [model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, always_call=True)]


class _Stop(Exception):
    pass


@torch.inference_mode()
def _boundary_outputs(model: nn.Module, prefix: FrozenPrefix, batch: dict) -> torch.Tensor:
    """The boundary module's output for a batch; the rest of the model is not run."""
    seen = []

    def grab(module, args, output):
        seen.append(output)
        raise _Stop

    handle = model.get_submodule(prefix.boundary).register_forward_hook(grab)
    try:
        model(**batch["inputs"])
    except _Stop:
        pass
    finally:
        handle.remove()
    output = seen[0] if seen else None
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{prefix.boundary} returns {type(output).__name__}, not a tensor")
    return output.float()


class FeatureStore:
    """Per-example outputs in one float32 array: example i owns rows offsets[i]:offsets[i + 1]."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray, per_token: bool):
        self.values, self.offsets, self.per_token = values, offsets, per_token

    def view(self, index: int) -> np.ndarray:
        """Example `index`'s rows, read from the memory map only when copied (into a batch)."""
        return self.values[self.offsets[index]:self.offsets[index + 1]]

    def rows(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.view(index)))

    @classmethod
    def open(cls, folder: Path) -> FeatureStore:
        meta = json.loads((folder / "meta.json").read_text())
        return cls(np.load(folder / "values.npy", mmap_mode="r"), np.load(folder / "offsets.npy"), meta["per_token"])


def dataset_fingerprint(dataset: Dataset) -> str:
    """What the prefix's input depends on: token ids, or image files and their preprocessing."""
    digest = hashlib.sha256()
    if isinstance(dataset, TextDataset):
        digest.update(dataset.offsets.tobytes())
        for key in sorted(dataset.tokens):
            digest.update(key.encode())
            digest.update(dataset.tokens[key].tobytes())
    else:
        processor = dataset.image_processor
        config = processor.to_dict() if hasattr(processor, "to_dict") else repr(processor)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for path in dataset.paths:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def cache_key(model: nn.Module, prefix: FrozenPrefix, dataset: Dataset) -> str:
    digest = hashlib.sha256(json.dumps(prefix.modules).encode())
    for path in prefix.modules:
        for name, tensor in sorted(model.get_submodule(path).state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(dataset_fingerprint(dataset).encode())
    return digest.hexdigest()


def build_store(model: nn.Module, prefix: FrozenPrefix, dataset: Dataset, folder: Path, batch_size: int,
                device, workers: int | str = "auto") -> FeatureStore:
    """Compute (or reuse, when the key matches) the boundary outputs of every example in `dataset`."""
    key = cache_key(model, prefix, dataset)
    meta = folder / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("key") == key:
        return FeatureStore.open(folder)
    per_token = isinstance(dataset, TextDataset)
    # Shortest first, so that batches of similar length pad almost nothing.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=length_order(dataset), collate_fn=dataset.collate,
                        num_workers=loader_workers(workers, dataset))
    # Named per process: trials of a study running side by side may build the same store at once.
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    lengths = dataset.lengths() if per_token else [1] * len(dataset)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values, written = None, 0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
            output = _boundary_outputs(model, prefix, {"inputs": inputs}).cpu().numpy()
            if values is None:
                shape = output.shape[2:] if per_token else output.shape[1:]
                values = np.lib.format.open_memmap(partial / "values.npy", mode="w+", dtype=np.float32,
                                                   shape=(int(offsets[-1]), *shape))
            mask = batch["inputs"]["attention_mask"].bool().numpy() if per_token else None
            for row, index in enumerate(batch["index"].tolist()):
                start, end = offsets[index], offsets[index + 1]
                values[start:end] = output[row][mask[row]] if per_token else output[row:row + 1]
                written += end - start
    finally:
        model.train(was_training)
    if written != offsets[-1]:
        raise RuntimeError(f"feature cache: {written} rows computed, {offsets[-1]} expected")
    values.flush()
    np.save(partial / "offsets.npy", offsets)
    (partial / "meta.json").write_text(json.dumps({"key": key, "per_token": per_token, "boundary": prefix.boundary,
                                                   "examples": len(dataset)}))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        partial.rename(folder)  # a store is complete or absent, never half-written
    except OSError:  # another process put the same store there in the meantime: use it
        shutil.rmtree(partial, ignore_errors=True)
        if not (meta.exists() and json.loads(meta.read_text()).get("key") == key):
            raise
    return FeatureStore.open(folder)


class CachedDataset(ExampleDataset):
    """A dataset whose examples carry their cached prefix outputs (images are not decoded at all)."""

    def __init__(self, base: TextDataset | ImageDataset, store: FeatureStore):
        self.base, self.store = base, store
        self.targets = base.targets

    def __len__(self) -> int:
        return len(self.base)

    def lengths(self) -> list[int]:
        return self.base.lengths() if self.store.per_token else [1] * len(self)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index] if self.store.per_token else {"label": self.targets[index], "index": index}
        return {**item, "cached": self.store.view(index)}

    def collate(self, items: list[dict]) -> dict:
        views = [item["cached"] for item in items]
        if self.store.per_token:
            batch = self.base.collate(items)
            width = batch["inputs"]["attention_mask"].shape[1]
            # Each example's rows go where its tokens are (the padding side's end); padding positions get
            # zeros, and attention masks them out as it does the real ones. One copy, out of the memory map.
            cached = np.zeros((len(views), width, *views[0].shape[1:]), dtype=views[0].dtype)
            left = self.base.tokenizer.padding_side == "left"
            for row, values in enumerate(views):
                if left:
                    cached[row, width - len(values):] = values
                else:
                    cached[row, :len(values)] = values
        else:
            cached = np.concatenate(views)
            # The model's forward still wants its input argument; the replay ignores it.
            batch = {"inputs": {"pixel_values": torch.zeros(len(items))},
                     "labels": torch.tensor([item["label"] for item in items]),
                     "index": torch.tensor([item["index"] for item in items])}
        batch["inputs"][CACHE_KEY] = torch.from_numpy(cached)
        return batch


def replay_mismatch(model: nn.Module, cached_set: CachedDataset, plain_set: Dataset, device) -> float:
    """Max absolute logit difference between a full forward and the replay, on the first examples."""
    indices = list(range(min(8, len(plain_set))))
    plain = plain_set.collate([plain_set[i] for i in indices])
    cached = cached_set.collate([cached_set[i] for i in indices])
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            full = model(**{k: v.to(device) for k, v in plain["inputs"].items()}).logits
            replayed = model(**{k: v.to(device) for k, v in cached["inputs"].items()}).logits
    finally:
        model.train(was_training)
    return float((full.float() - replayed.float()).abs().max())


def cache_splits(model: nn.Module, prefix: FrozenPrefix, datasets: dict, folder: Path, batch_size: int,
                 device, workers: int | str = "auto") -> tuple[dict, list]:
    """Cached versions of `datasets`, checked against the full model; raises ValueError when the replay differs."""
    with torch.random.fork_rng(devices=[]):  # a loader's iterator draws a seed: keep the training RNG where it was
        cached = {name: CachedDataset(dataset, build_store(model, prefix, dataset, folder / name, batch_size, device,
                                                                 workers))
                  for name, dataset in datasets.items()}
    handles = install_replay(model, prefix)
    first = next(iter(datasets))
    mismatch = replay_mismatch(model, cached[first], datasets[first], device)
    if not mismatch <= TOLERANCE:
        for handle in handles:
            handle.remove()
        raise ValueError(f"replaying the cached outputs of {prefix.boundary} changes the logits by {mismatch:.2g} "
                         f"(more than {TOLERANCE}): this model's forward does more than chain its blocks")
    return cached, handles


@contextlib.contextmanager
def remove_hooks(handles: list):
    """Remove the replay hooks at the end of a run (the model may be used again afterwards)."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def choose_prefix(setting, plan, model: nn.Module, augmenting: bool, processes: int) -> tuple[FrozenPrefix | None, str]:
    """The prefix to cache under `train.cache_features` (auto / true / false), or None and why not."""

    if setting is False:
        return None, "train.cache_features is false"
    modules = covering_modules(model, plan.fixed)
    why = ("the freezing plan trains the embeddings (or stem) or the first block in some stage" if not plan.fixed
           else "the frozen front of this model is not made of whole modules" if modules is None
           else "data.augment changes the inputs every epoch" if augmenting
           else "training runs in several processes" if processes > 1
           else "")
    if why:
        return None, why
    return FrozenPrefix([g.name for g in plan.fixed], modules), ""
