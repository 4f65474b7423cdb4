"""Models that read or write text beyond a label: generation settings, the heads of QA and language models,
and captioning's vision encoder joined to a text decoder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tuneforge.data.tokens import pad_id
from tuneforge.errors import ModelError, first_line
from tuneforge.models.loading import (
    NO_REMOTE_CODE,
    HFSource,
    LoadedModel,
    LoadReport,
    load_tokenizer,
    load_weights,
    make_image_processor,
    resolve_model_path,
)


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
        """The pair saved in a model folder (never running code named in it)."""
        from transformers import AutoConfig, AutoImageProcessor

        image = AutoImageProcessor.from_pretrained(folder, backend="pil", **NO_REMOTE_CODE)
        decoder = getattr(AutoConfig.from_pretrained(folder, **NO_REMOTE_CODE), "decoder", None)
        return cls(make_image_processor(image_spec, image) if image_spec is not None else image,
                   load_tokenizer(str(folder), str(folder), decoder, NO_REMOTE_CODE))


def lm_head_prefixes(model: nn.Module) -> list[str]:
    """A text generator's `lm_head` when it has weights of its own; most (T5, BART, GPT-2) tie it to the input
    embeddings, and then nothing new sits on top: the plan trains blocks, not a head."""
    own = {name for name, _ in model.named_parameters()}  # tied weights appear once, under their first name
    return [name for name, _ in model.named_modules()
            if name.rsplit(".", 1)[-1] == "lm_head" and any(p.startswith(name + ".") for p in own)]


def set_special_tokens(model: nn.Module, tokenizer, decoder_start: bool = False) -> None:
    """Generation needs to know how a target starts, ends and is padded; decoder-only tokenizers often have no
    pad token (GPT-2), and a fresh VisionEncoderDecoder knows none of the three (`decoder_start`)."""
    settings = {"pad_token_id": pad_id(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    if decoder_start:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        settings["decoder_start_token_id"] = start
    for target in (model.config, model.generation_config):
        for key, value in settings.items():
            if getattr(target, key, None) is None and value is not None:
                setattr(target, key, value)


def load_captioning(spec, image_spec, name: str, common: dict) -> tuple[nn.Module, object, LoadReport]:
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
    tokenizer = load_tokenizer(spec.decoder or spec.name, decoder or name, model.config.decoder, common)
    return model, CaptionProcessor(make_image_processor(image_spec, defaults), tokenizer), report


def load_text_model(spec, source: HFSource, auto_class_name: str) -> LoadedModel:
    """A pretrained text model as transformers' `auto_class_name` (its own head: a language model's, or a new
    QA span head), with its tokenizer; the head prefixes are the task's to set."""
    import transformers

    model, report = load_weights(spec, source, getattr(transformers, auto_class_name))
    return LoadedModel(model, load_tokenizer(spec.name, source.name, source.config, source.common), "text", [], report)
