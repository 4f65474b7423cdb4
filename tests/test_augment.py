"""Batch augmentation: spec validation, exact geometric checks, MixUp/CutMix targets, reproducibility."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tuneforge.data.augment import (
    AugmentSpec,
    BatchAugmenter,
    build_augmenter,
    geometric_transform,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LOW = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
HIGH = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)

EVERYTHING = {
    "rotation": 15, "width_shift": 0.1, "height_shift": 0.1, "shear": 5, "zoom": 0.2, "horizontal_flip": True,
    "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "random_erasing": 0.5, "mixup": 0.2, "cutmix": 1.0,
}


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def augmenter(num_classes: int = 4, always_apply: bool = False, **spec) -> BatchAugmenter:
    return BatchAugmenter(AugmentSpec(**spec), MEAN, STD, num_classes, always_apply=always_apply)


def random_batch(batch: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return normalise(torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)))


def ramp(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A linear image per channel: bilinear resampling reproduces it exactly at in-bounds points."""
    return torch.stack([0.1 + 0.03 * cols + 0.02 * rows, 0.2 + 0.02 * cols + 0.01 * rows, 0.9 - 0.02 * cols - 0.025 * rows])


# --- spec -------------------------------------------------------------------------------------------

def test_nothing_configured_builds_nothing():
    assert build_augmenter(AugmentSpec(), MEAN, STD, 3) is None
    assert build_augmenter(AugmentSpec(color_jitter={"p": 1.0}), MEAN, STD, 3) is None  # all factors zero
    assert not AugmentSpec().is_active and not AugmentSpec().changes_labels
    assert AugmentSpec(rotation=10).is_active and not AugmentSpec(rotation=10).changes_labels
    assert AugmentSpec(cutmix=1.0).changes_labels and AugmentSpec(mixup=0.2).is_active
    assert isinstance(build_augmenter(AugmentSpec(horizontal_flip=True), MEAN, STD, 3), BatchAugmenter)


@pytest.mark.parametrize("data, location", [
    ({"rotaton": 10}, ("rotaton",)),
    ({"rotation": -1}, ("rotation",)),
    ({"width_shift": -0.1}, ("width_shift",)),
    ({"zoom": -0.2}, ("zoom",)),
    ({"mixup": -1}, ("mixup",)),
    ({"random_erasing": 1.5}, ("random_erasing",)),
    ({"mixup": float("inf")}, ("mixup",)),
    ({"color_jitter": {"brightness": -0.1}}, ("color_jitter", "brightness")),
    ({"color_jitter": {"gamma": 0.1}}, ("color_jitter", "gamma")),
])
def test_spec_rejects_bad_values_naming_the_field(data, location):
    with pytest.raises(ValidationError) as error:
        AugmentSpec.model_validate(data)
    assert [tuple(e["loc"]) for e in error.value.errors()] == [location]
    assert location[-1] in str(error.value)


# --- flip and the normalisation round trip --------------------------------------------------------------

def test_forced_flip_equals_torch_flip():
    # mean = std = 0.5 and dyadic pixel values make the un-normalise/re-normalise round trip exact
    images = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0)) / 256
    x = (images - 0.5) / 0.5
    flip = BatchAugmenter(AugmentSpec(horizontal_flip=True), (0.5,) * 3, (0.5,) * 3, 2, always_apply=True)
    out, labels = flip(x, torch.tensor([0, 1, 1, 0]))
    assert torch.equal(out, torch.flip(x, dims=[-1]))
    assert torch.equal(labels, torch.tensor([0, 1, 1, 0]))

    x = random_batch()
    out, _ = augmenter(horizontal_flip=True, always_apply=True)(x, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out, torch.flip(x, dims=[-1]), rtol=0, atol=1e-6)


