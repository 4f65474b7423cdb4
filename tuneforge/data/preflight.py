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
from tuneforge.errors import DataError, listing

SHOWN = 5  # how many offending rows a message lists before summarising


@dataclass
class TaskData:
    splits: dict[str, Split]
    labels: list[str]  # output index -> label value (as text); regression: the target columns
    label_names: list[str]  # output index -> display name
    modality: str  # "text" or "image"
    notes: list[str] = field(default_factory=list)  # non-fatal findings (e.g. skipped images)
    kind: str = "classification"  # task.type
    separator: str = ","  # multilabel: between the labels of one text cell

    def targets(self, split: str) -> list:
        return encode_targets(self.kind, self.splits[split].labels, self.labels, self.separator)


def encode_targets(kind: str, values: list, labels: list[str], separator: str) -> list:
    """What the loss compares the model's output with, per example: a class index (classification),
    a multi-hot list (multilabel), or the target values as floats (regression)."""
    if kind == "regression":
        return [[float(v) for v in (value if isinstance(value, tuple) else (value,))] for value in values]
    if kind not in ("classification", "multilabel"):
        return list(values)  # mask files, boxes, texts: the datasets read or tokenise them
    index = {label: i for i, label in enumerate(labels)}
    if kind == "multilabel":
        encoded = []
        for value in values:
            hot = [0.0] * len(labels)
            for label in label_list(value, separator):
                hot[index[label]] = 1.0
            encoded.append(hot)
        return encoded
    return [index[label_key(value)] for value in values]


