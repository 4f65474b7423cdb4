"""What every task's data has in common: the split type, the checks every reader shares, and the one
pipeline from a recipe's data section to checked splits (`read_task_data`).

Readers never raise on bad content; they return what they found and the problems they saw, so that
every problem across every split is reported in one DataError, each naming the file, the row or
image, and the fix.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tuneforge.errors import DataError, listing

SHOWN = 5  # how many offending rows a message lists before summarising


@dataclass
class Split:
    """One split of examples as read from disk, before any encoding.

    `rows` holds where each example came from (a file line number, or an image
    path) so that problems and predictions can point at it.
    """

    name: str
    source: str
    labels: list
    rows: list[str]
    texts: list | None = None
    text_pairs: list | None = None
    image_paths: list[Path] | None = None
    problems: list[str] = field(default_factory=list)
    sizes: list | None = None  # detection: each image's (width, height) as its annotation states it

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: list[int]) -> Split:
        pick = lambda values: None if values is None else [values[i] for i in indices]
        return Split(
            self.name, self.source, pick(self.labels), pick(self.rows),
            pick(self.texts), pick(self.text_pairs), pick(self.image_paths), list(self.problems), pick(self.sizes),
        )

    def keep(self, indices: list[int]) -> None:
        """Keep only the examples at `indices`, in place."""
        kept = self.select(indices)
        self.labels, self.rows, self.texts, self.text_pairs = kept.labels, kept.rows, kept.texts, kept.text_pairs
        self.image_paths, self.sizes = kept.image_paths, kept.sizes


@dataclass
class TaskData:
    splits: dict[str, Split]
    labels: list[str]  # output index -> label value (as text); regression: the target columns; text tasks: none
    label_names: list[str]  # output index -> display name
    modality: str  # "text" or "image"
    notes: list[str] = field(default_factory=list)  # non-fatal findings (e.g. skipped images)
    encode: Callable[[list], list] = list  # a split's raw targets -> what the loss compares outputs with

    def targets(self, split: str) -> list:
        return self.encode(self.splits[split].labels)


# ---------------------------------------------------------------- values

def label_key(value) -> str:
    """Labels compare as text, so 1, 1.0 and '1' from different file formats agree."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value).strip()


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def natural(label: str):
    """Sort key: numeric labels as numbers (2 before 10), others alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def rows_listing(rows: list[str]) -> str:
    return listing(rows, limit=200, count=SHOWN)


# ---------------------------------------------------------------- checks every reader shares

def check_texts(split: Split, column: str, values: list) -> list[str]:
    """Every text present and non-empty, and text: a JSON list or object in a text column is not a text."""
    bad = [row for row, value in zip(split.rows, values) if missing(value) or not str(value).strip()]
    structured = [row for row, value in zip(split.rows, values) if isinstance(value, (dict, list, tuple))]
    problems = [f"{split.name}: {len(bad)} empty or missing value(s) in column '{column}' at {rows_listing(bad)}; "
                "fill or remove those rows"] if bad else []
    if structured:
        problems.append(f"{split.name}: {len(structured)} value(s) in column '{column}' are lists or objects, not "
                        f"texts, at {rows_listing(structured)}")
    return problems


def _readable(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            image.load()
        return None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"{type(error).__name__}: {error}"


def check_images(split: Split, skip_unreadable: bool, notes: list[str]) -> list[str]:
    """Every image opened and decoded; unreadable ones are reported, or with `skip_unreadable` left out and noted."""
    absent = [row for row, path in zip(split.rows, split.image_paths) if path is None]
    if absent:  # a table of image paths with empty cells
        return [f"{split.name}: {len(absent)} empty image path(s) at {rows_listing(absent)}; fill or remove those rows"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(_readable, split.image_paths))
    bad = [(str(path), why) for path, why in zip(split.image_paths, verdicts) if why]
    if not bad:
        return []
    if skip_unreadable:
        split.keep([i for i, why in enumerate(verdicts) if not why])
        notes.append(f"{split.name}: skipped {len(bad)} unreadable image(s): {rows_listing([p for p, _ in bad])}")
        return []
    details = "; ".join(f"{path} ({why})" for path, why in bad[:SHOWN])
    more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    return [f"{split.name}: {len(bad)} unreadable image(s): {details}{more}; "
            "remove them or set data.skip_unreadable_images: true"]


def drop_or_report(split: Split, bad: list[tuple[int, str]], what: str, drop: bool, notes: list[str],
                   problems: list[str]) -> None:
    """`bad`: (example position, problem) pairs. Drop those examples and note how many, or report them
    with where they come from and the image's name."""
    if not bad:
        return
    offending = sorted({index for index, _ in bad})
    if drop:
        names = [split.image_paths[i].name for i in offending]
        split.keep([i for i in range(len(split)) if i not in set(offending)])
        notes.append(f"{split.name}: dropped {len(offending)} {what}: {rows_listing(names)}")
        if not len(split):
            problems.append(f"{split.name}: no image is left after dropping the {what}")
        return
    details = "; ".join(f"{split.rows[i]}{'' if split.rows[i].endswith(split.image_paths[i].name) else f' ({split.image_paths[i].name})'}"
                        f": {problem}" for i, problem in bad[:SHOWN])
    more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    problems.append(f"{split.name}: {len(offending)} {what}: {details}{more}; fix them or set "
                    "data.drop_bad_annotations: true")


