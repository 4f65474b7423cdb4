"""Read examples from files: text tables (CSV/TSV/JSONL/Parquet, label-text lines), class-per-folder image
trees and image + mask folders. Readers never raise on bad content: problems go into the Split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd

from tuneforge.data.common import Split
from tuneforge.errors import listing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


TABLES = ("csv", "tsv", "jsonl", "parquet")


def table_format(path: Path, declared: str) -> str:
    """A table's format: the declared one, or by its name (.csv, .tsv, .parquet; JSON lines otherwise)."""
    if declared in TABLES:
        return declared
    return {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}.get(path.suffix.lower(), "jsonl")


def infer_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "imagefolder"
    return TABLE_FORMATS.get(path.suffix.lower(), "csv")


def read_table(path: Path, fmt: str, columns: list[str] | None, encoding: str = "utf-8") -> pd.DataFrame:
    """Read a table as strings-or-numbers without guessing quotes in TSV (sentences contain '"')."""
    header = None if columns else "infer"
    if fmt == "tsv":
        # Blank lines are kept as (empty) rows so reported line numbers stay the file's own.
        return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, header=header, names=columns,
                           keep_default_na=False, na_values=[""], encoding=encoding, skip_blank_lines=False)
    if fmt == "csv":
        return pd.read_csv(path, header=header, names=columns, keep_default_na=False, na_values=[""],
                           encoding=encoding, skip_blank_lines=False)
    if fmt == "jsonl":
        if path.suffix.lower() == ".json" and path.read_text(encoding=encoding).lstrip().startswith("["):
            return pd.DataFrame(json.loads(path.read_text(encoding=encoding)))
        return pd.read_json(path, lines=True, dtype=False, encoding=encoding)
    if fmt == "parquet":
        return pd.read_parquet(path)
    if fmt == "label-text":  # "LABEL TEXT" per line; names from `columns` ([label, text] by default)
        label, text = columns or ["label", "text"]
        lines = path.read_text(encoding=encoding).splitlines()
        parts = [line.split(maxsplit=1) if line.strip() else [None, None] for line in lines]
        return pd.DataFrame({label: [p[0] for p in parts], text: [p[1] if len(p) > 1 else None for p in parts]})
    raise ValueError(f"not a table format: {fmt}")


def not_text(name: str, path: Path, encoding: str) -> str:
    """The problem of a file that does not decode as `encoding`, with the byte and line where it breaks."""
    raw = path.read_bytes()  # pandas reports offsets within its own chunk; find the real place
    try:
        raw.decode(encoding)
        where = ""
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        where = f" (byte {error.start}, line {line})"
    return (f"{name}: {path} is not {encoding.upper()} text{where}; re-save it as UTF-8, or name its encoding with "
            "data.encoding (e.g. latin-1, cp1252)")


def _first_line_number(fmt: str, has_header: bool) -> int:
    # Row numbers in messages are the file's own line numbers (1-based), header included.
    return 2 if fmt in ("csv", "tsv") and has_header else 1


def label_columns(spec) -> list[str]:
    return spec.label_column if isinstance(spec.label_column, list) else [spec.label_column]


def read_text_split(name: str, path: Path, spec, require_labels: bool = True) -> Split:
    fmt = infer_format(path, spec.format)
    empty = Split(name, str(path), [], [])
    if not path.is_file():
        empty.problems.append(f"{name}: file {path} does not exist (data.{name})")
        return empty
    if path.stat().st_size == 0:
        empty.problems.append(f"{name}: file {path} is empty")
        return empty
    try:
        frame = read_table(path, fmt, spec.columns, spec.encoding)
    except UnicodeDecodeError:
        empty.problems.append(not_text(name, path, spec.encoding))
        return empty
    except Exception as error:  # pandas/pyarrow raise many types for malformed files
        where = _bad_json_line(path) if fmt == "jsonl" else None
        empty.problems.append(f"{name}: cannot read {path} as {fmt}: " + (where or str(error).splitlines()[0]))
        return empty

    targets = label_columns(spec)
    has_labels = all(column in frame.columns for column in targets)
    wanted = [spec.image_column or spec.text_column] + (targets if require_labels else []) + \
        ([spec.text_pair_column] if spec.text_pair_column else [])
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        found = listing(map(str, frame.columns))
        hint = " (is the delimiter right? for TSV use a .tsv name or data.format: tsv)" if len(frame.columns) == 1 else ""
        empty.problems.append(f"{name}: {path} has no column {', '.join(map(repr, missing))}; columns are: {found}{hint}")
        return empty

    first = _first_line_number(fmt, spec.columns is None)
    rows = [f"{path}:{first + i}" for i in range(len(frame))]
    pairs = frame[spec.text_pair_column].tolist() if spec.text_pair_column else None
    if not has_labels:
        labels = [None] * len(frame)
    elif isinstance(spec.label_column, list):  # several regression targets: a tuple per example
        labels = list(zip(*(frame[column].tolist() for column in targets)))
    else:
        labels = frame[spec.label_column].tolist()
    if spec.image_column:  # a table of image paths, relative to the table's folder
        images = [None if _absent(value) else path.parent / str(value) for value in frame[spec.image_column]]
        return Split(name, str(path), labels, rows, image_paths=images)
    return Split(name, str(path), labels, rows,
                 texts=frame[spec.text_column].tolist(), text_pairs=pairs)


