"""Tasks whose model writes text: seq2seq (translation, summarisation), image captioning and causal
language modelling. The model computes its own token loss from `labels` (padding and prompts are -100,
which it skips); evaluation generates and scores the text (seq2seq, captioning) or turns the mean token
loss into perplexity (causal_lm).

Perplexity is exp(total negative log-likelihood / number of predicted tokens) over the whole split: every
token counts once, whatever batch it sits in (a mean of per-batch perplexities would weigh short batches
more). With packing, a block's first token has no context and is not predicted; the other tokens see only
the context inside their block.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tuneforge.data.text_tasks import pad_id, pad_rows
from tuneforge.errors import DataError
from tuneforge.tasks.base import TaskBase, example_nll, gather_by_index, mean_token_loss
from tuneforge.tasks.text_metrics import generation_scores

SAMPLES = 5  # generated texts kept in eval.json beside their references, to read what the scores mean


class GenerationTask(TaskBase):
    """seq2seq and captioning: text generated with beam search, scored against the references."""

    summary_keys = ("bleu", "chrf", "rougeL", "meteor", "loss")

    def __init__(self, name: str, tokenizer=None, num_beams: int = 4, max_new_tokens: int = 64, source_prefix: str = "",
                 max_length: int = 128):
        self.name, self.tokenizer = name, tokenizer
        self.num_beams, self.max_new_tokens, self.source_prefix, self.max_length = (num_beams, max_new_tokens,
                                                                                     source_prefix, max_length)
        self.label_names: list[str] = []

    def compute_loss(self, model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        return model(**inputs, labels=targets).loss

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
        order = _one_per_input(sorted(by_index), getattr(loader.dataset, "paths", None))
        predictions = [by_index[i][0] for i in order]
        references = [loader.dataset.references[i] for i in order]
        return {**generation_scores(predictions, references), "loss": loss,
                "samples": [{"prediction": p, "references": r} for p, r in zip(predictions[:SAMPLES], references)]}

    def predict_items(self, loaded, items: list) -> list[dict]:
        """Generated text per source text (seq2seq) or image (captioning)."""
        if self.name == "captioning":
            processor = loaded.preprocessor.image_processor
            inputs = {"pixel_values": torch.cat([processor(image, return_tensors="pt")["pixel_values"] for image in items])}
        else:
            inputs = dict(self.tokenizer([self.source_prefix + text for text in items], truncation=True,
                                         max_length=self.max_length, padding=True, return_tensors="pt"))
            inputs.pop("token_type_ids", None)
        with torch.inference_mode():
            return [{"text": text} for text in self.generate(loaded.model, inputs)]

    def csv_header(self) -> list[str]:
        return ["text"]

    def csv_row(self, prediction: dict) -> list:
        return [prediction["text"]]


class CausalLMTask(TaskBase):
    """Language modelling: the next-token loss; judged by perplexity; predicts continuations of a prompt."""

    name = "causal_lm"
    summary_keys = ("perplexity", "loss")

    def __init__(self, tokenizer=None, num_beams: int = 1, max_new_tokens: int = 64, max_length: int = 128):
        self.tokenizer, self.num_beams, self.max_new_tokens, self.max_length = tokenizer, num_beams, max_new_tokens, max_length
        self.label_names: list[str] = []

    def compute_loss(self, model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
        return model(**inputs, labels=targets).loss

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

    def predict_items(self, loaded, items: list) -> list[dict]:
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

    def csv_header(self) -> list[str]:
        return ["text"]

    def csv_row(self, prediction: dict) -> list:
        return [prediction["text"]]


def _one_per_input(indices: list[int], inputs: list | None) -> list[int]:
    """Captioning has a row per (image, caption) and every caption of an image is a reference: score each image once."""
    if inputs is None:
        return indices
    seen, kept = set(), []
    for index in indices:
        if inputs[index] not in seen:
            seen.add(inputs[index])
            kept.append(index)
    return kept