# ---------------------------------------------------------------- carving and sampling

def sample(split: Split, count: int | None, seed: int) -> Split:
    """A seeded sample of `count` examples (in their file order), or the split when it has no more."""
    if count is None or count >= len(split):
        return split
    chosen = np.random.default_rng(seed).choice(len(split), size=count, replace=False)
    return split.select(sorted(chosen.tolist()))


def split_by_group(items: list, fraction: float, seed: int, key, word: str = "group") -> tuple[list, list]:
    """(kept, held_out): whole groups (`key(item)`) go to held_out until it holds >= fraction of the items.

    The groups are shuffled with `seed` after sorting, so the result depends only on the items and the
    seed, not on their order. Both parts keep the items' original order."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
    groups = sorted({key(item) for item in items})
    if len(groups) < 2:
        raise ValueError(f"splitting by {word} needs at least two {word}s; found {len(groups)}")
    random.Random(seed).shuffle(groups)
    sizes: dict = defaultdict(int)
    for item in items:
        sizes[key(item)] += 1
    held: set = set()
    total = 0
    for group in groups[:-1]:  # the last group always stays, so kept is never empty
        if total >= fraction * len(items):
            break
        held.add(group)
        total += sizes[group]
    return [item for item in items if key(item) not in held], [item for item in items if key(item) in held]


def carve(split: Split, fraction: float, seed: int, name: str, groups: tuple[list, str] | None) -> tuple[Split, Split]:
    """Hold out `fraction` of a split as the split `name`: whole groups when the task has them (every
    question of an article, every caption of an image, on one side), rows otherwise."""
    if groups is not None:
        keys, word = groups
        try:
            kept, held = split_by_group(list(range(len(split))), fraction, seed, key=keys.__getitem__, word=word)
        except ValueError as error:  # a single group: nothing to hold out without sharing it
            raise DataError([f"{split.name}: cannot hold out a {name} split by whole {word}s ({error}); give "
                             f"data.{name} as a file instead"]) from None
        parts = split.select(kept), split.select(held)
    else:
        order = np.random.default_rng(seed).permutation(len(split)).tolist()
        cut = max(1, int(round(fraction * len(split))))
        parts = split.select(sorted(order[cut:])), split.select(sorted(order[:cut]))
    parts[1].name = name
    return parts


# ---------------------------------------------------------------- the pipeline

def read_task_data(data_spec, task, spec) -> TaskData:
    """Every split the recipe names, read with the task's reader, carved (data.test_fraction,
    data.validation_fraction) and sampled (data.max_*_examples), checked, and the label set fixed.
    `task` is a task class, `spec` the recipe's task section. Raises one DataError with every problem."""
    if not data_spec.train:
        raise DataError(["data.train is not set: give the training file or image folder"])
    notes: list[str] = []
    locations = {"train": data_spec.train, "validation": data_spec.validation, "test": data_spec.test}
    splits = {name: task.read_split(name, where, data_spec, notes) for name, where in locations.items() if where}
    problems = [problem for split in splits.values() for problem in split.problems]
    if problems:  # files or columns missing: nothing below can be checked meaningfully
        raise DataError(problems)
    for name, fraction in (("test", data_spec.test_fraction), ("validation", data_spec.validation_fraction)):
        if fraction and name in splits:
            raise DataError([f"give data.{name} or data.{name}_fraction, not both"])
        if fraction:
            splits["train"], splits[name] = carve(splits["train"], fraction, data_spec.split_seed, name,
                                                  task.example_groups(splits["train"]))
    splits["train"] = sample(splits["train"], data_spec.max_train_examples, data_spec.split_seed)
    if "validation" in splits:  # the test split is never subsampled: its figures are the ones reported
        splits["validation"] = sample(splits["validation"], data_spec.max_validation_examples, data_spec.split_seed)
    for split in splits.values():
        problems += task.check_split(split, data_spec, notes)
    labels, names = task.label_set(splits, data_spec, spec, notes, problems)
    if problems:
        raise DataError(problems)
    return TaskData(splits, labels, names, task.modality_of(splits["train"]), notes,
                    lambda values: task.encode_targets(values, labels, data_spec))


def read_labelled_file(path: str, data_spec, task, info) -> Split:
    """A labelled file to evaluate a saved model on, read and checked as training read its splits."""
    split = task.read_split("evaluation", str(path), data_spec, [])
    problems = split.problems or task.check_split(split, data_spec, [])
    problems = problems or task.check_known(split, info)
    if problems:
        raise DataError(problems)
    return split
