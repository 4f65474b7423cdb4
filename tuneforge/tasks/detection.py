"""Object detection with Hugging Face set-prediction detectors (DETR, Conditional DETR, YOLOS):
the model computes its own matching loss from `labels`; boxes come out as (cx, cy, w, h) in
[0, 1] with class logits (over the classes plus "no object" for DETR and YOLOS).

Metrics are COCO's, from pycocotools (the reference implementation of COCO mAP; torchmetrics'
MeanAveragePrecision needs torchvision, which this project keeps out of the core): mAP@[.5:.95],
mAP@0.5 and AP per class, plus the mean IoU of predicted boxes matched to ground truth (greedy by
score, same class, IoU >= 0.5). Predictions keep every box the model gives for the metrics; what
`predict` reports is filtered by `task.score_threshold`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import ImageDraw
from pydantic import Field

from tuneforge.config import Recipe, TaskSpec
from tuneforge.data.common import Split, TaskData, drop_or_report, natural
from tuneforge.data.datasets import load_rgb
from tuneforge.data.detection import BoxAugmenter, DetectionDataset, box_problems, read_detection_split
from tuneforge.data.tables import read_image_split
from tuneforge.tasks.cards import number, table
from tuneforge.tasks.images import ImageTask
from tuneforge.tasks.registry import register_task

BOX_AUGMENTS = ("horizontal_flip", "width_shift", "height_shift", "zoom")  # the ones that move boxes with the pixels


def boxes_to_pixels(cxcywh: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(cx, cy, w, h) in [0, 1] to (xmin, ymin, xmax, ymax) in pixels."""
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (xmin, ymin, xmax, ymax) boxes: (len(a), len(b))."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = lambda boxes: (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-9)


class DetectionSpec(TaskSpec):
    score_threshold: float = Field(0.5, ge=0.0, lt=1.0, description="boxes `predict` reports score above this "
                                                                    "(metrics use every box)")


