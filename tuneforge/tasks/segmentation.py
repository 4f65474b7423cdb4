"""Semantic segmentation: a class per pixel, from image + mask pairs (Hugging Face segmentation
models such as SegFormer, whose decode head is replaced for the new class set).

The model's logits come at a lower resolution than the mask (SegFormer: a quarter); they are
upsampled (bilinear) to the mask's size for the loss and the metrics. Pixels whose mask value is
the ignore index count nowhere. Metrics come from one confusion matrix accumulated batch by
batch, so a split of any size is evaluated in constant memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from tuneforge.config import DataSpec, Recipe, TaskSpec
from tuneforge.data.common import Split, TaskData, drop_or_report
from tuneforge.data.datasets import SegmentationDataset
from tuneforge.data.tables import read_mask_split
from tuneforge.tasks.cards import number, table
from tuneforge.tasks.images import ImageTask
from tuneforge.tasks.registry import register_task


class SegmentationSpec(TaskSpec):
    ignore_index: int = Field(255, ge=0, le=2**31 - 1, description="mask value of pixels that count nowhere")


@register_task
class SegmentationTask(ImageTask):
    name = "segmentation"
    Spec = SegmentationSpec
    description = "semantic segmentation model"
    purpose = "Assigning one of the classes above to every pixel of"
    metric_names = ("mean_iou", "mean_dice", "pixel_accuracy", "loss")
    summary_keys = ("mean_iou", "mean_dice", "pixel_accuracy", "loss")
    data_formats = ("image-masks",)
    auto_class, model_types, model_examples = ("AutoModelForSemanticSegmentation",
                                               "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", "SegFormer")

    def __init__(self, label_names: list[str], ignore_index: int = 255):
        self.label_names = label_names
        self.ignore_index = ignore_index

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        if recipe.data.augment.is_active:
            raise ValueError("data.augment moves pixels but not the masks; task.type segmentation cannot use it yet")

    # ---------------------------------------------------------------- data

    @classmethod
    def read_split(cls, name: str, where: str, data_spec, notes: list[str], labelled: bool = True) -> Split:
        return read_mask_split(name, Path(where).expanduser(), labelled)

    @classmethod
    def label_set(cls, splits: dict[str, Split], data_spec, spec, notes: list[str],
                  problems: list[str]) -> tuple[list[str], list[str]]:
        """Every mask read once: present, readable, one channel, the image's size, and only known classes (0 ...
        K-1, or the ignore index); with data.drop_bad_annotations, offending pairs are left out and counted."""
        ignore = spec.ignore_index
        with ThreadPoolExecutor(max_workers=4) as pool:
            facts = {name: list(pool.map(_mask_facts, split.image_paths, split.labels)) for name, split in splits.items()}
        first = next(iter(facts))  # train when training; the one split being evaluated otherwise
        found = set().union(*(values for _, values in facts[first])) - {ignore}
        labels = list(spec.labels) if spec.labels else [str(v) for v in range(max(found, default=0) + 1)]
        for name, split in splits.items():
            bad = []
            for index, (problem, values) in enumerate(facts[name]):
                unknown = sorted(v for v in values if v != ignore and not 0 <= v < len(labels))
                if problem is None and unknown:
                    problem = (f"class value(s) {unknown[:5]} outside the label map (0 to {len(labels) - 1}, ignore "
                               f"index {ignore})")
                if problem:
                    bad.append((index, problem))
            drop_or_report(split, bad, "image(s) with bad masks", data_spec.drop_bad_annotations, notes, problems)
        return labels, list(spec.label_names) if spec.label_names else labels

    @classmethod
    def check_known(cls, split: Split, info) -> list[str]:
        """The masks checked against the model's label map, as training checked them."""
        problems: list[str] = []
        spec = cls.settings_of(info).model_copy(update={"labels": info.label_values})
        cls.label_set({"evaluation": split}, DataSpec(**info.data), spec, [], problems)
        return problems

    # ---------------------------------------------------------------- one run, or one saved model

    @classmethod
    def for_run(cls, recipe: Recipe, data: TaskData, preprocessor) -> SegmentationTask:
        return cls(data.label_names, recipe.task.ignore_index)

    @classmethod
    def from_info(cls, info, preprocessor) -> SegmentationTask:
        return cls(info.label_names, cls.settings_of(info).ignore_index)

    def dataset(self, split: Split, targets: list, preprocessor, train: bool = False):
        return SegmentationDataset(split, targets, preprocessor)

    def compute_loss(self, model, inputs: dict, targets):
        return self.loss(model(**inputs).logits, targets)

    def _upsampled(self, logits: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Pixel-wise cross-entropy at the mask's resolution, ignoring the ignore index (float32 under autocast)."""
        return F.cross_entropy(self._upsampled(logits, masks.shape[-2:]), masks.long(), ignore_index=self.ignore_index)

    def confusion(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(true class, predicted class) pixel counts over the batch, ignored pixels left out."""
        k = len(self.label_names)
        predicted = self._upsampled(logits, masks.shape[-2:]).argmax(1)
        valid = masks != self.ignore_index
        return torch.bincount(masks[valid].long() * k + predicted[valid], minlength=k * k).reshape(k, k).cpu()

    def metrics(self, logits: torch.Tensor, masks: torch.Tensor) -> dict:
        return self.scores(self.confusion(logits, masks), float(self.loss(logits, masks)), int(masks.shape[0]))

    def evaluate(self, model, loader, accelerator) -> dict:
        """Batch by batch: the confusion matrix and the loss accumulate; no split-sized tensor is kept."""
        model.eval()
        k = len(self.label_names)
        confusion, loss, examples = torch.zeros(k, k, dtype=torch.long), 0.0, 0
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for batch in loader:
                with accelerator.autocast():
                    logits = model(**batch["inputs"]).logits
                logits, masks = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
                confusion += self.confusion(logits, masks)
                loss += float(self.loss(logits, masks)) * len(masks)
                examples += len(masks)
        return self.scores(confusion, loss / max(examples, 1), examples)

    def scores(self, confusion: torch.Tensor, loss: float, examples: int) -> dict:
        """IoU = TP / (TP + FP + FN) and Dice = 2 TP / (2 TP + FP + FN) per class (None for a class absent from
        both the masks and the predictions), their means over the classes where defined, and pixel accuracy."""
        confusion = confusion.double()
        tp = confusion.diag()
        fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
        per_class = {}
        for index, name in enumerate(self.label_names):
            union = float(tp[index] + fp[index] + fn[index])
            per_class[name] = {"iou": float(tp[index]) / union if union else None,
                               "dice": 2 * float(tp[index]) / (union + float(tp[index])) if union else None,
                               "pixels": int(confusion[index].sum())}
        defined = lambda key: [c[key] for c in per_class.values() if c[key] is not None]
        mean = lambda values: sum(values) / len(values) if values else None
        total = float(confusion.sum())
        return {"num_examples": examples, "loss": loss, "mean_iou": mean(defined("iou")),
                "mean_dice": mean(defined("dice")), "pixel_accuracy": float(tp.sum()) / total if total else None,
                "per_class": per_class}

    def masks(self, logits: torch.Tensor, size=None) -> torch.Tensor:
        """The class of every pixel, at `size` ((height, width)) or the logits' own resolution."""
        return (self._upsampled(logits, size) if size is not None else logits.float()).argmax(1)

    def class_fractions(self, mask: torch.Tensor) -> dict[str, float]:
        counts = torch.bincount(mask.flatten(), minlength=len(self.label_names)).double() / mask.numel()
        return {name: round(float(c), 6) for name, c in zip(self.label_names, counts)}

    def predictions(self, logits: torch.Tensor, size=None) -> list[dict]:
        """Per example the class of every pixel and the share of pixels each class takes."""
        return [{"mask": mask.tolist(), "class_fractions": self.class_fractions(mask)} for mask in self.masks(logits, size)]

    def predict(self, loaded, items: list) -> list[dict]:
        """Each mask at its own image's size."""
        pixels = torch.cat([loaded.preprocessor(image, return_tensors="pt")["pixel_values"] for image in items])
        with torch.inference_mode():
            logits = loaded.model(pixel_values=pixels).logits
        return [self.predictions(logits[i:i + 1], size=(image.height, image.width))[0] for i, image in enumerate(items)]

    def predict_images(self, model, loader, accelerator, split: Split, output: Path, draw: Path | None) -> list[dict]:
        """Batch by batch (no split-sized tensor): each mask upsampled to its image's size and saved as a PNG in
        OUTPUT-masks/<image name>.png (class index per pixel)."""
        folder = output.parent / f"{output.stem}-masks"
        folder.mkdir(parents=True, exist_ok=True)
        model.eval()
        predictions = {}
        with torch.inference_mode():
            for batch in loader:
                logits = model(**batch["inputs"]).logits
                for row_logits, index in zip(logits, batch["index"].tolist()):
                    path = split.image_paths[index]
                    with Image.open(path) as image:
                        size = (image.height, image.width)
                    mask = self.masks(row_logits[None], size=size)[0]
                    target = folder / f"{Path(path).stem}.png"
                    Image.fromarray(mask.numpy().astype(np.uint8 if len(self.label_names) < 256 else np.int32)).save(target)
                    predictions[index] = {"mask_file": str(target), "class_fractions": self.class_fractions(mask)}
        return [predictions[i] for i in range(len(split))]

    def csv_header(self) -> list[str]:
        return [f"fraction_{name}" for name in self.label_names]

    def csv_row(self, prediction: dict) -> list:
        return list(prediction["class_fractions"].values())

    # ---------------------------------------------------------------- the card

    @classmethod
    def card_head(cls, info) -> str:
        return f"a new decode head with one output map per class ({len(info.label_names)} classes)"

    @classmethod
    def card_split_details(cls, split: str, metrics: dict) -> list[str]:
        if not metrics.get("per_class"):
            return []
        return ["", f"Per class on {split}:", "", *table(["class", "IoU", "Dice", "pixels"], [
            [label, number(c["iou"]), number(c["dice"]), c["pixels"]] for label, c in metrics["per_class"].items()])]

    @classmethod
    def card_limitations(cls, info, data_record: dict) -> list[str]:
        return ["- Per-class IoU and Dice are in the tables above; classes with few pixels are usually segmented "
                "less reliably.", "- Masks are predicted at the model's input resolution and upsampled to each image's "
                "size, so thin structures may be lost."]


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

