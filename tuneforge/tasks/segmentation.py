"""Semantic segmentation: a class per pixel, from image + mask pairs (Hugging Face segmentation
models such as SegFormer, whose decode head is replaced for the new class set).

The model's logits come at a lower resolution than the mask (SegFormer: a quarter); they are
upsampled (bilinear) to the mask's size for the loss and the metrics. Pixels whose mask value is
the ignore index count nowhere. Metrics come from one confusion matrix accumulated batch by
batch, so a split of any size is evaluated in constant memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.tasks.base import TaskBase


class SegmentationTask(TaskBase):
    name = "segmentation"
    summary_keys = ("mean_iou", "mean_dice", "pixel_accuracy", "loss")

    def __init__(self, label_names: list[str], ignore_index: int = 255):
        self.label_names = label_names
        self.ignore_index = ignore_index

    @property
    def info(self) -> dict:
        return {"ignore_index": self.ignore_index}

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

    def predict(self, outputs, items: list) -> list[dict]:
        """Each mask at its own image's size."""
        return [self.predictions(outputs.logits[i:i + 1], size=(image.height, image.width))[0]
                for i, image in enumerate(items)]

    def csv_header(self) -> list[str]:
        return [f"fraction_{name}" for name in self.label_names]

    def csv_row(self, prediction: dict) -> list:
        return list(prediction["class_fractions"].values())