def label_list(value, separator: str) -> list[str]:
    """A multilabel cell as its labels: a JSON list as it is, text split at the separator; empty: none."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [label_key(v) for v in value]
    if _missing(value):
        return []
    return [part.strip() for part in str(value).split(separator) if part.strip()]


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
    return listing(rows, limit=200, count=SHOWN)


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
    absent = [row for row, path in zip(split.rows, split.image_paths) if path is None]
    if absent:  # a table of image paths with empty cells
        return [f"{split.name}: {len(absent)} empty image path(s) at {_listing(absent)}; fill or remove those rows"]
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


def check_split(split: Split, data_spec, notes: list[str], require_labels: bool = True,
                kind: str = "classification") -> list[str]:
    """Problems with one split's examples: empty texts, unreadable images, missing labels, no rows.
    (Regression and multilabel targets are checked by check_targets.)"""
    problems = []
    if split.image_paths is None:
        problems += _check_texts(split, data_spec.text_column, split.texts)
        if split.text_pairs is not None:
            problems += _check_texts(split, data_spec.text_pair_column, split.text_pairs)
    else:
        problems += _check_images(split, data_spec.skip_unreadable_images, notes)
    if require_labels and kind == "classification":
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


def check_targets(split: Split, kind: str, labels: list[str] | None, separator: str, column) -> list[str]:
    """Regression: every target a finite number. Multilabel: every label known (when `labels` is given).
    Classification: a list where one label belongs means the task is multilabel."""
    if kind == "regression":
        def number(value) -> bool:
            try:
                return math.isfinite(float(value))
            except (TypeError, ValueError):
                return False
        bad = [row for row, value in zip(split.rows, split.labels)
               if not all(number(v) for v in (value if isinstance(value, tuple) else (value,)))]
        return [f"{split.name}: {len(bad)} target value(s) in column(s) {column} are missing or not numbers at "
                f"{_listing(bad)}; fix or remove those rows"] if bad else []
    if kind in ("segmentation", "detection"):
        return []  # masks and boxes are checked by segmentation_data and detection_data
    if kind == "multilabel":
        if labels is None:
            return []
        unseen = [(row, label) for row, value in zip(split.rows, split.labels)
                  for label in label_list(value, separator) if label not in labels]
        if not unseen:
            return []
        return [f"{split.name}: label(s) {sorted({label for _, label in unseen})} are not known (known: {labels}) at "
                f"{_listing(list(dict.fromkeys(row for row, _ in unseen)))}; fix them or list them in task.labels"]
    if any(isinstance(value, (list, tuple, np.ndarray)) for value in split.labels):
        return [f"{split.name}: column '{column}' holds lists of labels; for several labels per example set "
                "task.type: multilabel"]
    return []


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
    if task_spec.type in ("seq2seq", "qa", "captioning", "causal_lm"):  # no classes: their own readers and checks
        from tuneforge.data.text_tasks import load_text_task_data

        return load_text_task_data(data_spec, task_spec)
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
    kind = task_spec.type
    for split in splits.values():
        problems += check_split(split, data_spec, notes, kind=kind)
        problems += check_targets(split, kind, None, data_spec.label_separator, data_spec.label_column)
    if kind == "regression":
        if problems:
            raise DataError(problems)
        columns = data_spec.label_column if isinstance(data_spec.label_column, list) else [data_spec.label_column]
        return TaskData(splits, columns, columns, modality, notes, kind)
    if kind == "multilabel":
        return _multilabel_data(splits, task_spec, data_spec, modality, notes, problems)
    if kind == "segmentation":
        return segmentation_data(splits, task_spec, data_spec, notes, problems)
    if kind == "detection":
        return detection_data(splits, task_spec, data_spec, notes, problems)

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


def _multilabel_data(splits: dict, task_spec, data_spec, modality: str, notes: list[str], problems: list[str]) -> TaskData:
    separator = data_spec.label_separator
    seen = sorted({label for value in splits["train"].labels for label in label_list(value, separator)}, key=_natural)
    labels = list(task_spec.labels) if task_spec.labels else seen
    for split in splits.values():
        problems += check_targets(split, "multilabel", labels, separator, data_spec.label_column)
    if len(labels) < 1:
        problems.append(f"train: no labels found in column '{data_spec.label_column}'; multilabel needs at least one")
    if problems:
        raise DataError(problems)
    names = list(task_spec.label_names) if task_spec.label_names else labels
    return TaskData(splits, labels, names, modality, notes, "multilabel", separator)


def _mask_facts(image: Path, mask: Path | None) -> tuple[str | None, set[int]]:
    """(what is wrong with this pair or None, the class values in the mask)."""
    if mask is None:
        return "no mask (expected masks/<image name>.png)", set()
    try:
        with Image.open(mask) as opened:
            values = np.asarray(opened)
        with Image.open(image) as picture:
            size = picture.size
    except Exception as error:  # PIL raises many types for a bad file
        return f"unreadable mask {mask} ({type(error).__name__}: {error})", set()
    if values.ndim != 2:
        return f"mask {mask} has {values.shape[-1]} channels; a mask holds one class index per pixel (mode L or P)", set()
    if (values.shape[1], values.shape[0]) != size:
        return f"mask {mask} is {values.shape[1]}x{values.shape[0]} but its image is {size[0]}x{size[1]}", set()
    return None, set(np.unique(values).tolist())


def segmentation_data(splits: dict, task_spec, data_spec, notes: list[str], problems: list[str]) -> TaskData:
    """Every mask read once: present, readable, one channel, the image's size, and only known classes
    (0 ... K-1, or the ignore index). With data.drop_bad_annotations, offending pairs are left out and counted."""
    ignore = task_spec.ignore_index
    facts = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, split in splits.items():
            facts[name] = list(pool.map(_mask_facts, split.image_paths, split.labels))
    first = next(iter(facts))  # train when training; the one split being evaluated otherwise
    found = set().union(*(values for _, values in facts[first])) - {ignore}
    labels = list(task_spec.labels) if task_spec.labels else [str(v) for v in range(max(found, default=0) + 1)]
    for name, split in splits.items():
        bad = []
        for index, (problem, values) in enumerate(facts[name]):
            unknown = sorted(v for v in values if v != ignore and not 0 <= v < len(labels))
            if problem is None and unknown:
                problem = (f"class value(s) {unknown[:5]} outside the label map (0 to {len(labels) - 1}, ignore index "
                           f"{ignore})")
            if problem:
                bad.append((index, problem))
        _drop_or_report(split, bad, "image(s) with bad masks", data_spec.drop_bad_annotations, notes, problems)
    if problems:
        raise DataError(problems)
    names = list(task_spec.label_names) if task_spec.label_names else labels
    return TaskData(splits, labels, names, "image", notes, "segmentation")


def _drop_or_report(split: Split, bad: list[tuple[int, str]], what: str, drop: bool, notes: list[str],
                    problems: list[str]) -> None:
    """`bad`: (example position, problem) pairs. Drop those examples and note how many, or report them
    with where they come from and the image's name."""
    if not bad:
        return
    offending = sorted({index for index, _ in bad})
    if drop:
        names = [split.image_paths[i].name for i in offending]
        kept = split.select([i for i in range(len(split)) if i not in set(offending)])
        split.labels, split.rows, split.image_paths, split.sizes = kept.labels, kept.rows, kept.image_paths, kept.sizes
        notes.append(f"{split.name}: dropped {len(offending)} {what}: {_listing(names)}")
        if not len(split):
            problems.append(f"{split.name}: no image is left after dropping the {what}")
        return
    details = "; ".join(f"{split.rows[i]}{'' if split.rows[i].endswith(split.image_paths[i].name) else f' ({split.image_paths[i].name})'}"
                        f": {problem}" for i, problem in bad[:SHOWN])
    more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    problems.append(f"{split.name}: {len(offending)} {what}: {details}{more}; fix them or set "
                    "data.drop_bad_annotations: true")


def detection_data(splits: dict, task_spec, data_spec, notes: list[str], problems: list[str]) -> TaskData:
    """Boxes inside their image, of positive area, of known classes (train's, or task.labels). With
    data.drop_bad_annotations, images with a bad box are left out and counted."""
    from tuneforge.data.detection import box_problems

    first = next(iter(splits))  # train when training; the one split being evaluated otherwise
    seen = sorted({box[0] for boxes in splits[first].labels for box in boxes}, key=_natural)
    labels = list(task_spec.labels) if task_spec.labels else seen
    for split in splits.values():
        _drop_or_report(split, box_problems(split, labels), "image(s) with bad boxes", data_spec.drop_bad_annotations,
                        notes, problems)
    if not labels and not problems:
        problems.append(f"{first}: no boxes at all; detection needs annotated objects to learn from")
    if problems:
        raise DataError(problems)
    names = list(task_spec.label_names) if task_spec.label_names else labels
    return TaskData(splits, labels, names, "image", notes, "detection")


def _natural(label: str):
    # Numeric labels sort as numbers (2 before 10); others alphabetically.
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)
