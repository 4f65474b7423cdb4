"""Object detection data: boxes from a CSV table, Pascal VOC XML files or a COCO JSON file, checked
before training, and served as fixed-size images with normalised boxes (and box-aware augmentation).

Every reader gives the same thing: per image its path, its size as the annotation states it, and
its boxes as (class, xmin, ymin, xmax, ymax) in pixels. Images are found under `data.image_root`
(default: the annotation file's folder; for VOC, the folder holding the XML files' `<folder>`).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tuneforge.data.common import Split
from tuneforge.data.datasets import ExampleDataset, load_rgb

CSV_COLUMNS = ("filename", "class", "xmin", "ymin", "xmax", "ymax")  # width and height are read when present


def read_detection_split(name: str, location: str, spec) -> Split:
    path = Path(location).expanduser()
    empty = Split(name, str(path), [], [])
    if not path.exists():
        empty.problems.append(f"{name}: {path} does not exist (data.{name})")
        return empty
    try:
        if spec.format == "voc":
            images = _read_voc(path, spec.image_root)
        elif spec.format == "coco":
            images = _read_coco(path, spec.image_root)
        else:
            images = _read_csv(path, spec.image_root)
    except ValueError as error:
        empty.problems.append(f"{name}: {error}")
        return empty
    if not images:
        empty.problems.append(f"{name}: {path} lists no images")
        return empty
    rows = [where for where, _, _, _ in images]
    return Split(name, str(path), [boxes for _, _, _, boxes in images], rows,
                 image_paths=[image for _, image, _, _ in images], sizes=[size for _, _, size, _ in images])


def _read_csv(path: Path, image_root: str | None) -> list[tuple]:
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = [column for column in CSV_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(missing)}; a box table has the columns "
                         f"{', '.join(CSV_COLUMNS)} (and optionally width, height), one row a box")
    root = Path(image_root).expanduser() if image_root else path.parent
    for column in ("xmin", "ymin", "xmax", "ymax"):  # a value that is not a number becomes a missing coordinate
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    images: dict[str, tuple] = {}
    for line, record in enumerate(frame.to_dict("records"), start=2):
        key = str(record["filename"])
        size = (int(record["width"]), int(record["height"])) if "width" in record and "height" in record else None
        entry = images.setdefault(key, (f"{path}:{line}", root / key, size, []))
        entry[3].append((str(record["class"]), *(float(record[k]) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return list(images.values())


def _read_voc(folder: Path, image_root: str | None) -> list[tuple]:
    files = sorted(folder.glob("*.xml")) if folder.is_dir() else [folder]
    images = []
    for file in files:
        try:
            tree = ElementTree.parse(file).getroot()
        except ElementTree.ParseError as error:
            raise ValueError(f"{file} is not valid XML ({error})") from None
        filename = tree.findtext("filename")
        if not filename:
            raise ValueError(f"{file} has no <filename>")
        root = Path(image_root).expanduser() if image_root else file.parent.parent / (tree.findtext("folder") or "")
        width, height = tree.findtext("size/width"), tree.findtext("size/height")
        boxes = []
        for item in tree.iter("object"):
            box = item.find("bndbox")
            if box is None:
                raise ValueError(f"{file}: an <object> without <bndbox>")
            boxes.append((item.findtext("name", ""), *(float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))))
        size = (int(float(width)), int(float(height))) if width and height else None
        images.append((str(file), root / filename, size, boxes))
    return images


def _read_coco(path: Path, image_root: str | None) -> list[tuple]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    for key in ("images", "annotations", "categories"):
        if key not in content:
            raise ValueError(f"{path} has no '{key}' list; a COCO file has images, annotations and categories")
    names = {c["id"]: str(c["name"]) for c in content["categories"]}
    root = Path(image_root).expanduser() if image_root else path.parent
    images = {image["id"]: (f"{path} image id {image['id']}", root / image["file_name"],
                            (image.get("width"), image.get("height")) if image.get("width") else None, [])
              for image in content["images"]}
    for annotation in content["annotations"]:
        image = images.get(annotation["image_id"])
        if image is None:
            raise ValueError(f"{path}: annotation {annotation.get('id')} points to image id {annotation['image_id']}, "
                             "which is not in 'images'")
        x, y, w, h = annotation["bbox"]  # COCO boxes are x, y, width, height
        image[3].append((names.get(annotation["category_id"], f"category {annotation['category_id']}"), x, y, x + w, y + h))
    return list(images.values())


def box_problems(split: Split, labels: list[str] | None) -> list[tuple[int, str]]:
    """(image position, what is wrong) for boxes outside the image, of no area or of an unknown class."""
    found = []
    for index, (boxes, size) in enumerate(zip(split.labels, split.sizes)):
        for name, x1, y1, x2, y2 in boxes:
            if not all(np.isfinite([x1, y1, x2, y2])):
                found.append((index, f"a box of {name!r} has a missing coordinate"))
            elif x2 <= x1 or y2 <= y1:
                found.append((index, f"box {[x1, y1, x2, y2]} of {name!r} has no area (xmax <= xmin or ymax <= ymin)"))
            elif size is not None and (x1 < 0 or y1 < 0 or x2 > size[0] or y2 > size[1]):
                found.append((index, f"box {[x1, y1, x2, y2]} of {name!r} lies outside the {size[0]}x{size[1]} image"))
            elif labels is not None and name not in labels:
                found.append((index, f"class {name!r} is not in the label set {labels}"))
    return found


class DetectionDataset(ExampleDataset):
    """Images resized to the processor's square size; boxes normalised to (cx, cy, w, h) in [0, 1], the
    form Hugging Face detection models take as `labels`. With `augment`, flips, shifts and zooms move
    the boxes with the pixels (kornia), and boxes pushed out of the image are clipped or dropped."""

    decodes_images = True

    def __init__(self, split: Split, boxes: list, image_processor, label_index: dict[str, int], augment=None):
        self.paths, self.boxes, self.processor = split.image_paths, boxes, image_processor
        self.label_index, self.augment = label_index, augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = load_rgb(self.paths[index])
        pixels = self.processor(image, return_tensors="pt")["pixel_values"][0]
        width, height = image.size
        boxes = self.boxes[index] or []
        xyxy = torch.tensor([[x1 / width, y1 / height, x2 / width, y2 / height] for _, x1, y1, x2, y2 in boxes],
                            dtype=torch.float32).reshape(-1, 4)
        classes = torch.tensor([self.label_index[name] for name, *_ in boxes], dtype=torch.long)
        if self.augment is not None and len(xyxy):
            pixels, xyxy, classes = self.augment(pixels, xyxy, classes)
        cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                              xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=1)
        return {"pixel_values": pixels, "label": {"class_labels": classes, "boxes": cxcywh}, "index": index,
                "size": torch.tensor([height, width])}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        return {"inputs": {"pixel_values": torch.stack([item["pixel_values"] for item in items])},
                "labels": [item["label"] for item in items],
                "index": torch.tensor([item["index"] for item in items]),
                "sizes": torch.stack([item["size"] for item in items])}


class BoxAugmenter:
    """Random horizontal flip, shift and zoom applied to an image and its boxes together (kornia)."""

    def __init__(self, spec, mean, std):
        import kornia.augmentation as K

        ops = []
        if spec.horizontal_flip:
            ops.append(K.RandomHorizontalFlip(p=0.5))
        if spec.width_shift or spec.height_shift or spec.zoom:
            ops.append(K.RandomAffine(degrees=0.0, translate=(spec.width_shift, spec.height_shift),
                                      scale=(1 - spec.zoom, 1 + spec.zoom) if spec.zoom else None, p=1.0))
        self.pipeline = K.AugmentationSequential(*ops, data_keys=["input", "bbox_xyxy"])
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, pixels: torch.Tensor, xyxy: torch.Tensor, classes: torch.Tensor):
        size = pixels.shape[-1], pixels.shape[-2]
        scale = torch.tensor([size[0], size[1], size[0], size[1]], dtype=torch.float32)
        image = pixels * self.std + self.mean  # kornia fills moved-in borders with 0: black, as an image would be
        moved, boxes = self.pipeline(image[None], (xyxy * scale)[None])
        boxes = boxes[0] / scale
        boxes = boxes.clamp(0.0, 1.0)
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-3) & ((boxes[:, 3] - boxes[:, 1]) > 1e-3)  # pushed out: dropped
        return (moved[0] - self.mean) / self.std, boxes[keep], classes[keep]
