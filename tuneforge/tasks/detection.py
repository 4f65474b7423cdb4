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

import numpy as np
import torch

from tuneforge.tasks.base import TaskBase


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


class DetectionTask(TaskBase):
    name = "detection"
    summary_keys = ("map_50", "map", "mean_iou", "loss")

    def __init__(self, label_names: list[str], score_threshold: float = 0.5):
        self.label_names, self.score_threshold = label_names, score_threshold

    @property
    def info(self) -> dict:
        return {"score_threshold": self.score_threshold}

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

    def predict(self, outputs, items) -> list[dict]:
        sizes = torch.tensor([[image.height, image.width] for image in items])
        return [self.format(found) for found in self.detections(outputs, sizes)]

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
