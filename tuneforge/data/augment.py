"""Batch image augmentation for the training loop (train split only), built on kornia.

Batches arrive normalised (``(x - mean) / std``). The augmenter un-normalises to [0, 1],
applies the geometric and colour ops, clamps, re-normalises, erases rectangles (value 0 in
normalised space, i.e. the mean colour), then mixes images with MixUp or CutMix.

All randomness comes from torch's global RNG (kornia samples on the CPU generator), so the
same ``torch.manual_seed`` gives the same augmented batch, and restoring the RNG state on
resume replays the same augmentations. No private generators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F

from tuneforge.config.data import AugmentSpec


def geometric_transform(degrees=0.0, translate=None, scale=None, shear=None) -> K.RandomAffine:
    """One RandomAffine for every geometric op, always applied (the ranges contain the identity).

    Reflection padding: the area uncovered by a shift/rotation/zoom-out is filled with mirrored
    image content instead of black, which would be an artificial hard edge at the darkest
    normalised value that a model can learn as a cue. Bilinear sampling, pixel-centre grid.
    """
    return K.RandomAffine(degrees, translate=translate, scale=scale, shear=shear, padding_mode="reflection", p=1.0)


class BatchAugmenter(torch.nn.Module):
    """``forward(pixel_values, labels) -> (pixel_values, labels_or_soft_targets)``.

    Labels come back unchanged unless MixUp/CutMix is on; then they are soft targets
    [B, num_classes] (rows sum to 1) that ``F.cross_entropy`` accepts as probabilities.
    ``always_apply=True`` forces every configured random op to probability 1 (tests, previews).
    In ``eval()`` mode the batch passes through untouched.
    """

    def __init__(self, spec: AugmentSpec, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 *, always_apply: bool = False):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if spec.changes_labels and num_classes < 2:
            raise ValueError(f"mixup/cutmix need num_classes >= 2, got {num_classes}")
        self.spec = spec
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1), persistent=False)

        self.geometric = None
        if spec.has_geometry:
            self.geometric = geometric_transform(
                degrees=spec.rotation,
                translate=(spec.width_shift, spec.height_shift) if spec.width_shift or spec.height_shift else None,
                scale=(1.0 - spec.zoom, 1.0 + spec.zoom) if spec.zoom else None,
                shear=spec.shear or None,
            )
        self.flip = K.RandomHorizontalFlip(p=1.0 if always_apply else 0.5) if spec.horizontal_flip else None
        jitter = spec.color_jitter
        self.jitter = None
        if jitter is not None and jitter.is_active:
            self.jitter = K.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue,
                                        p=1.0 if always_apply else jitter.p)
        self.erasing = None
        if spec.random_erasing > 0:  # runs after re-normalising: value 0 there is the mean colour
            self.erasing = K.RandomErasing(p=1.0 if always_apply else spec.random_erasing, value=0.0)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return pixel_values, labels
        if pixel_values.dim() != 4:
            raise ValueError(f"expected pixel_values [B, C, H, W], got shape {tuple(pixel_values.shape)}")
        # work in at least float32 (kornia's resampling/colour ops are unreliable in half precision)
        x = pixel_values.to(torch.promote_types(pixel_values.dtype, torch.float32))
        image_ops = [op for op in (self.geometric, self.flip, self.jitter) if op is not None]
        if image_ops:
            x = self.unnormalize(x)
            for op in image_ops:
                x = op(x)
            x = self.normalize(x.clamp(0.0, 1.0))
        if self.erasing is not None:
            x = self.erasing(x)
        if self.spec.changes_labels:
            x, labels = self._mix(x, labels)
        return x.to(pixel_values.dtype), labels

    def _mix(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MixUp or CutMix (one chosen per batch when both are on), with the batch shuffled as partners."""
        spec = self.spec
        use_cutmix = spec.cutmix > 0 and (spec.mixup == 0 or bool(torch.rand(()) < 0.5))
        alpha = spec.cutmix if use_cutmix else spec.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = torch.randperm(x.shape[0]).to(x.device)
        if use_cutmix:
            x, lam = _paste_box(x, x[partner], lam)
        else:
            x = lam * x + (1.0 - lam) * x[partner]
        onehot = F.one_hot(labels.long(), self.num_classes).to(x.dtype)
        return x, lam * onehot + (1.0 - lam) * onehot[partner]


def _paste_box(x: torch.Tensor, partner: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Paste a box covering about (1 - lam) of the image from ``partner``; return the exact kept fraction."""
    height, width = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    y1, y2 = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    x1, x2 = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    inside = torch.zeros(height, width, dtype=torch.bool, device=x.device)
    inside[y1:y2, x1:x2] = True
    return torch.where(inside, partner, x), 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


def build_augmenter(spec: AugmentSpec, mean: Sequence[float], std: Sequence[float], num_classes: int) -> BatchAugmenter | None:
    """The augmenter for ``spec``, or None when no augmentation is configured."""
    return BatchAugmenter(spec, mean, std, num_classes) if spec.is_active else None
