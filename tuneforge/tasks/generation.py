"""Tasks whose model writes text from an input: seq2seq (translation, summarisation) and image captioning.
The model computes its own token loss from `labels` (padding is -100, which it skips); evaluation
generates with beam search and scores the text against the references (BLEU, chrF, ROUGE, METEOR)."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from tuneforge.config import Recipe
from tuneforge.data.common import Split, check_images, check_texts
from tuneforge.data.tables import TABLES, read_image_split
from tuneforge.data.text import read_columns, read_lines, read_parallel
from tuneforge.data.text_datasets import CaptionDataset, Seq2SeqDataset
from tuneforge.data.tokens import text_tokenizer
from tuneforge.errors import DataError, ModelError
from tuneforge.limits import MAX_COUNT
from tuneforge.models.loading import LoadedModel, open_hf_model
from tuneforge.models.text import CaptionProcessor, load_captioning, set_special_tokens
from tuneforge.tasks.base import example_nll, gather_by_index, mean_token_loss
from tuneforge.tasks.inputs import open_image_input
from tuneforge.tasks.registry import register_task
from tuneforge.tasks.text import TextSpec, TextTask
from tuneforge.tasks.text_metrics import generation_scores

SAMPLES = 5  # generated texts kept in eval.json beside their references, to read what the scores mean


class GenerationSpec(TextSpec):
    max_target_length: int = Field(128, gt=0, le=MAX_COUNT, description="token limit of target texts")
    num_beams: int = Field(4, ge=1, le=1000, description="beam search width when generating")
    max_new_tokens: int = Field(64, ge=1, le=MAX_COUNT, description="the most tokens one generation adds")


class Seq2SeqSpec(GenerationSpec):
    source_prefix: str = Field("", description="text put before every source, e.g. T5's 'translate English to German: '")


class GenerationTask(TextTask):
    """Text generated with beam search, scored against the references."""

    metric_names = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor", "loss")
    summary_keys = ("bleu", "chrf", "rougeL", "meteor", "loss")
    export_note = "writes its text in a generation loop around the model, which the export does not carry yet"
    adds_head = False  # the pretrained language-model head

    def __init__(self, tokenizer=None, num_beams: int = 4, max_new_tokens: int = 64, max_length: int = 128,
                 max_target_length: int = 128):
        self.tokenizer, self.num_beams, self.max_new_tokens = tokenizer, num_beams, max_new_tokens
        self.max_length, self.max_target_length = max_length, max_target_length

    @classmethod
    def for_run(cls, recipe: Recipe, data, preprocessor) -> GenerationTask:
        return cls(text_tokenizer(preprocessor), max_length=recipe.model.max_length, **cls.settings(recipe))

    @classmethod
    def from_info(cls, info, preprocessor) -> GenerationTask:
        settings = cls.saved_settings(info)
        return cls(text_tokenizer(preprocessor), max_length=info.max_length, **settings)

    def generate(self, model, inputs: dict) -> list[str]:
        generated = model.generate(**inputs, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens)
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def evaluate(self, model, loader, accelerator) -> dict:
        model.eval()
        generator = accelerator.unwrap_model(model)
        indices, results = [], []  # per example: (generated text, (token NLL, tokens))
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for batch in loader:
                with accelerator.autocast():
                    logits = model(**batch["inputs"], labels=batch["labels"]).logits
                    texts = self.generate(generator, batch["inputs"])
                results += zip(texts, example_nll(logits, batch["labels"], shift=False))
                indices += batch["index"].tolist()
        by_index = gather_by_index(accelerator, indices, results)
        loss, _ = mean_token_loss([nll for _, nll in by_index.values()])
        order = self.scored_once(sorted(by_index), loader.dataset)
        predictions = [by_index[i][0] for i in order]
        references = [loader.dataset.references[i] for i in order]
        return {**generation_scores(predictions, references), "loss": loss,
                "samples": [{"prediction": p, "references": r} for p, r in zip(predictions[:SAMPLES], references)]}

    def scored_once(self, indices: list[int], dataset) -> list[int]:
        """The examples whose generated text is scored: each one (captioning: each image once)."""
        return indices

    def predict(self, loaded: LoadedModel, items: list) -> list[dict]:
        """Generated text per input."""
        with torch.inference_mode():
            return [{"text": text} for text in self.generate(loaded.model, self.model_inputs(loaded, items))]

@register_task
class Seq2SeqTask(GenerationTask):
    """Text to text: translation, summarisation."""

    name = "seq2seq"
    Spec = Seq2SeqSpec
    card_metrics = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor", "loss")
    description = "sequence-to-sequence model"
    purpose = "Writing the target text for"
    data_formats = (*TABLES, "parallel")
    data_keys = frozenset({"target_column", "source_language", "target_language", "test_fraction"})
    auto_class, model_types, model_examples = ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                                               "T5, BART, Marian")
    head = "the pretrained decoder and language-model head"
    limitation = ("- BLEU, chrF, ROUGE and METEOR compare with the references word by word; a correct rewording scores "
                  "lower than it deserves.")

    def __init__(self, tokenizer=None, num_beams: int = 4, max_new_tokens: int = 64, max_length: int = 128,
                 max_target_length: int = 128, source_prefix: str = ""):
        super().__init__(tokenizer, num_beams, max_new_tokens, max_length, max_target_length)
        self.source_prefix = source_prefix

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        data = recipe.data
        data.target_column = data.target_column or "target"
        if data.format == "parallel" and not (data.source_language and data.target_language):
            raise ValueError("data.format parallel needs data.source_language and data.target_language (the files' "
                             "suffixes, e.g. en and de)")

    @classmethod
    def read_split(cls, name: str, where: str, data_spec, notes: list[str], labelled: bool = True) -> Split:
        if data_spec.format == "parallel":
            if not Path(where).is_file():  # a stem: <stem>.<source language> beside <stem>.<target language>
                return read_parallel(name, where, data_spec)
            data_spec = data_spec.model_copy(update={"format": "auto"})  # trained on aligned files, given a table
        if not labelled and Path(where).suffix == ".txt":
            return read_lines(name, where, data_spec)
        wanted = {data_spec.text_column: "the source text", **({data_spec.target_column: "the target text"} if labelled else {})}
        columns, rows, problems = read_columns(name, where, data_spec, wanted)
        if problems:
            return Split(name, where, [], [], texts=[], problems=problems)
        targets = columns[data_spec.target_column] if labelled else [None] * len(rows)
        return Split(name, where, targets, rows, texts=columns[data_spec.text_column])

    @classmethod
    def check_split(cls, split: Split, data_spec, notes: list[str], labelled: bool = True) -> list[str]:
        problems = super().check_split(split, data_spec, notes, labelled)
        if labelled and len(split):
            target = "target" if data_spec.format == "parallel" else data_spec.target_column
            problems += check_texts(split, target, split.labels)
        return problems

    @classmethod
    def input_column(cls, data_spec) -> str:
        return "source" if data_spec.format == "parallel" else data_spec.text_column

    def dataset(self, split: Split, targets: list, preprocessor, train: bool = False):
        return Seq2SeqDataset(split, preprocessor, self.max_length, self.max_target_length, self.source_prefix)

    def model_inputs(self, loaded: LoadedModel, items: list) -> dict:
        inputs = dict(self.tokenizer([self.source_prefix + text for text in items], truncation=True,
                                     max_length=self.max_length, padding=True, return_tensors="pt"))
        inputs.pop("token_type_ids", None)
        return inputs


@register_task
class CaptioningTask(GenerationTask):
    """Image to text: a vision encoder joined to a text decoder by cross-attention."""

    name = "captioning"
    Spec = GenerationSpec
    description = "image captioning model"
    purpose = "Describing in text"
    data_formats = TABLES
    data_keys = frozenset({"target_column", "test_fraction"})
    reads_decoder = True
    auto_class = "VisionEncoderDecoderModel"
    head = "a text decoder reading the vision encoder through cross-attention"
    limitation = ("- BLEU, ROUGE and METEOR compare with the reference captions word by word; a correct but differently "
                  "worded caption scores lower than it deserves.")

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        data = recipe.data
        data.target_column, data.image_column = data.target_column or "caption", data.image_column or "image"

    @classmethod
    def read_split(cls, name: str, where: str, data_spec, notes: list[str], labelled: bool = True) -> Split:
        if not labelled and Path(where).is_dir():  # a folder of images to caption
            return read_image_split(name, Path(where), require_labels=False)
        wanted = {data_spec.image_column: "the image file", **({data_spec.target_column: "the caption"} if labelled else {})}
        columns, rows, problems = read_columns(name, where, data_spec, wanted)
        if problems:
            return Split(name, where, [], [], image_paths=[], problems=problems)
        root = Path(data_spec.image_root) if data_spec.image_root else Path(where).parent
        paths = [None if image is None else root / str(image) for image in columns[data_spec.image_column]]
        captions = columns[data_spec.target_column] if labelled else [None] * len(rows)
        return Split(name, where, captions, rows, image_paths=paths)

    @classmethod
    def check_split(cls, split: Split, data_spec, notes: list[str], labelled: bool = True) -> list[str]:
        if len(split) == 0:
            return [f"{split.name}: {split.source} has no examples"]
        problems = check_images(split, data_spec.skip_unreadable_images, notes)
        return problems + (check_texts(split, data_spec.target_column, split.labels) if labelled else [])

    @classmethod
    def example_groups(cls, split: Split) -> tuple[list, str]:
        return [str(p) for p in split.image_paths], "image"  # every caption of an image on one side

    @classmethod
    def modality_of(cls, split: Split) -> str:
        return "image"

    @classmethod
    def load_model(cls, model_spec, labels: list[str], image_spec, factory=None) -> LoadedModel:
        cls.refuse_factory(model_spec)
        source = open_hf_model(model_spec)
        if source.config.model_type != "vision-encoder-decoder" and not model_spec.decoder:
            raise ModelError([f"model.name {model_spec.name!r} is a {source.config.model_type} model; task.type "
                              "captioning needs a VisionEncoderDecoder folder, or model.decoder naming a text decoder "
                              "for this encoder"])
        model, processor, report = load_captioning(model_spec, image_spec, source.name, source.common)
        set_special_tokens(model, processor.tokenizer, decoder_start=True)
        return LoadedModel(model, processor, "image", cls.head_of(model), report)

    @classmethod
    def saved_class(cls, folder: Path) -> tuple[type, str]:
        from transformers import VisionEncoderDecoderModel

        return VisionEncoderDecoderModel, "image"

    @classmethod
    def saved_processor(cls, folder: Path, modality: str):
        return CaptionProcessor.from_pretrained(folder)

    def dataset(self, split: Split, targets: list, preprocessor, train: bool = False):
        return CaptionDataset(split, preprocessor, self.max_target_length)

    def prepare_input(self, item, index: int, modality: str):
        return open_image_input(item, index)

    def model_inputs(self, loaded: LoadedModel, items: list) -> dict:
        processor = loaded.preprocessor.image_processor
        return {"pixel_values": torch.cat([processor(image, return_tensors="pt")["pixel_values"] for image in items])}

    def read_inputs(self, path: Path, data_spec) -> tuple[list, list[str]]:
        split = self.read_split("input", str(path), data_spec, [], labelled=False)
        if split.problems:
            raise DataError(split.problems)
        return split.image_paths, split.rows

    def scored_once(self, indices: list[int], dataset) -> list[int]:
        """A row per (image, caption), every caption of an image a reference: each image is scored once."""
        seen, kept = set(), []
        for index in indices:
            if dataset.paths[index] not in seen:
                seen.add(dataset.paths[index])
                kept.append(index)
        return kept

    @classmethod
    def card_input(cls, info) -> str:
        return "RGB images"