def test_flip_is_random_per_image():
    x = random_batch(batch=16)
    torch.manual_seed(0)
    out, _ = augmenter(horizontal_flip=True)(x, torch.zeros(16, dtype=torch.long))
    flipped = [torch.allclose(o, torch.flip(i, dims=[-1]), atol=1e-6) for o, i in zip(out, x)]
    kept = [torch.allclose(o, i, atol=1e-6) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_round_trip_leaves_unaugmented_batch_unchanged():
    x = random_batch()
    aug = augmenter(horizontal_flip=True, always_apply=True)
    torch.testing.assert_close(aug.normalize(aug.unnormalize(x)), x, rtol=0, atol=1e-6)
    symmetric = (x + torch.flip(x, dims=[-1])) / 2  # flipping changes nothing: only the round trip acts
    out, _ = aug(symmetric, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out, symmetric, rtol=0, atol=1e-6)


def test_eval_mode_passes_through():
    x, labels = random_batch(), torch.arange(4)
    aug = augmenter(**EVERYTHING).eval()
    out, targets = aug(x, labels)
    assert out is x and targets is labels


def test_random_erasing_fills_a_rectangle_with_the_mean_colour():
    x = random_batch()
    torch.manual_seed(0)
    aug = augmenter(random_erasing=0.5, horizontal_flip=True, always_apply=True)
    out, _ = aug(x, torch.zeros(4, dtype=torch.long))
    for image, original in zip(out, torch.flip(x, dims=[-1])):
        erased = ((image - original).abs() > 1e-4).any(0)
        assert erased.any()
        assert (image[:, erased] == 0).all()  # 0 in normalised space is the dataset mean colour
        torch.testing.assert_close(image[:, ~erased], original[:, ~erased], rtol=0, atol=1e-6)
        rows, cols = erased.nonzero().unbind(1)
        assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


# --- geometry ------------------------------------------------------------------------------------------------

def test_rotation_by_90_degrees_matches_rot90():
    x = random_batch(size=16)
    aug = augmenter(rotation=90)
    aug.geometric = geometric_transform(degrees=(90.0, 90.0))
    out, _ = aug(x, torch.zeros(4, dtype=torch.long))
    expected = torch.rot90(x, k=-1, dims=(-2, -1))  # kornia: positive angles turn the image clockwise
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=0, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-2)


def test_shift_moves_content_by_the_drawn_fraction():
    size, batch = 16, 8
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    x = normalise(ramp(rows, cols).expand(batch, 3, size, size))
    torch.manual_seed(0)
    aug = augmenter(width_shift=0.25, height_shift=0.125)
    out, _ = aug(x, torch.zeros(batch, dtype=torch.long))
    shifts = aug.geometric._params["translations"]  # pixels (dx, dy); positive moves content right/down
    assert (shifts[:, 0].abs() <= 0.25 * size).all() and (shifts[:, 1].abs() <= 0.125 * size).all()
    assert shifts[:, 0].abs().max() > 1 and shifts[:, 1].abs().max() > 0.5
    images = aug.unnormalize(out)
    assert images.min() > 0.1 - 1e-4  # reflection padding: uncovered areas show image content, not black
    for image, (dx, dy) in zip(images, shifts):
        src_rows, src_cols = rows - dy, cols - dx
        inside = (src_rows >= 0) & (src_rows <= size - 1) & (src_cols >= 0) & (src_cols <= size - 1)
        assert inside.sum() > size * size // 3
        expected = ramp(src_rows, src_cols)
        torch.testing.assert_close(image[:, inside], expected[:, inside], rtol=0, atol=1e-4)