@register_task
class DetectionTask(ImageTask):
    name = "detection"
    Spec = DetectionSpec
    description = "object detector"
    purpose = "Finding and boxing objects of the classes above in"
    metric_names = ("map_50", "map", "mean_iou", "loss")
    summary_keys = ("map_50", "map", "mean_iou", "loss")
    data_formats = ("boxes-csv", "voc", "coco")
    export_formats = ("hf",)
    export_note = "also outputs boxes, which these formats do not carry yet"
    auto_class, model_types, model_examples = ("AutoModelForObjectDetection", "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
                                               "DETR, Conditional DETR, YOLOS")

    def __init__(self, label_names: list[str], score_threshold: float = 0.5, label_values: list[str] | None = None):
        self.label_names, self.score_threshold = label_names, score_threshold
        self.label_values = label_values or label_names  # what the annotations call each class
        self.augment = None  # a BoxAugmenter for the training split (flips, shifts, zooms move the boxes too)

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        augment = recipe.data.augment
        unsupported = [k for k in ("rotation", "shear", "random_erasing", "mixup", "cutmix", "color_jitter")
                       if getattr(augment, k)]
        if unsupported:
            raise ValueError(f"data.augment.{unsupported[0]}: detection moves boxes with {', '.join(BOX_AUGMENTS[:-1])} "
                             f"and {BOX_AUGMENTS[-1]} only")

    # ---------------------------------------------------------------- data

    @classmethod
    def read_split(cls, name: str, where: str, data_spec, notes: list[str], labelled: bool = True) -> Split:
        if not labelled:  # inputs to predict: images (a folder of them, or one)
            return read_image_split(name, Path(where).expanduser(), require_labels=False)
        return read_detection_split(name, where, data_spec)

    @classmethod
    def label_set(cls, splits: dict[str, Split], data_spec, spec, notes: list[str],
                  problems: list[str]) -> tuple[list[str], list[str]]:
        """Boxes inside their image, of positive area, of known classes (train's, or task.labels). With
        data.drop_bad_annotations, images with a bad box are left out and counted."""
        first = next(iter(splits))  # train when training; the one split being evaluated otherwise
        seen = sorted({box[0] for boxes in splits[first].labels for box in boxes}, key=natural)
        labels = list(spec.labels) if spec.labels else seen
        for split in splits.values():
            drop_or_report(split, box_problems(split, labels), "image(s) with bad boxes", data_spec.drop_bad_annotations,
                           notes, problems)
        if not labels and not problems:
            problems.append(f"{first}: no boxes at all; detection needs annotated objects to learn from")
        return labels, list(spec.label_names) if spec.label_names else labels

    @classmethod
    def check_known(cls, split: Split, info) -> list[str]:
        problems: list[str] = []
        drop_or_report(split, box_problems(split, info.label_values), "image(s) with bad boxes", False, [], problems)
        return problems

    # ---------------------------------------------------------------- one run, or one saved model

    @classmethod
    def for_run(cls, recipe: Recipe, data: TaskData, preprocessor) -> DetectionTask:
        task = cls(data.label_names, recipe.task.score_threshold, data.labels)
        if recipe.data.augment.is_active:
            task.augment = BoxAugmenter(recipe.data.augment, preprocessor.image_mean, preprocessor.image_std)
        return task

    @classmethod
    def from_info(cls, info, preprocessor) -> DetectionTask:
        return cls(info.label_names, cls.settings_of(info).score_threshold, info.label_values)

    def dataset(self, split: Split, targets: list, preprocessor, train: bool = False):
        index = {label: i for i, label in enumerate(self.label_values)}
        return DetectionDataset(split, targets, preprocessor, index, self.augment if train else None)

    def compute_loss(self, model, inputs: dict, targets: list[dict]) -> torch.Tensor:
        return model(**inputs, labels=targets).loss

    def detections(self, outputs, sizes: torch.Tensor) -> list[dict]:
        """Per image: every query's best real class, its probability and its box in the image's pixels.

        DETR and YOLOS score the classes plus "no object" with a softmax (one more logit than classes);
        Conditional and Deformable DETR score each class on its own with a sigmoid (focal loss)."""
        logits = outputs.logits.float()
        if logits.shape[-1] == len(self.label_names) + 1:
            probabilities = logits.softmax(-1)[..., :-1]  # the last class is "no object"
        else:
            probabilities = logits.sigmoid()
        scores, classes = probabilities.max(-1)
        found = []
        for score, label, box, (height, width) in zip(scores, classes, outputs.pred_boxes.float(), sizes.tolist()):
            found.append({"scores": score.cpu(), "labels": label.cpu(), "boxes": boxes_to_pixels(box, height, width).cpu()})
        return found

    def predict(self, loaded, items: list) -> list[dict]:
        pixels = torch.cat([loaded.preprocessor(image, return_tensors="pt")["pixel_values"] for image in items])
        sizes = torch.tensor([[image.height, image.width] for image in items])
        with torch.inference_mode():
            return [self.format(found) for found in self.detections(loaded.model(pixel_values=pixels), sizes)]

    def predict_images(self, model, loader, accelerator, split: Split, output: Path, draw: Path | None) -> list[dict]:
        """Boxes above the score threshold per image, in its own pixels; with `draw`, the images with them drawn."""
        model.eval()
        predictions = {}
        if draw is not None:
            draw.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode():
            for batch in loader:
                for index, found in zip(batch["index"].tolist(), self.detections(model(**batch["inputs"]), batch["sizes"])):
                    predictions[index] = self.format(found)
                    if draw is not None:
                        _draw_boxes(split.image_paths[index], predictions[index]["boxes"], draw)
        return [predictions[i] for i in range(len(split))]

    def format(self, found: dict) -> dict:
        keep = found["scores"] > self.score_threshold
        order = found["scores"][keep].argsort(descending=True)
        return {"boxes": [{"label": self.label_names[int(label)], "score": round(float(score), 6),
                           "box": [round(float(v), 2) for v in box]}
                          for score, label, box in zip(found["scores"][keep][order], found["labels"][keep][order],
                                                       found["boxes"][keep][order])]}

    def evaluate(self, model, loader, accelerator) -> dict:
        model.eval()
        predictions, truths, loss, examples = [], [], 0.0, 0
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for batch in loader:
                with accelerator.autocast():
                    outputs = model(**batch["inputs"], labels=batch["labels"])
                loss += float(outputs.loss) * len(batch["labels"])
                examples += len(batch["labels"])
                predictions += self.detections(outputs, batch["sizes"])
                for target, (height, width) in zip(batch["labels"], batch["sizes"].tolist()):
                    truths.append({"labels": target["class_labels"].cpu(),
                                   "boxes": boxes_to_pixels(target["boxes"].float().cpu(), height, width)})
        return {**self.scores(predictions, truths), "loss": loss / max(examples, 1)}

    def metrics(self, predictions: list[dict], truths: list[dict]) -> dict:
        return self.scores(predictions, truths)

    def scores(self, predictions: list[dict], truths: list[dict]) -> dict:
        """COCO mAP (pycocotools) and the mean IoU of matched boxes, over images given as dicts of
        `boxes` (xmin, ymin, xmax, ymax pixels), `labels` and, for predictions, `scores`."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        categories = [{"id": i, "name": name} for i, name in enumerate(self.label_names)]
        images, annotations, results = [], [], []
        for image_id, (found, truth) in enumerate(zip(predictions, truths)):
            images.append({"id": image_id})
            for box, label in zip(truth["boxes"].tolist(), truth["labels"].tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                    "bbox": _xywh(box), "area": _area(box), "iscrowd": 0})
            for box, label, score in zip(found["boxes"].tolist(), found["labels"].tolist(), found["scores"].tolist()):
                results.append({"image_id": image_id, "category_id": label, "bbox": _xywh(box), "score": score})
        result = {"num_examples": len(truths), "num_boxes": len(annotations), "map": None, "map_50": None,
                  "mean_iou": _matched_iou(predictions, truths), "per_class": {}}
        if not annotations or not results:
            return result
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
            ground = COCO()
            ground.dataset = {"images": images, "annotations": annotations, "categories": categories}
            ground.createIndex()
            evaluation = COCOeval(ground, ground.loadRes(results), iouType="bbox")
            evaluation.params.maxDets = [1, 10, max(100, max(len(p["scores"]) for p in predictions))]
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        valid = lambda value: None if value < 0 else float(value)  # -1: no ground truth to measure against
        result["map"], result["map_50"] = valid(evaluation.stats[0]), valid(evaluation.stats[1])
        precision = evaluation.eval["precision"]  # [IoU thresholds, recall points, classes, areas, max dets]
        for index, name in enumerate(self.label_names):
            curve = precision[:, :, index, 0, -1]
            at_50 = precision[0, :, index, 0, -1]
            result["per_class"][name] = {"ap": float(curve[curve > -1].mean()) if (curve > -1).any() else None,
                                         "ap_50": float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else None,
                                         "boxes": sum(1 for a in annotations if a["category_id"] == index)}
        return result

    def csv_header(self) -> list[str]:
        return ["boxes"]

    def csv_row(self, prediction: dict) -> list:
        return [";".join(f"{b['label']} {b['score']} {' '.join(map(str, b['box']))}" for b in prediction["boxes"])]

    # ---------------------------------------------------------------- the run's records and card

    def train_summary(self, data: TaskData) -> dict:
        counts = {name: 0 for name in data.labels}
        for boxes in data.splits["train"].labels:
            for box in boxes:
                counts[box[0]] += 1
        return {"train_class_counts": dict(zip(data.label_names, counts.values())),
                "train_images": len(data.splits["train"])}

    @classmethod
    def card_head(cls, info) -> str:
        return f"a new class head for {len(info.label_names)} classes (plus no-object) beside the box head"

    @classmethod
    def card_split_details(cls, split: str, metrics: dict) -> list[str]:
        if not metrics.get("per_class"):
            return []
        return ["", f"Per class on {split}:", "", *table(["class", "AP@[.5:.95]", "AP@.5", "boxes"], [
            [label, number(c["ap"]), number(c["ap_50"]), c["boxes"]] for label, c in metrics["per_class"].items()])]

    @classmethod
    def card_limitations(cls, info, data_record: dict) -> list[str]:
        counts = data_record.get("train_class_counts")
        return [f"- The rarest class had {min(counts.values())} training boxes." if counts else
                "- Boxes per class in training: unknown.",
                "- mAP is COCO's (pycocotools); boxes below the score threshold are left out of predictions only."]


def _draw_boxes(path, boxes: list[dict], folder: Path) -> None:
    image = load_rgb(path)
    pen = ImageDraw.Draw(image)
    for box in boxes:
        pen.rectangle(box["box"], outline=(255, 40, 40), width=max(2, image.width // 200))
        pen.text((box["box"][0] + 3, box["box"][1] + 2), f"{box['label']} {box['score']:.2f}", fill=(255, 40, 40))
    image.save(folder / f"{Path(path).stem}.png")


def _xywh(box: list[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _area(box: list[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _matched_iou(predictions: list[dict], truths: list[dict]) -> float | None:
    """Mean IoU over ground-truth boxes matched by a prediction of their class (highest score first,
    each box used once, IoU >= 0.5); None when nothing matches."""
    matched = []
    for found, truth in zip(predictions, truths):
        if not len(found["boxes"]) or not len(truth["boxes"]):
            continue
        ious = box_iou(found["boxes"], truth["boxes"])
        ious[found["labels"][:, None] != truth["labels"][None, :]] = 0.0
        taken = set()
        for p in np.argsort(-found["scores"].numpy(), kind="stable"):
            candidates = [(float(ious[p, t]), t) for t in range(len(truth["boxes"])) if t not in taken]
            best = max(candidates, default=(0.0, None))
            if best[0] >= 0.5:
                taken.add(best[1])
                matched.append(best[0])
    return sum(matched) / len(matched) if matched else None
