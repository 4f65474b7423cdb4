"""Load a pretrained backbone, give it a fresh head, and discover its layer groups.

Two sources, one result (`LoadedModel`):
  * a Hugging Face folder or Hub id, loaded with AutoModelFor{Sequence,Image}Classification;
  * a user's PyTorch factory ('module:function') plus a weights file, read without pickle.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ModelError, TuneforgeError, first_line
from tuneforge.models.weights import misfit, read_state_dict, safetensors_shapes, weights_fit

FACTORY_CONFIG_KEY = "tuneforge_factory"


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


class FactoryClassifier(nn.Module):
    """Gives a plain PyTorch module the keyword interface the loop uses: model(pixel_values=...).logits."""

    base_model_prefix = "net"  # as in transformers: where the pretrained network sits

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, **_) -> FactoryOutput:
        return FactoryOutput(self.net(pixel_values))


@dataclass
class FactoryOutput:
    logits: torch.Tensor


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


# ---------------------------------------------------------------- factories: code the user names, never a folder

Factory = Callable[..., nn.Module]


def import_factory(reference: str, setting: str = "model.factory") -> Factory:
    """The function a user named (in `setting`): 'package.module:function', imported from sys.path as it is
    (tuneforge never adds to it), or 'path/to/file.py:function', that file loaded by its path (relative to the
    working directory)."""
    module_name, _, function_name = reference.rpartition(":")
    try:
        module = _module_from_file(Path(module_name).expanduser()) if module_name.endswith(".py") else \
            importlib.import_module(module_name)
    except ModelError:
        raise
    except Exception as error:  # ImportError, or whatever the user's module raises while it is imported
        raise ModelError([f"{setting} {reference!r}: cannot import {module_name!r} ({type(error).__name__}: "
                          f"{first_line(error)}); a module is found on the Python path (PYTHONPATH), a file by "
                          "its path: path/to/file.py:function"]) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ModelError([f"{setting} {reference!r}: {module_name} has no function {function_name!r}"])
    return factory


def _module_from_file(path: Path):
    if not path.is_file():
        raise ModelError([f"factory file {path} does not exist (give 'path/to/file.py:function' or "
                          "'package.module:function')"])
    path = path.resolve()
    name = f"tuneforge_factory_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _factory_name(reference: str) -> tuple[str, str]:
    """(module name without its package or folder, function name): what must match between a folder and the user."""
    module, _, function = reference.rpartition(":")
    return (Path(module).stem if module.endswith(".py") else module.rpartition(".")[2]), function


def trusted_factory(saved: str, trusted: str | Factory | None, folder: Path) -> Factory:
    """The factory a saved folder was built with, only if the user named it: a folder is data, and loading
    it must never import or call anything written inside it. The user's name must match the folder's by
    module and function name (its package or path may differ, so a model loads from anywhere)."""
    if trusted is None:
        raise ModelError([f"{folder} was built by the factory {saved!r}, and tuneforge never runs code named inside a "
                          f"model folder. If you trust that function, name it yourself: --trust-factory "
                          f"MODULE:FUNCTION or path/to/file.py:FUNCTION (Python: tuneforge.load(path, factory=...))"])
    if callable(trusted):
        matches = getattr(trusted, "__name__", None) == _factory_name(saved)[1]
        given = getattr(trusted, "__qualname__", repr(trusted))
    else:
        matches, given = _factory_name(trusted) == _factory_name(saved), trusted
    if not matches:
        raise ModelError([f"{folder} was built by the factory {saved!r}, not by {given!r} (the trusted factory); "
                          "name the factory the folder was built with"])
    return trusted if callable(trusted) else import_factory(trusted, "--trust-factory")


def _get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ModelError([f"model.head {path!r}: no such module; modules are: {', '.join(n for n, _ in model.named_children())}"]) from None


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def last_linear(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(["the factory model has no nn.Linear classifier; name its head with model.head"])
    return names[-1]


def new_classifier(in_features: int, num_labels: int, dropout: float, hidden: int | None = None) -> nn.Sequential:
    """Dropout + linear layer, or with `hidden` a small MLP head (for feature extraction)."""
    if hidden is None:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_labels))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(hidden, num_labels))


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

def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _hf_modality(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return "image" if config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES else "text"


def _hf_head_prefixes(model: nn.Module) -> list[str]:
    # Whatever sits beside the base model (bert, vit, ...) with parameters is the task head.
    base = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children() if name != base and any(True for _ in child.parameters())]


def _add_head_dropout(model: nn.Module, head_prefixes: list[str], p: float) -> None:
    """Dropout on the head's input for architectures whose config has no classifier_dropout.

    A pre-hook adds no parameters, so the exported folder stays loadable by transformers.
    """
    if p <= 0 or not head_prefixes:
        return
    head = model.get_submodule(head_prefixes[0])
    head.register_forward_pre_hook(lambda module, args: (nn.functional.dropout(args[0], p, module.training), *args[1:]))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def _load_tokenizer(reference: str, name: str, config, common: dict):
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
    if vocab and len(tokenizer) < vocab // 10:  # an empty stand-in would map every word to [UNK]
        raise ModelError([f"model.name {reference!r}: its tokenizer knows {len(tokenizer)} tokens but the model has "
                          f"{vocab}; the tokenizer files are incomplete"])
    return tokenizer


def load_hf_model(spec, labels: list[str], image_spec, task: str = "classification") -> LoadedModel:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForSemanticSegmentation,
        AutoModelForSequenceClassification,
    )

    _quiet_transformers()
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
    if task in TEXT_TASK_CLASSES:
        return load_text_task_model(spec, image_spec, task, name, config, common)
    modality = _hf_modality(config)
    auto_class = AutoModelForImageClassification if modality == "image" else AutoModelForSequenceClassification
    if task in ("segmentation", "detection"):
        from transformers import AutoModelForObjectDetection
        from transformers.models.auto import modeling_auto

        mapping, auto_class, example = {
            "segmentation": (modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES,
                             AutoModelForSemanticSegmentation, "SegFormer"),
            "detection": (modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES, AutoModelForObjectDetection,
                          "DETR, Conditional DETR, YOLOS")}[task]
        if config.model_type not in mapping:
            raise ModelError([f"model.name {spec.name!r} is a {config.model_type} model, which transformers has no "
                              f"{task} head for; choose a {task} model ({example})"])
        modality = "image"

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
    config = AutoConfig.from_pretrained(name, **common, **overrides)

    if spec.pretrained:
        try:
            model, info = auto_class.from_pretrained(name, config=config, ignore_mismatched_sizes=True,
                                                     output_loading_info=True, **common)
        except Exception as error:  # missing or damaged weights: transformers raises OSError, SafetensorError, ...
            raise ModelError([f"model.name {spec.name!r}: cannot load its weights ({first_line(error)})"]) from None
        mismatched = [key for key, *_ in info.get("mismatched_keys", [])]
        new = sorted(set(info["missing_keys"]) | set(mismatched))
        report = LoadReport(sorted(set(model.state_dict()) - set(new)), new,
                            sorted(set(info["unexpected_keys"]) | set(mismatched)))
    else:
        model = auto_class.from_config(config, trust_remote_code=spec.trust_remote_code)
        report = LoadReport([], sorted(model.state_dict()), [])
    head = _hf_head_prefixes(model)
    if not native_dropout and task not in ("segmentation", "detection"):  # their heads read several inputs
        _add_head_dropout(model, head, spec.head_dropout)

    if modality == "text":
        preprocessor = _load_tokenizer(spec.name, name, config, common)
    else:
        try:
            defaults = AutoImageProcessor.from_pretrained(name, backend="pil", **common)
        except (OSError, ValueError):
            defaults = None
        preprocessor = make_image_processor(image_spec, defaults)
    return LoadedModel(model, preprocessor, modality, head if spec.new_head else [], report)


# ---------------------------------------------------------------- text tasks

# task.type -> (transformers auto class, the mapping of model types it has, examples for the message)
TEXT_TASK_CLASSES = {
    "seq2seq": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "T5, BART, Marian"),
    "causal_lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "GPT-2, Llama"),
    "qa": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "BERT, RoBERTa, DistilBERT"),
    "captioning": ("VisionEncoderDecoderModel", None, "a VisionEncoderDecoder folder, or model.name a vision encoder "
                                                      "with model.decoder a text decoder"),
}


@dataclass
class CaptionProcessor:
    """Captioning's two preprocessors: pixels for the encoder, tokens for the decoder. Saved side by side in
    one folder (preprocessor_config.json beside the tokenizer files), as transformers' own captioning models are."""

    image_processor: object
    tokenizer: object

    def save_pretrained(self, folder) -> None:
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder, image_spec=None) -> CaptionProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        image = AutoImageProcessor.from_pretrained(folder, backend="pil")
        return cls(make_image_processor(image_spec, image) if image_spec is not None else image,
                   AutoTokenizer.from_pretrained(folder))


