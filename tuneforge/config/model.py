"""Recipe sections about the model: where it comes from, its head, what freezes, its adapter."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from tuneforge.config.base import Section
from tuneforge.limits import MAX_COUNT, MAX_IMAGE_SIDE, MAX_STEPS

SELECTORS_HELP = ("group names as `tuneforge inspect` shows them (embeddings or stem, block.K, neck, head), "
                  "or all, backbone (all but the head), blocks, last:N (the last N blocks)")


class StageSpec(Section):
    epochs: float | None = Field(None, gt=0, description="stage length in epochs")
    steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="stage length in optimizer steps")
    train: list[str] = Field(min_length=1, description=SELECTORS_HELP)
    lr_multiplier: float = Field(1.0, gt=0, description="multiplies every group's learning rate in this stage")

    @model_validator(mode="after")
    def _length(self) -> StageSpec:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("a stage needs exactly one length: epochs or steps")
        return self


class FreezeSpec(Section):
    strategy: Literal["full", "partial", "feature_extraction", "head_only", "progressive", "bitfit", "auto"] = Field(
        "full", description="auto: measured before training (tuneforge advise) and chosen from the measurements")
    trainable_blocks: int | None = Field(None, gt=0, le=MAX_COUNT, description="partial: how many of the last blocks train")
    head_hidden: int | None = Field(None, gt=0, le=MAX_COUNT,
                                    description="feature_extraction: hidden width of an MLP head (factory models)")
    stages: list[StageSpec] | None = Field(None, description="progressive: the stages in order")
    include: list[str] = Field(default_factory=list, description="regexes of parameter names that always train")
    exclude: list[str] = Field(default_factory=list, description="regexes of parameter names that never train")
    train_bn: bool = Field(False, description="let BatchNorm in frozen parts update its running statistics")

    @model_validator(mode="after")
    def _strategy_fields(self) -> FreezeSpec:
        if self.strategy == "partial" and self.trainable_blocks is None:
            raise ValueError("strategy partial needs trainable_blocks (how many of the last blocks train)")
        if self.strategy == "progressive" and not self.stages:
            raise ValueError("strategy progressive needs stages, e.g. [{epochs: 1, train: [head]}, {epochs: 2, train: [all]}]")
        if self.stages and self.strategy != "progressive":
            raise ValueError(f"stages are for strategy progressive, not {self.strategy}")
        if self.head_hidden and self.strategy != "feature_extraction":
            raise ValueError("head_hidden is for strategy feature_extraction")
        for pattern in self.include + self.exclude:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
        return self


class ModelSpec(Section):
    """Where the pretrained network comes from and how its head is replaced."""

    name: str | None = Field(
        None, description="Hugging Face folder or Hub id; 'pkg:PACKAGE/sub/dir' for a folder inside an installed package"
    )
    factory: str | None = Field(None, description="'module:function' returning a torch.nn.Module")
    factory_kwargs: dict[str, Any] = {}
    weights: str | None = Field(None, description="weights file for a factory model (.safetensors, or a legacy torch file)")
    weights_key: str | None = Field(None, description="key of the state dict inside a legacy checkpoint dict, e.g. 'state_dict'")
    strip_prefix: list[str] = Field(default_factory=list, description="key prefixes removed before loading, e.g. 'module.'")
    head: str | None = Field(None, description="attribute path of a factory model's classifier (default: its last Linear)")
    new_head: bool = Field(True, description="replace the classifier with a fresh one sized to the label set")
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pretrained: bool = Field(True, description="false: same architecture, random initialisation (a baseline)")
    max_length: int = Field(128, gt=0, le=MAX_COUNT, description="token limit for text models")
    trust_remote_code: bool = Field(False, description="run the model's own Python code from its folder (needs revision)")
    revision: str | None = None
    allow_unsafe_pickle: bool = Field(False, description="load a weights file that needs full pickle (can run code)")
    freeze: FreezeSpec = FreezeSpec()
    decoder: str | None = Field(None, description="captioning: a text decoder (e.g. GPT-2) joined to the vision encoder "
                                                  "model.name by new cross-attention; without it model.name is a whole "
                                                  "VisionEncoderDecoder model")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of model.name (Hugging Face model) or model.factory ('module:function')")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"model.factory must look like 'package.module:function', got {self.factory!r}")
        if self.weights is not None and self.factory is None:
            raise ValueError("model.weights is for factory models; a Hugging Face folder carries its own weights")
        if self.trust_remote_code and not self.revision:
            raise ValueError("model.trust_remote_code needs model.revision pinned to a commit, so the code cannot change under you")
        return self


class ImageSpec(Section):
    size: int | None = Field(None, gt=0, le=MAX_IMAGE_SIDE,
                             description="square side images are resized to (default: the model's processor)")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class AdapterSpec(Section):
    """Recipe section `adapter`."""

    method: Literal["none", "lora", "dora", "ia3", "prompt", "prefix"] = Field(
        "none", description="lora, dora (LoRA with a learned magnitude per output), ia3 (learned scaling vectors), "
                            "prompt (learned vectors inserted after the first token), prefix (learned keys and values "
                            "in every attention layer)")
    rank: int = Field(8, gt=0, le=MAX_COUNT, description="LoRA/DoRA: rank of the update")
    alpha: float = Field(16.0, gt=0, description="LoRA/DoRA: the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA/DoRA: dropout on the adapter's input")
    target_modules: Literal["all-linear"] | list[str] | None = Field(
        None, description="module names (or suffixes) that get an adapter, or all-linear; default: peft's choice "
                          "for the architecture (BERT: query and value)")
    feedforward_modules: list[str] | None = Field(
        None, description="IA3: which of target_modules are feed-forward layers (scaled on their input)")
    virtual_tokens: int = Field(20, gt=0, le=MAX_COUNT, description="prompt: how many vectors are inserted; prefix: how many keys "
                                                      "and values each attention layer gets")
    save_merged: bool = Field(False, description="also write RUN/model-merged/: the adapter merged into full weights")

    @model_validator(mode="after")
    def _fields(self) -> AdapterSpec:
        if self.method == "ia3" and self.target_modules is not None and self.feedforward_modules is None:
            raise ValueError("method ia3 with target_modules needs feedforward_modules (those of target_modules that "
                             "are feed-forward layers, e.g. [output.dense])")
        if self.save_merged and not self.mergeable:
            raise ValueError(f"save_merged needs an adapter that merges into the weights (method lora, dora or ia3); "
                             f"{self.method} adds vectors the original architecture has no place for")
        if self.method in ("prompt", "prefix"):
            given = [name for name in ("target_modules", "feedforward_modules") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} applies to lora, dora and ia3; method {self.method} places its "
                                 "vectors itself (remove the key)")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def mergeable(self) -> bool:
        """Whether the adapter folds into the original weights (a plain transformers model)."""
        return self.method in ("lora", "dora", "ia3")
