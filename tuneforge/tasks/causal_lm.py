"""Causal language modelling: the next-token loss, judged by perplexity; predicts continuations of a prompt.

Perplexity is exp(total negative log-likelihood / number of predicted tokens) over the whole split: every
token counts once, whatever batch it sits in (a mean of per-batch perplexities would weigh short batches
more). With packing, a block's first token has no context and is not predicted; the other tokens see only
the context inside their block.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from tuneforge.config import DataSpec, Recipe
from tuneforge.data.common import Split, check_texts
from tuneforge.data.tables import TABLES
from tuneforge.data.text import read_columns, read_lines
from tuneforge.data.text_datasets import CausalLMDataset
from tuneforge.data.tokens import pad_id, pad_rows, text_tokenizer
from tuneforge.errors import DataError
from tuneforge.limits import MAX_COUNT
from tuneforge.models.loading import LoadedModel
from tuneforge.tasks.base import example_nll, gather_by_index, mean_token_loss
from tuneforge.tasks.registry import register_task
from tuneforge.tasks.text import TextSpec, TextTask


class CausalLMSpec(TextSpec):
    num_beams: int = Field(4, ge=1, le=1000, description="beam search width when generating")
    max_new_tokens: int = Field(64, ge=1, le=MAX_COUNT, description="the most tokens one generation adds")
    packing: bool = Field(True, description="concatenate texts into blocks of model.max_length tokens (false: one "
                                            "text an example, padded)")


@register_task
class CausalLMTask(TextTask):
    """Language modelling: the next-token loss; judged by perplexity; predicts continuations of a prompt."""

    name = "causal_lm"
    Spec = CausalLMSpec
    description = "language model"
    purpose = "Continuing"
    metric_names = ("perplexity", "loss")
    lower_is_better = frozenset({"loss", "perplexity"})
    summary_keys = ("perplexity", "loss")
    data_formats = (*TABLES, "text")
    data_keys = frozenset({"prompt_column", "response_column", "test_fraction"})
    auto_class, model_types, model_examples = "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "GPT-2, Llama"
    export_note = "writes its text in a generation loop around the model, which the export does not carry yet"
    adds_head = False  # the pretrained language-model head
    head = "the pretrained language-model head (next-token prediction)"
    limitation = ("- Perplexity measures how well it predicts held-out text of the same kind, not whether what it "
                  "writes is true or safe.")

    def __init__(self, tokenizer=None, num_beams: int = 1, max_new_tokens: int = 64, max_length: int = 128,
                 packing: bool = True, instruction: bool = False):
        self.tokenizer, self.num_beams, self.max_new_tokens, self.max_length = tokenizer, num_beams, max_new_tokens, max_length
        self.packing, self.instruction = packing, instruction  # instruction: prompt + response, the loss on the response

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        data = recipe.data
        if (data.prompt_column is None) != (data.response_column is None):
            raise ValueError("the instruction format needs both data.prompt_column and data.response_column")

    @classmethod
    def read_split(cls, name: str, where: str, data_spec, notes: list[str], labelled: bool = True) -> Split:
        # .txt is one text a line; so are prompts to continue from a .txt file, whatever the training data was
        text_file = Path(where).suffix == ".txt" and (data_spec.format == "auto" or not labelled)
        if data_spec.format == "text" or text_file:
            return read_lines(name, where, data_spec)
        if data_spec.prompt_column:
            wanted = {data_spec.prompt_column: "the prompt", **({data_spec.response_column: "the response"} if labelled else {})}
            columns, rows, problems = read_columns(name, where, data_spec, wanted)
            if problems:
                return Split(name, where, [], [], texts=[], problems=problems)
            responses = columns[data_spec.response_column] if labelled else [None] * len(rows)
            return Split(name, where, responses, rows, texts=columns[data_spec.prompt_column])
        columns, rows, problems = read_columns(name, where, data_spec, {data_spec.text_column: "the text"})
        if problems:
            return Split(name, where, [], [], texts=[], problems=problems)
        return Split(name, where, [None] * len(rows), rows, texts=columns[data_spec.text_column])

    @classmethod
    def check_split(cls, split: Split, data_spec, notes: list[str], labelled: bool = True) -> list[str]:
        problems = super().check_split(split, data_spec, notes, labelled)
        if labelled and len(split) and data_spec.response_column:
            problems += check_texts(split, data_spec.response_column, split.labels)
        return problems

    @classmethod
    def input_column(cls, data_spec) -> str:
        return data_spec.prompt_column or data_spec.text_column

    @classmethod
    def for_run(cls, recipe: Recipe, data, preprocessor) -> CausalLMTask:
        return cls(text_tokenizer(preprocessor), max_length=recipe.model.max_length,
                   instruction=recipe.data.prompt_column is not None, **cls.settings(recipe))

    @classmethod
    def from_info(cls, info, preprocessor) -> CausalLMTask:
        settings = cls.saved_settings(info)
        instruction = DataSpec(**info.data).prompt_column is not None
        return cls(text_tokenizer(preprocessor), max_length=info.max_length, instruction=instruction, **settings)

    def dataset(self, split: Split, targets: list, preprocessor, train: bool = False):
        return CausalLMDataset(split, preprocessor, self.max_length, self.packing, self.instruction)

    def evaluate(self, model, loader, accelerator) -> dict:
        model.eval()
        indices, results = [], []
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for batch in loader:
                with accelerator.autocast():
                    logits = model(**batch["inputs"]).logits
                results += example_nll(logits, batch["labels"], shift=True)
                indices += batch["index"].tolist()
        loss, tokens = mean_token_loss(gather_by_index(accelerator, indices, results).values())
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss, "tokens": tokens}

    def predict(self, loaded: LoadedModel, items: list) -> list[dict]:
        """The prompt's continuation (only the new text), left-padded so every prompt ends where generation starts;
        a prompt longer than max_length keeps its last tokens, the ones the continuation follows."""
        tokenizer = self.tokenizer
        rows = [np.asarray(ids[-self.max_length:], dtype=np.int64) for ids in tokenizer(list(items))["input_ids"]]
        empty = [i for i, row in enumerate(rows) if not len(row)]
        if empty:  # nothing to continue from: generate() would fail on a prompt of no tokens
            raise DataError([f"input {i} has no tokens to continue; give a non-empty prompt" for i in empty])
        inputs = {"input_ids": pad_rows(rows, pad_id(tokenizer), left=True),
                  "attention_mask": pad_rows([np.ones(len(row), dtype=np.int64) for row in rows], 0, left=True)}
        with torch.inference_mode():
            generated = loaded.model.generate(**inputs, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                                              pad_token_id=pad_id(tokenizer))
        new = generated[:, inputs["input_ids"].shape[1]:]
        return [{"text": text} for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