def text_head_prefixes(model: nn.Module, task: str) -> list[str]:
    """QA: the new span classifier. Text generators: an `lm_head` with weights of its own; most (T5, BART, GPT-2)
    tie it to the input embeddings, and then nothing new sits on top: the plan trains blocks, not a head."""
    if task == "qa":
        return _hf_head_prefixes(model)
    own = {name for name, _ in model.named_parameters()}  # tied weights appear once, under their first name
    return [name for name, _ in model.named_modules()
            if name.rsplit(".", 1)[-1] == "lm_head" and any(p.startswith(name + ".") for p in own)]


def _set_special_tokens(model: nn.Module, tokenizer, task: str) -> None:
    """Generation needs to know how a target starts, ends and is padded; decoder-only tokenizers often have no
    pad token (GPT-2), and a fresh VisionEncoderDecoder knows none of the three."""
    from tuneforge.data.text_tasks import pad_id

    settings = {"pad_token_id": pad_id(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    if task == "captioning":
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        settings["decoder_start_token_id"] = start
    for target in (model.config, model.generation_config):
        for key, value in settings.items():
            if getattr(target, key, None) is None and value is not None:
                setattr(target, key, value)


def _load_captioning(spec, image_spec, name: str, common: dict) -> tuple[nn.Module, object, LoadReport]:
    from transformers import AutoConfig, AutoImageProcessor, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    decoder = resolve_model_path(spec.decoder) if spec.decoder else None
    if decoder is not None:  # a decoder that reads the image: transformers 5's configs no longer carry these by default
        decoder_config = AutoConfig.from_pretrained(decoder, **common)
        decoder_config.is_decoder, decoder_config.add_cross_attention = True, True
    try:
        if decoder is None and spec.pretrained:
            model = VisionEncoderDecoderModel.from_pretrained(name, **common)
            report = LoadReport(sorted(model.state_dict()), [], [])
        elif decoder is None:
            model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_pretrained(name, **common))
            report = LoadReport([], sorted(model.state_dict()), [])
        elif spec.pretrained:
            model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(name, decoder, decoder_config=decoder_config)
            # Only the cross-attention (and a projection between different widths) is new.
            new = sorted(k for k in model.state_dict() if any(part in k for part in ("crossattention", "ln_cross_attn",
                                                                                       "enc_to_dec_proj")))
            report = LoadReport(sorted(set(model.state_dict()) - set(new)), new, [])
        else:
            config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(AutoConfig.from_pretrained(name, **common),
                                                                             decoder_config)
            model = VisionEncoderDecoderModel(config)
            report = LoadReport([], sorted(model.state_dict()), [])
    except Exception as error:  # a model that is no VisionEncoderDecoder, or a decoder without cross-attention support
        raise ModelError([f"model.name {spec.name!r}{f' with model.decoder {spec.decoder!r}' if decoder else ''}: cannot "
                          f"build a captioning model ({first_line(error)}); give a VisionEncoderDecoder folder, or a "
                          "vision encoder as model.name and a text decoder (GPT-2, BERT) as model.decoder"]) from None
    try:
        defaults = AutoImageProcessor.from_pretrained(name, backend="pil", **common)
    except (OSError, ValueError):
        defaults = None
    tokenizer = _load_tokenizer(spec.decoder or spec.name, decoder or name, model.config.decoder, common)
    return model, CaptionProcessor(make_image_processor(image_spec, defaults), tokenizer), report


def load_text_task_model(spec, image_spec, task: str, name: str, config, common: dict) -> LoadedModel:
    """A pretrained model for seq2seq, causal_lm, qa or captioning, with the head the task needs."""
    import transformers
    from transformers.models.auto import modeling_auto

    class_name, mapping, examples = TEXT_TASK_CLASSES[task]
    if task == "captioning":
        if config.model_type != "vision-encoder-decoder" and not spec.decoder:
            raise ModelError([f"model.name {spec.name!r} is a {config.model_type} model; task.type captioning needs "
                              "a VisionEncoderDecoder folder, or model.decoder naming a text decoder for this encoder"])
        model, preprocessor, report = _load_captioning(spec, image_spec, name, common)
        modality = "image"
    else:
        if config.model_type not in getattr(modeling_auto, mapping):
            raise ModelError([f"model.name {spec.name!r} is a {config.model_type} model, which transformers has no "
                              f"{task} model for; choose one of its kind ({examples})"])
        auto_class = getattr(transformers, class_name)
        if spec.pretrained:
            try:
                model, info = auto_class.from_pretrained(name, output_loading_info=True, **common)
            except Exception as error:  # missing or damaged weights
                raise ModelError([f"model.name {spec.name!r}: cannot load its weights ({first_line(error)})"]) from None
            new = sorted(info["missing_keys"])
            report = LoadReport(sorted(set(model.state_dict()) - set(new)), new, sorted(info["unexpected_keys"]))
        else:
            model = auto_class.from_config(config, trust_remote_code=spec.trust_remote_code)
            report = LoadReport([], sorted(model.state_dict()), [])
        preprocessor = _load_tokenizer(spec.name, name, config, common)
        modality = "text"
    tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
    if task != "qa":
        _set_special_tokens(model, tokenizer, task)
    elif not getattr(tokenizer, "is_fast", False):
        raise ModelError([f"model.name {spec.name!r}: task.type qa maps answers to characters with a fast tokenizer's "
                          "offsets, and this model's tokenizer is a slow one; save a tokenizer.json with the model"])
    head = text_head_prefixes(model, task)
    if task == "qa":  # the new span head, as a classifier head; a language model's pretrained head is left as it is
        _add_head_dropout(model, head, spec.head_dropout)
    return LoadedModel(model, preprocessor, modality, head, report)


# ---------------------------------------------------------------- factory models

def _call_factory(factory: Factory, reference: str, kwargs: dict) -> nn.Module:
    try:
        net = factory(**kwargs)
    except Exception as error:  # the user's code: report it with what it was called with
        raise ModelError([f"model.factory {reference!r} failed when called with model.factory_kwargs {kwargs}: "
                          f"{type(error).__name__}: {first_line(error)}"]) from None
    if not isinstance(net, nn.Module):
        raise ModelError([f"model.factory {reference!r} returned {type(net).__name__}, not a torch.nn.Module"])
    return net


def _attach_head(net: nn.Module, head: str, num_labels: int, dropout: float, hidden: int | None = None) -> None:
    old = _get_module(net, head)
    if not isinstance(old, nn.Linear):
        raise ModelError([f"model.head {head!r} is a {type(old).__name__}; the head to replace must be an nn.Linear"])
    _set_module(net, head, new_classifier(old.in_features, num_labels, dropout, hidden))


def build_factory_model(factory: dict, num_labels: int, function: Factory) -> FactoryClassifier:
    """Rebuild a saved factory model's architecture with the user's trusted `function` (weights are loaded
    by the caller)."""
    net = _call_factory(function, factory["factory"], factory.get("factory_kwargs", {}))
    if factory.get("new_head", True):
        _attach_head(net, factory["head"], num_labels, factory.get("head_dropout", 0.0), factory.get("head_hidden"))
    return FactoryClassifier(net)


def load_factory_model(spec, labels: list[str], image_spec, function: Factory | None = None) -> LoadedModel:
    """A factory model with a new head. `function`: the factory already resolved (a trusted one, when an adapter
    folder rebuilds its base); else the recipe's model.factory, which the user named, is imported."""
    if image_spec.size is None:
        raise ModelError(["a factory model needs data.image.size (and usually data.image.mean / std) for its preprocessing"])
    net = _call_factory(function or import_factory(spec.factory), spec.factory, spec.factory_kwargs)
    own = net.state_dict()
    report = LoadReport(new=sorted(own))
    if spec.pretrained:
        if not spec.weights:
            raise ModelError(["model.factory needs model.weights (or model.pretrained: false for a random start)"])
        state = read_state_dict(spec.weights, key=spec.weights_key, strip_prefix=spec.strip_prefix,
                                allow_unsafe_pickle=spec.allow_unsafe_pickle)
        fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if not fits:
            raise ModelError([f"model.weights {spec.weights}: none of its {len(state)} tensors fit the network "
                              f"(its keys look like {list(state)[:3]}, the network's like {list(own)[:3]}); "
                              "set model.strip_prefix or model.weights_key"])
        net.load_state_dict(fits, strict=False)
        # Older checkpoints lack BatchNorm's step counters; those are bookkeeping, not weights.
        absent = {k for k in set(own) - set(fits) if not k.endswith("num_batches_tracked")}
        report = LoadReport(sorted(fits), sorted(absent), sorted(set(state) - set(fits)))

    head = spec.head or last_linear(net)
    hidden = spec.freeze.head_hidden
    if spec.new_head:
        _attach_head(net, head, len(labels), spec.head_dropout, hidden)
        in_head = lambda key: key.startswith(head + ".")
        report.dropped = sorted(report.dropped + [k for k in report.loaded if in_head(k)])
        report.loaded = [k for k in report.loaded if not in_head(k)]
        report.new = sorted([k for k in report.new if not in_head(k)] + [k for k in net.state_dict() if in_head(k)])
    elif getattr(_get_module(net, head), "out_features", len(labels)) != len(labels):
        raise ModelError([f"model.new_head is false but {head} has {_get_module(net, head).out_features} outputs "
                          f"for {len(labels)} labels; set model.new_head: true"])
    factory = {"factory": spec.factory, "factory_kwargs": spec.factory_kwargs, "head": head,
               "new_head": spec.new_head, "head_dropout": spec.head_dropout, "head_hidden": hidden}
    return LoadedModel(FactoryClassifier(net), make_image_processor(image_spec), "image",
                       [f"net.{head}"] if spec.new_head else [], report, factory)


def load_model(spec, labels: list[str], image_spec, task: str = "classification",
               factory: Factory | None = None) -> LoadedModel:
    """The pretrained model with a new head for `labels` (task.type decides which head); `factory`: see
    load_factory_model."""
    if spec.factory and task in TEXT_TASK_CLASSES:
        raise ModelError([f"task.type {task} needs a Hugging Face model (model.name), not a factory model"])
    if spec.factory:
        if task == "segmentation":
            raise ModelError(["task.type segmentation needs a Hugging Face segmentation model (model.name), "
                              "not a factory model"])
        return load_factory_model(spec, labels, image_spec, factory)
    return load_hf_model(spec, labels, image_spec, task)


def enable_gradient_checkpointing(loaded: LoadedModel) -> None:
    """Recompute each block's activations during backward instead of keeping them.

    Non-reentrant checkpointing also works when the block inputs do not require
    gradients (frozen embeddings), which the reentrant variant silently breaks.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from tuneforge.models.groups import find_blocks

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
    size = _image_size(loaded.preprocessor)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}


def _image_size(processor) -> int:
    size = getattr(processor, "size", None)
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):  # a dict, or transformers' SizeDict
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return 224


# ---------------------------------------------------------------- model folders

def save_model_folder(loaded: LoadedModel, folder: Path, labels: list[str], trained: set[str] | None = None) -> None:
    """Write a Hugging Face-style folder: safetensors weights, config with the label map, preprocessor.

    With an adapter (loaded.base set), the weights are only what differs from the pretrained base:
    the parameters in `trained` (adapter and head) and the buffers, in adapter_model.safetensors,
    with adapter_config.json saying how to rebuild the base; load_model_folder puts them together.
    """
    from safetensors.torch import save_file, save_model

    from tuneforge.models.adapters import ADAPTER_CONFIG, ADAPTER_FILE

    _quiet_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    if loaded.base is not None:
        buffers = {name for name, _ in model.named_buffers()}
        delta = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
                 if name in buffers or name in (trained or set())}
        save_file(delta, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(loaded.base, indent=2))
    if loaded.factory is None:
        if loaded.base is not None:
            model.config.save_pretrained(folder)
        else:
            model.save_pretrained(folder)
    else:
        if loaded.base is None:
            save_model(model.net, str(folder / "model.safetensors"))
        config = {FACTORY_CONFIG_KEY: loaded.factory, "num_labels": len(labels),
                  "id2label": {str(i): label for i, label in enumerate(labels)},
                  "label2id": {label: i for i, label in enumerate(labels)}}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    loaded.preprocessor.save_pretrained(folder)


def load_adapter_folder(folder: Path, labels: list[str], factory: str | Factory | None = None) -> LoadedModel:
    """Rebuild the pretrained base named in adapter_config.json, attach the adapter, load the saved delta.

    The base is named by the folder, which is data: its settings that could run code (remote code, full
    pickle) are never taken from it, and a factory base needs the user's trusted `factory`."""
    from safetensors.torch import load_file

    from tuneforge.models.adapters import ADAPTER_CONFIG, ADAPTER_FILE, AdapterSpec, apply_adapter
    from tuneforge.config import ImageSpec, ModelSpec

    base = json.loads((folder / ADAPTER_CONFIG).read_text())
    spec = ModelSpec(**{**base["model"], "trust_remote_code": False, "allow_unsafe_pickle": False})
    function = trusted_factory(spec.factory, factory, folder) if spec.factory else None
    try:
        loaded = load_model(spec, labels, ImageSpec(**base["image"]), base.get("task", "classification"), function)
    except ModelError as error:
        raise ModelError([f"{folder} holds an adapter over {spec.name or spec.factory}, which must be available to load "
                          f"it: {error.problems[0]}"]) from None
    apply_adapter(loaded, AdapterSpec(**base["adapter"]), spec, ImageSpec(**base["image"]))
    delta = load_file(str(folder / ADAPTER_FILE))
    own = loaded.model.state_dict()
    head = [name for name, _ in loaded.model.named_parameters()
            if any(name.startswith(prefix + ".") for prefix in loaded.head_prefixes)]
    # A head left at its random initialisation would predict noise: every head weight must be in the file.
    problem = weights_fit({k: own[k].shape for k in head}, {k: v.shape for k, v in delta.items()},
                          allowed={k: v.shape for k, v in own.items()})
    if problem:
        raise ModelError([f"{folder / ADAPTER_FILE} does not fit the rebuilt model: {problem}"])
    loaded.model.load_state_dict(delta, strict=False)
    loaded.report = LoadReport()
    return loaded


def load_model_folder(folder: Path, factory: str | Factory | None = None) -> tuple[LoadedModel, list[str]]:
    """Reload a folder written by save_model_folder; returns the model and its labels (class order).

    A folder is data from anyone: nothing named in it is imported or called (a factory model needs the
    user's trusted `factory`), every weight of the model must come from its files with its shape, and a
    damaged folder is a ModelError, never a traceback."""
    try:
        return _load_model_folder(folder, factory)
    except TuneforgeError:
        raise
    except Exception as error:  # damaged JSON, weights or tokenizer files: transformers and safetensors raise many kinds
        raise ModelError([f"{folder}: cannot load the model ({type(error).__name__}: {first_line(error)}); the folder "
                          "is damaged or incomplete: export or train it again"]) from None


def _load_model_folder(folder: Path, factory: str | Factory | None) -> tuple[LoadedModel, list[str]]:
    from safetensors.torch import load_model as load_safetensors_into
    from transformers import AutoImageProcessor, AutoTokenizer

    from tuneforge.models.adapters import ADAPTER_CONFIG, ADAPTER_FILE

    _quiet_transformers()
    config = json.loads((folder / "config.json").read_text())
    names = config.get("id2label", {})  # text generators save none: they have no classes
    labels = [names[str(i)] for i in range(len(names))]
    adapter = (folder / ADAPTER_CONFIG).is_file()
    weights = folder / (ADAPTER_FILE if adapter else "model.safetensors")
    if not weights.is_file() or weights.stat().st_size == 0:
        raise ModelError([f"{folder}: {weights.name} is {'empty' if weights.is_file() else 'missing'}; the folder is "
                          "incomplete: export or train it again"])
    if adapter:
        loaded = load_adapter_folder(folder, labels, factory)
        if loaded.modality == "text":  # the saved tokenizer, in case the base's differs
            loaded.preprocessor = AutoTokenizer.from_pretrained(folder)
        return loaded, labels
    if FACTORY_CONFIG_KEY in config:
        saved = config[FACTORY_CONFIG_KEY]
        model = build_factory_model(saved, len(labels), trusted_factory(saved["factory"], factory, folder))
        problem = weights_fit({k: v.shape for k, v in model.net.state_dict().items()}, safetensors_shapes(weights))
        if problem:
            raise ModelError([f"{weights} does not fit the model its folder describes: {problem}"])
        load_safetensors_into(model.net, str(weights))
        processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
        return LoadedModel(model, processor, "image", [f"net.{saved['head']}"], LoadReport(), saved), labels
    info = folder / "tuneforge.json"
    task = json.loads(info.read_text()).get("task") if info.is_file() else None
    auto_class, modality = _saved_model_class(folder, task)
    model, loading = auto_class.from_pretrained(folder, output_loading_info=True)
    problem = misfit(sorted(loading["missing_keys"]), [f"{key} {tuple(found)} instead of {tuple(wanted)}" for key, found,
                     wanted in loading.get("mismatched_keys", [])], sorted(loading["unexpected_keys"]))
    if problem:  # transformers would start those weights at random and predict noise without a word
        raise ModelError([f"{weights} does not fit the model its folder describes: {problem}"])
    if task == "captioning":
        processor = CaptionProcessor.from_pretrained(folder)
    elif modality == "text":
        processor = AutoTokenizer.from_pretrained(folder)
    else:
        processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    head = text_head_prefixes(model, task) if task in TEXT_TASK_CLASSES else _hf_head_prefixes(model)
    return LoadedModel(model, processor, modality, head, LoadReport()), labels


def _saved_model_class(folder: Path, task: str | None):
    """The transformers class a saved folder of `task` loads with, and its input modality."""
    import transformers

    if task in TEXT_TASK_CLASSES:
        return getattr(transformers, TEXT_TASK_CLASSES[task][0]), "image" if task == "captioning" else "text"
    if task in ("segmentation", "detection"):
        return (transformers.AutoModelForSemanticSegmentation if task == "segmentation"
                else transformers.AutoModelForObjectDetection), "image"
    modality = _hf_modality(transformers.AutoConfig.from_pretrained(folder))
    return (transformers.AutoModelForImageClassification if modality == "image"
            else transformers.AutoModelForSequenceClassification), modality


def restore_saved_weights(model: nn.Module, folder: Path) -> None:
    """Put the weights of a model folder written by save_model_folder back into the same `model`."""
    from safetensors.torch import load_file, load_model as load_safetensors_into

    from tuneforge.models.adapters import ADAPTER_FILE

    if (folder / ADAPTER_FILE).is_file():  # the rest is the pretrained base, which training did not change
        model.load_state_dict(load_file(str(folder / ADAPTER_FILE)), strict=False)
    elif isinstance(model, FactoryClassifier):  # the network's own weights, as save_model_folder wrote them
        load_safetensors_into(model.net, str(folder / "model.safetensors"))
    else:
        model.load_state_dict(load_model_folder(folder)[0].model.state_dict())
