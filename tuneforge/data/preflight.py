"""Load the recipe's splits and check them before any training step.

Every problem across every split is collected and raised together as one
DataError, each naming the file, the row or image, and the fix.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tuneforge.data.sources import Split, read_split
from tuneforge.errors import DataError

SHOWN = 5  # how many offending rows a message lists before summarising


@dataclass
class TaskData:
    splits: dict[str, Split]
    labels: list[str]  # class index -> label value (as text)
    label_names: list[str]  # class index -> display name
    modality: str  # "text" or "image"
    notes: list[str] = field(default_factory=list)  # non-fatal findings (e.g. skipped images)

    def label_ids(self, split: str) -> list[int]:
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[label_key(value)] for value in self.splits[split].labels]


def label_key(value) -> str:
    """Labels compare as text, so 1, 1.0 and '1' from different file formats agree."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value).strip()


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _listing(rows: list[str]) -> str:
    shown = ", ".join(rows[:SHOWN])
    return shown + (f" and {len(rows) - SHOWN} more" if len(rows) > SHOWN else "")


def _check_texts(split: Split, column: str, values: list) -> list[str]:
    bad = [row for row, value in zip(split.rows, values) if _missing(value) or not str(value).strip()]
    if not bad:
        return []
    return [f"{split.name}: {len(bad)} empty or missing value(s) in column '{column}' at {_listing(bad)}; fill or remove those rows"]


def _readable(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            image.load()
        return None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"{type(error).__name__}: {error}"


def _check_images(split: Split, skip_unreadable: bool, notes: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(_readable, split.image_paths))
    bad = [(str(path), why) for path, why in zip(split.image_paths, verdicts) if why]
    if not bad:
        return []
    if skip_unreadable:
        keep = [i for i, why in enumerate(verdicts) if not why]
        kept = split.select(keep)
        split.labels, split.rows, split.image_paths = kept.labels, kept.rows, kept.image_paths
        notes.append(f"{split.name}: skipped {len(bad)} unreadable image(s): {_listing([p for p, _ in bad])}")
        return []
    details = "; ".join(f"{path} ({why})" for path, why in bad[:SHOWN])
    more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    return [f"{split.name}: {len(bad)} unreadable image(s): {details}{more}; "
            "remove them or set data.skip_unreadable_images: true"]


def check_split(split: Split, data_spec, notes: list[str], require_labels: bool = True) -> list[str]:
    """Problems with one split's examples: empty texts, unreadable images, missing labels, no rows."""
    problems = []
    if split.image_paths is None:
        problems += _check_texts(split, data_spec.text_column, split.texts)
        if split.text_pairs is not None:
            problems += _check_texts(split, data_spec.text_pair_column, split.text_pairs)
    else:
        problems += _check_images(split, data_spec.skip_unreadable_images, notes)
    if require_labels:
        missing = [row for row, value in zip(split.rows, split.labels) if _missing(value) or label_key(value) == ""]
        if missing:
            problems.append(f"{split.name}: {len(missing)} missing label(s) in column '{data_spec.label_column}' "
                            f"at {_listing(missing)}")
    if len(split) == 0:
        problems.append(f"{split.name}: split {split.source} has no examples")
    return problems


def unknown_labels(split: Split, labels: list[str], fix: str) -> list[str]:
    unseen = [(row, label_key(v)) for row, v in zip(split.rows, split.labels) if not _missing(v) and label_key(v) not in labels]
    if not unseen:
        return []
    values = sorted({value for _, value in unseen})
    return [f"{split.name}: label(s) {values} are not known to the model (known: {labels}) at "
            f"{_listing([row for row, _ in unseen])}; {fix}"]


def _sample(split: Split, count: int | None, seed: int) -> Split:
    if count is None or count >= len(split):
        return split
    chosen = np.random.default_rng(seed).choice(len(split), size=count, replace=False)
    return split.select(sorted(chosen.tolist()))


def _carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    order = np.random.default_rng(seed).permutation(len(train)).tolist()
    cut = max(1, int(round(fraction * len(train))))
    validation = train.select(sorted(order[:cut]))
    validation.name = "validation"
    return train.select(sorted(order[cut:])), validation


def load_task_data(data_spec, task_spec) -> TaskData:
    """Read every split the recipe names, check them all, and fix the label set."""
    problems, notes = [], []
    if not data_spec.train:
        raise DataError(["data.train is not set: give the training file or image folder"])
    locations = {"train": data_spec.train, "validation": data_spec.validation, "test": data_spec.test}
    splits = {name: read_split(name, where, data_spec) for name, where in locations.items() if where}
    for split in splits.values():
        problems += split.problems
    if problems:  # files or columns missing: nothing below can be checked meaningfully
        raise DataError(problems)

    if data_spec.validation_fraction:
        splits["train"], splits["validation"] = _carve_validation(splits["train"], data_spec.validation_fraction, data_spec.split_seed)
    splits["train"] = _sample(splits["train"], data_spec.max_train_examples, data_spec.split_seed)
    if "validation" in splits:  # the test split is never subsampled: its figures are the ones reported
        splits["validation"] = _sample(splits["validation"], data_spec.max_validation_examples, data_spec.split_seed)

    modality = "image" if splits["train"].image_paths is not None else "text"
    for split in splits.values():
        problems += check_split(split, data_spec, notes)

    train_labels = sorted({label_key(v) for v in splits["train"].labels if not _missing(v)}, key=_natural)
    labels = list(task_spec.labels) if task_spec.labels else train_labels
    if task_spec.labels:
        unknown = sorted(set(train_labels) - set(labels))
        if unknown:
            problems.append(f"train: label(s) {unknown} are not in task.labels {labels}; add them to task.labels")
    elif len(labels) < 2 and splits["train"].labels:
        problems.append(f"train: only one label ({labels}) found in column '{data_spec.label_column}'; classification needs at least two")
    for name in ("validation", "test"):
        if name in splits:
            problems += unknown_labels(splits[name], labels, "they never appear in train: fix them or list them in task.labels")
    if problems:
        raise DataError(problems)
    names = list(task_spec.label_names) if task_spec.label_names else labels
    return TaskData(splits, labels, names, modality, notes)


def _natural(label: str):
    # Numeric labels sort as numbers (2 before 10); others alphabetically.
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)
