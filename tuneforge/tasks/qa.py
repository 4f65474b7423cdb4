"""Extractive question answering: the model scores every token as an answer's start and end; the answer is
the best-scoring span inside the context, over every window of a long context (tuneforge.data.qa).
Metrics are SQuAD v1.1's official exact match and F1 against every gold answer of a question."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from tuneforge.config import Recipe
from tuneforge.data.common import Split
from tuneforge.data.qa import QAExample, best_answers, prepare_features, read_squad
from tuneforge.data.tables import read_table, table_format
from tuneforge.data.text import read_qa_split
from tuneforge.data.text_datasets import QADataset
from tuneforge.data.tokens import text_tokenizer, window_inputs
from tuneforge.errors import DataError, ModelError, listing
from tuneforge.limits import MAX_COUNT
from tuneforge.models.heads import add_head_dropout, hf_head_prefixes
from tuneforge.models.loading import LoadedModel
from tuneforge.tasks.base import gather_by_index
from tuneforge.tasks.inputs import check_unicode, is_pair
from tuneforge.tasks.registry import register_task
from tuneforge.tasks.text import TextSpec, TextTask
from tuneforge.tasks.text_metrics import squad_scores

SAMPLES = 5


class QASpec(TextSpec):
    stride: int = Field(128, gt=0, le=MAX_COUNT, description="tokens shared by consecutive windows of a long context "
                                                             "(default: a quarter of model.max_length)")
    max_answer_length: int = Field(30, gt=0, le=MAX_COUNT, description="the longest answer span, in tokens")


@register_task
class QATask(TextTask):
    name = "qa"
    Spec = QASpec
    description = "extractive question answering model"
    purpose = "Finding the answer span of a question in the context of"
    metric_names = ("f1", "exact_match", "loss")
    summary_keys = ("exact_match", "f1", "loss")
    data_formats = ("squad", "csv", "tsv", "jsonl", "parquet")
    data_keys = frozenset({"test_fraction"})
    auto_class, model_types, model_examples = ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
                                               "BERT, RoBERTa, DistilBERT")
    export_note = ("answers from start and end logits over windows of the context, which the export does not carry "
                   "yet")
    limitation = "- It always answers with a span of the context, also when the context holds no answer (SQuAD v1.1 style)."

    def __init__(self, tokenizer=None, max_length: int = 384, stride: int = 128, max_answer_length: int = 30):
        self.tokenizer, self.max_length, self.stride, self.max_answer_length = tokenizer, max_length, stride, max_answer_length

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        data, spec, window = recipe.data, recipe.task, recipe.model.max_length
        if data.format == "auto":
            data.format = "squad"
        if "stride" not in spec.model_fields_set:  # a quarter of the window: 96 of 384, as is usual for BERT
            spec.stride = max(1, window // 4)
        if spec.stride >= window // 2:
            raise ValueError(f"task.stride {spec.stride} must be less than half of model.max_length {window}: "
                             "consecutive windows share that many tokens, and each also holds the question")

    # ---------------------------------------------------------------- data

    @classmethod
    def read_split(cls, name: str, where: str, data_spec, notes: list[str], labelled: bool = True) -> Split:
        split, found = read_qa_split(name, where, require_answers=labelled)
        notes += found
        return split

    @classmethod
    def check_split(cls, split: Split, data_spec, notes: list[str], labelled: bool = True) -> list[str]:
        return [f"{split.name}: {split.source} has no examples"] if len(split) == 0 else []

    @classmethod
    def example_groups(cls, split: Split) -> tuple[list, str]:
        return [e.title for e in split.labels], "article"  # questions about one article share its paragraphs

    # ---------------------------------------------------------------- the model

    @classmethod
    def load_model(cls, model_spec, labels: list[str], image_spec, factory=None) -> LoadedModel:
        loaded = cls.load_text_model(model_spec)
        if not getattr(loaded.preprocessor, "is_fast", False):
            raise ModelError([f"model.name {model_spec.name!r}: task.type qa maps answers to characters with a fast "
                              "tokenizer's offsets, and this model's tokenizer is a slow one; save a tokenizer.json with "
                              "the model"])
        add_head_dropout(loaded.model, loaded.head_prefixes, model_spec.head_dropout)  # the new span head's input
        return loaded

    @classmethod
    def head_of(cls, model) -> list[str]:
        return hf_head_prefixes(model)

    # ---------------------------------------------------------------- one run, or one saved model

    @classmethod
    def for_run(cls, recipe: Recipe, data, preprocessor) -> QATask:
        return cls(text_tokenizer(preprocessor), recipe.model.max_length, recipe.task.stride, recipe.task.max_answer_length)

    @classmethod
    def from_info(cls, info, preprocessor) -> QATask:
        settings = cls.settings_of(info)
        return cls(text_tokenizer(preprocessor), info.max_length, settings.stride, settings.max_answer_length)

    def dataset(self, split: Split, targets: list, preprocessor, train: bool = False):
        return QADataset(split, preprocessor, self.max_length, self.stride)

    def compute_loss(self, model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        """transformers' QA loss: the mean of the start and end positions' cross-entropies."""
        return model(**inputs, start_positions=targets[:, 0], end_positions=targets[:, 1]).loss

    def evaluate(self, model, loader, accelerator) -> dict:
        model.eval()
        indices, windows = [], []  # per window: (start logits, end logits, loss)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for batch in loader:
                labels = batch["labels"]
                with accelerator.autocast():
                    outputs = model(**batch["inputs"])
                lengths = batch["inputs"]["attention_mask"].sum(1).tolist()  # padding is never an answer
                for start, end, (first, last), n in zip(outputs.start_logits.float(), outputs.end_logits.float(),
                                                        labels.tolist(), lengths):
                    start, end = start[:n].cpu(), end[:n].cpu()
                    # transformers' QA loss per window (the mean of the start and end cross-entropies), over the window's
                    # own tokens: the model's version also spreads probability over the batch's padding
                    loss = (float(-start.log_softmax(-1)[first]) + float(-end.log_softmax(-1)[last])) / 2
                    windows.append((start, end, loss))
                indices += batch["index"].tolist()
        by_index = gather_by_index(accelerator, indices, windows)
        order = sorted(by_index)
        dataset = loader.dataset
        found = best_answers([by_index[i][0] for i in order], [by_index[i][1] for i in order], dataset.features,
                             dataset.examples, self.max_answer_length)
        predictions = [answer["answer"] for answer in found]
        scores = squad_scores(predictions, dataset.references)
        return {**scores, "loss": sum(by_index[i][2] for i in order) / max(len(order), 1), "windows": len(order),
                "samples": [{"question": e.question, "prediction": p, "answers": r}
                            for e, p, r in zip(dataset.examples[:SAMPLES], predictions, dataset.references)]}

    def prepare_input(self, item, index: int, modality: str) -> dict:
        """{"question": ..., "context": ...}, or a [question, context] pair."""
        if is_pair(item):
            item = {"question": item[0], "context": item[1]}
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) and item[k].strip()
                                               for k in ("question", "context"))):
            raise DataError([f"input {index} must be {{\"question\": text, \"context\": text}} or a [question, context] "
                             "pair, both non-empty"])
        check_unicode([item["question"], item["context"]], index)
        return item

    def warm_up_input(self, modality: str):
        return {"question": "warm up?", "context": "warm up"}

    def is_single(self, inputs) -> bool:
        return not isinstance(inputs, (list, tuple)) or is_pair(inputs)

    def read_inputs(self, path: Path, data_spec) -> tuple[list, list[str]]:
        """SQuAD JSON, or a table with question and context columns."""
        if not path.is_file():
            raise DataError([f"{path} not found"])
        if path.suffix == ".json":
            examples, problems = read_squad(path)
            if problems:
                raise DataError(problems)
            return [{"question": e.question, "context": e.context} for e in examples], [e.id for e in examples]
        fmt = table_format(path, data_spec.format)
        frame = read_table(path, fmt, data_spec.columns, data_spec.encoding)
        absent = [c for c in ("question", "context") if c not in frame.columns]
        if absent:
            raise DataError([f"{path} has no column(s) {absent}; its columns are {listing(map(str, frame.columns))}"])
        rows = [f"{path.name}:{i + (2 if fmt in ('csv', 'tsv') else 1)}" for i in range(len(frame))]
        return [{"question": q, "context": c} for q, c in zip(frame["question"], frame["context"])], rows

    @classmethod
    def card_input(cls, info) -> str:
        return (f"a question and its context, in windows of {info.max_length} tokens overlapping by "
                f"{cls.settings_of(info).stride} (a long context is read whole, window by window)")

    @classmethod
    def card_head(cls, info) -> str:
        return "a new span head scoring each token as the answer's start and end"

    @classmethod
    def card_preparation(cls, info) -> str:
        return "the saved tokenizer, questions with their contexts"

    def predict(self, loaded, items: list) -> list[dict]:
        """Per {question, context}: the answer text, its character offsets in the context and its score."""
        examples = [QAExample(str(i), "", item["context"], item["question"], [], f"input {i}") for i, item in enumerate(items)]
        try:
            features = prepare_features(self.tokenizer, examples, self.max_length, self.stride)
        except ValueError as error:  # a question too long to leave the window room for context: the input's fault
            raise DataError([f"a question is too long for this model's windows ({error}); shorten it"]) from None
        starts, ends = [], []
        with torch.inference_mode():
            for first in range(0, len(features.input_ids), 16):
                rows = range(first, min(first + 16, len(features.input_ids)))
                batch = window_inputs(features, rows, self.tokenizer)
                outputs = loaded.model(**batch)
                lengths = batch["attention_mask"].sum(1).tolist()
                starts += [row[:n].float() for row, n in zip(outputs.start_logits, lengths)]
                ends += [row[:n].float() for row, n in zip(outputs.end_logits, lengths)]
        found = best_answers(starts, ends, features, examples, self.max_answer_length)
        return [{"answer": f["answer"], "start": f["start"], "end": f["end"], "score": f["score"],
                 "probability": f.get("probability")} for f in found]

    def csv_header(self) -> list[str]:
        return ["answer", "start", "end", "score"]

    def csv_row(self, prediction: dict) -> list:
        return [prediction["answer"], prediction["start"], prediction["end"], prediction["score"]]