def _absent(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or not str(value).strip()


def _bad_json_line(path: Path) -> str | None:
    """Where a JSON-lines file first breaks, as 'line N: what', or None if every line parses."""
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number} is not valid JSON ({error.msg}, column {error.colno})"
            except (ValueError, RecursionError) as error:  # a number past Python's digit limit; nesting too deep
                return f"line {number} cannot be read ({type(error).__name__}: {str(error)[:80]})"
    return None


def read_image_split(name: str, root: Path, require_labels: bool = True) -> Split:
    """A class-per-folder tree: root/<label>/<image>. Non-image files are ignored."""
    empty = Split(name, str(root), [], [])
    if root.is_file() and root.suffix.lower() in IMAGE_SUFFIXES:  # a single unlabelled image (predict)
        return Split(name, str(root), [None], [str(root)], image_paths=[root])
    if not root.is_dir():
        empty.problems.append(f"{name}: folder {root} does not exist (data.{name})")
        return empty
    labels, paths = [], []
    # Images directly in the root are unlabelled (inputs to predict); sub-folders are classes.
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            labels.append(None)
            paths.append(path)
    for class_dir in sorted(entry for entry in root.iterdir() if entry.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                labels.append(class_dir.name)
                paths.append(path)
    if not paths:
        empty.problems.append(f"{name}: {root} holds no images; expected {root}/<label>/<image files>")
        return empty
    if require_labels and all(label is None for label in labels) and not any(e.is_dir() for e in root.iterdir()):
        # Loose images only: fine as inputs to predict, but training and evaluation need class folders.
        empty.problems.append(f"{name}: {root} has {len(paths)} images but no class folders; "
                              f"expected {root}/<label>/<image files>")
        return Split(name, str(root), labels, [str(p) for p in paths], image_paths=paths, problems=empty.problems)
    return Split(name, str(root), labels, [str(path) for path in paths], image_paths=paths)


def read_mask_split(name: str, root: Path, require_labels: bool = True) -> Split:
    """root/images/<name>.<ext> with root/masks/<name>.png (class index per pixel). An image without a
    mask gets None (reported by the segmentation task's check); without masks/ at all, the images are inputs to predict."""
    empty = Split(name, str(root), [], [])
    images_dir = root / "images" if (root / "images").is_dir() else root
    if not root.is_dir():
        empty.problems.append(f"{name}: folder {root} does not exist (data.{name})")
        return empty
    paths = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        empty.problems.append(f"{name}: {images_dir} holds no images; expected {root}/images/<files> and "
                              f"{root}/masks/<same names>.png")
        return empty
    masks_dir = root / "masks"
    if require_labels and not masks_dir.is_dir():
        empty.problems.append(f"{name}: {root} has no masks/ folder; expected {root}/masks/<image name>.png, one "
                              "class index per pixel")
        return empty
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file()} if masks_dir.is_dir() else {}
    return Split(name, str(root), [masks.get(p.stem) for p in paths], [str(p) for p in paths], image_paths=paths)


def read_split(name: str, location: str, spec, require_labels: bool = True) -> Split:
    """A table of texts (or of image paths), or a class-per-folder image tree (or one image)."""
    path = Path(location).expanduser()
    if infer_format(path, spec.format) == "imagefolder" or path.suffix.lower() in IMAGE_SUFFIXES:
        return read_image_split(name, path, require_labels)
    return read_text_split(name, path, spec, require_labels)