def test_zoom_in_keeps_centre_and_moves_pattern_outward():
    size, centre = 17, 8
    images = torch.full((1, 3, size, size), 0.25)
    images[..., centre, centre] = 0.5
    images[..., centre + 2, centre + 3] = 1.0
    aug = augmenter(zoom=0.5)
    aug.geometric = geometric_transform(scale=(2.0, 2.0))
    out, _ = aug(normalise(images), torch.zeros(1, dtype=torch.long))
    image = aug.unnormalize(out)[0]
    torch.testing.assert_close(image[:, centre, centre], torch.full((3,), 0.5), rtol=0, atol=1e-5)
    torch.testing.assert_close(image[:, centre + 4, centre + 6], torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(image[:, centre + 2, centre + 3], torch.full((3,), 0.25), rtol=0, atol=1e-5)


def test_spec_maps_to_affine_ranges():
    torch.manual_seed(0)
    aug = augmenter(rotation=20, width_shift=0.1, height_shift=0.2, shear=15, zoom=0.3)
    aug(random_batch(batch=16, size=10), torch.zeros(16, dtype=torch.long))
    params = aug.geometric._params
    for name, low, high in (("angle", -20, 20), ("shear_x", -15, 15), ("scale", 0.7, 1.3)):
        values = params[name]
        assert low <= values.min() < low + (high - low) / 3 and high - (high - low) / 3 < values.max() <= high, name
    assert (params["shear_y"] == 0).all()
    assert (params["translations"][:, 0].abs() <= 1.0).all() and (params["translations"][:, 1].abs() <= 2.0).all()
    assert params["translations"][:, 1].abs().max() > 1.0


# --- MixUp / CutMix -----------------------------------------------------------------------------------------

def partners(targets: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """Every label is distinct, so each target row names its own weight and its partner image."""
    found = []
    for i, row in enumerate(targets):
        lam = float(row[labels[i]])
        others = [int(c) for c in torch.nonzero(row > 1e-7).flatten() if c != labels[i]]
        partner = int((labels == others[0]).nonzero()) if others else i
        found.append((lam, partner))
    return found


def test_mixup_images_and_targets_share_lambda():
    x, labels = random_batch(batch=6), torch.tensor([3, 0, 5, 1, 4, 2])
    aug = augmenter(num_classes=6, mixup=0.4)
    mixed = 0
    for seed in range(3):
        torch.manual_seed(seed)
        out, targets = aug(x, labels)
        assert targets.shape == (6, 6) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        weights = set()
        for i, (lam, j) in enumerate(partners(targets, labels)):
            expected = F.one_hot(labels[i], 6) * lam + F.one_hot(labels[j], 6) * (1 - lam)
            torch.testing.assert_close(targets[i], expected.float(), rtol=0, atol=1e-6)
            torch.testing.assert_close(out[i], lam * x[i] + (1 - lam) * x[j], rtol=0, atol=1e-5)
            if j != i:
                weights.add(round(lam, 6))
                mixed += 0.05 < lam < 0.95
        assert len(weights) == 1  # one lambda per batch
    assert mixed >= 4


def test_cutmix_pastes_a_box_weighted_by_its_area():
    x, labels = random_batch(batch=6), torch.tensor([3, 0, 5, 1, 4, 2])
    aug = augmenter(num_classes=6, cutmix=1.0)
    pasted_boxes = 0
    for seed in range(3):
        torch.manual_seed(seed)
        out, targets = aug(x, labels)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        for i, (lam, j) in enumerate(partners(targets, labels)):
            changed = (out[i] != x[i]).any(0)
            assert torch.equal(out[i][:, changed], x[j][:, changed])  # pasted pixels come from the partner
            assert torch.equal(out[i][:, ~changed], x[i][:, ~changed])
            assert math.isclose(1 - lam, changed.float().mean().item(), abs_tol=1e-6)
            if changed.any():
                rows, cols = changed.nonzero().unbind(1)
                box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
                assert box.all()  # one rectangle
                pasted_boxes += 1
    assert pasted_boxes >= 3


def test_both_mixers_are_used_when_both_configured():
    x, labels = random_batch(batch=4), torch.arange(4)
    aug = augmenter(num_classes=4, mixup=1.0, cutmix=1.0)
    torch.manual_seed(0)
    kinds = set()
    for _ in range(12):
        out, _ = aug(x, labels)
        # CutMix keeps every pixel exactly from some batch member; MixUp blends them
        from_members = (out.unsqueeze(1) == x.unsqueeze(0)).all(2).any(1)
        kinds.add("cutmix" if from_members.all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


# --- reproducibility, shapes, ranges, speed ----------------------------------------------------------

def test_same_seed_same_batch_different_seed_different():
    x, labels = random_batch(batch=8), torch.arange(8) % 4
    aug = augmenter(**EVERYTHING)
    results = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        results.append(aug(x, labels))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])


def test_shapes_dtypes_and_value_range():
    x, labels = random_batch(batch=8), torch.arange(8) % 4
    torch.manual_seed(0)
    out, targets = augmenter(**EVERYTHING)(x, labels)
    assert out.shape == x.shape and out.dtype == torch.float32 and targets.shape == (8, 4)
    # soft targets go straight into cross_entropy as class probabilities
    torch.testing.assert_close(F.cross_entropy(torch.zeros(8, 4), targets), torch.tensor(math.log(4)))
    assert not torch.allclose(out, x, atol=1e-3)
    assert (out >= LOW - 1e-5).all() and (out <= HIGH + 1e-5).all()

    spec = {k: v for k, v in EVERYTHING.items() if k not in ("mixup", "cutmix")}
    torch.manual_seed(0)
    out, same = augmenter(**spec)(x.double(), labels)
    assert out.dtype == torch.float64 and same is labels and same.dtype == torch.long
    assert (out >= LOW.double() - 1e-5).all() and (out <= HIGH.double() + 1e-5).all()


def test_fast_on_a_small_batch():
    x, labels = normalise(torch.rand(8, 3, 32, 32)), torch.arange(8) % 4
    aug = augmenter(**EVERYTHING)
    aug(x, labels)  # warm-up
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        aug(x, labels)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.5
