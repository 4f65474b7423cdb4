"""Recipe section `data`: where the examples are, how they are read, sampled and augmented."""

from __future__ import annotations

import codecs
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from tuneforge.config.base import Section
from tuneforge.config.model import ImageSpec
from tuneforge.limits import MAX_SEED


class _Spec(Section):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ColorJitterSpec(_Spec):
    """torchvision ColorJitter semantics: each factor f draws from [max(0, 1 - f), 1 + f], hue from [-h, h]."""

    brightness: float = Field(0.0, ge=0.0, description="brightness factor drawn from [1-b, 1+b]")
    contrast: float = Field(0.0, ge=0.0, description="contrast factor drawn from [1-c, 1+c]")
    saturation: float = Field(0.0, ge=0.0, description="saturation factor drawn from [1-s, 1+s]")
    hue: float = Field(0.0, ge=0.0, le=0.5, description="hue shift drawn from [-h, h] (fraction of the colour wheel)")
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability that an image is jittered")

    @property
    def is_active(self) -> bool:
        return self.p > 0 and any((self.brightness, self.contrast, self.saturation, self.hue))


class AugmentSpec(_Spec):
    """Train-time batch augmentation; everything is off by default."""

    rotation: float = Field(0.0, ge=0.0, le=180.0, description="rotate by an angle uniform in [-r, r] degrees")
    width_shift: float = Field(0.0, ge=0.0, le=1.0, description="shift horizontally by up to this fraction of the width")
    height_shift: float = Field(0.0, ge=0.0, le=1.0, description="shift vertically by up to this fraction of the height")
    shear: float = Field(0.0, ge=0.0, lt=90.0, description="shear along x by an angle uniform in [-s, s] degrees")
    zoom: float = Field(0.0, ge=0.0, lt=1.0, description="scale uniform in [1-z, 1+z] (above 1 enlarges the content)")
    horizontal_flip: bool = Field(False, description="mirror left-right with probability 0.5")
    color_jitter: ColorJitterSpec | None = Field(None, description="random brightness/contrast/saturation/hue")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability of erasing a random rectangle to the mean colour")
    mixup: float = Field(0.0, ge=0.0, description="MixUp Beta(alpha, alpha) parameter; 0 = off")
    cutmix: float = Field(0.0, ge=0.0, description="CutMix Beta(alpha, alpha) parameter; 0 = off")

    @property
    def has_geometry(self) -> bool:
        return any((self.rotation, self.width_shift, self.height_shift, self.shear, self.zoom))

    @property
    def changes_labels(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def is_active(self) -> bool:
        jitter = self.color_jitter is not None and self.color_jitter.is_active
        return self.has_geometry or self.horizontal_flip or jitter or self.random_erasing > 0 or self.changes_labels



class DataSpec(Section):
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "imagefolder", "label-text", "image-masks",
                    "boxes-csv", "voc", "coco", "parallel", "squad", "text"] = Field(
        "auto", description="label-text: plain text, one example a line, the label, a space, then the text; "
                            "parallel: aligned line files <stem>.<source_language>[.gz] and <stem>.<target_language>[.gz] "
                            "(seq2seq; data.train names the stem); squad: SQuAD v1.1 JSON (qa; the default for it); "
                            "text: plain text, one example a non-empty line (causal_lm); "
                            "image-masks: a folder with images/ and masks/ (segmentation; the default for it); "
                            "detection: boxes-csv (a box a row; the default for it), voc (a folder of XML files), "
                            "coco (a JSON file)")
    image_root: str | None = Field(None, description="detection: the folder image file names are relative to (default: "
                                                     "the annotation file's folder; VOC: its <folder> beside the XMLs)")
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    validation_fraction: float | None = Field(None, gt=0.0, lt=1.0, description="split validation off train when no file is given")
    test_fraction: float | None = Field(None, gt=0.0, lt=1.0, description="split a test set off train when no file is "
                                                                          "given (qa: whole articles, never shared)")
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    max_train_examples: int | None = Field(None, gt=0, description="seeded sample of the training split")
    max_validation_examples: int | None = Field(None, gt=0, description="seeded sample of the validation split")
    text_column: str = "text"
    text_pair_column: str | None = None
    target_column: str | None = Field(None, description="seq2seq: the target text (default 'target'); captioning: the "
                                                        "caption (default 'caption')")
    source_language: str | None = Field(None, description="parallel: suffix of the source file (e.g. en)")
    target_language: str | None = Field(None, description="parallel: suffix of the target file (e.g. de)")
    prompt_column: str | None = Field(None, description="causal_lm: instruction format, the prompt column (no loss on it)")
    response_column: str | None = Field(None, description="causal_lm: instruction format, the response column (the loss)")
    label_column: str | list[str] = Field(
        "label", description="the column with the label; regression: the column(s) with the target value(s)")
    label_separator: str = Field(",", min_length=1,
                                 description="multilabel: separates the labels inside one text cell (JSON lists need none)")
    image_column: str | None = Field(None, description="a table whose column holds image paths (relative to the "
                                                       "table's folder) instead of a class-per-folder tree")
    columns: list[str] | None = Field(None, description="column names for a CSV/TSV file without a header row")
    encoding: str = Field("utf-8", description="text encoding of the data files (tables and line files), e.g. latin-1")
    image: ImageSpec = ImageSpec()
    skip_unreadable_images: bool = False
    drop_bad_annotations: bool = Field(False, description="segmentation and detection: leave out images whose mask "
                                                          "or boxes are bad (missing, of another size, outside the "
                                                          "image, of no area, of unknown classes), with a count")
    num_workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = Field(
        "auto", description="loader processes; auto: images are decoded in up to 4 workers, text (tokenised once) needs none")
    group_by_length: bool = Field(True, description="text: batch examples of similar length together (less padding)")
    sampler: Literal["shuffle", "balanced"] = Field("shuffle", description="balanced: draw classes equally often (with replacement)")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="image augmentation of training batches")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r}; e.g. utf-8, latin-1, cp1252, utf-16") from None
        return value

    @model_validator(mode="after")
    def _sources(self) -> DataSpec:
        if self.validation and self.validation_fraction:
            raise ValueError("give data.validation or data.validation_fraction, not both")
        return self
