"""Datasets of the text tasks: token rows made once, padded per batch; images decoded per batch."""

from __future__ import annotations

import numpy as np
import torch

from tuneforge.data.common import Split, rows_listing
from tuneforge.data.datasets import ExampleDataset, load_rgb
from tuneforge.data.qa import MAX_QUESTION_TOKENS, prepare_features
from tuneforge.data.tokens import IGNORE, pad_id, pad_rows, token_batch, tokenise, window_inputs, with_eos
from tuneforge.errors import RecipeError


class Seq2SeqDataset(ExampleDataset):
    """Source ids and target ids per pair; the targets' padding becomes -100 so the loss skips it.
    `references` are the raw target texts (captioning: every caption of the same image), for the metrics."""

    def __init__(self, split: Split, tokenizer, max_length: int, max_target_length: int, prefix: str = ""):
        self.notes: list[str] = []
        self.tokenizer = tokenizer
        self.sources = tokenise(tokenizer, [prefix + str(t) for t in split.texts], max_length, f"{split.name} sources",
                                 split.rows, self.notes)
        self.targets = tokenise(tokenizer, [str(t) for t in split.labels], max_target_length, f"{split.name} targets",
                                 split.rows, self.notes, target=True, eos=tokenizer.eos_token_id)
        self.references = [[str(t)] for t in split.labels]

    def __len__(self) -> int:
        return len(self.sources)

    def lengths(self) -> list[int]:
        return [len(s) for s in self.sources]

    def __getitem__(self, index: int) -> dict:
        return {"source": self.sources[index], "target": self.targets[index], "index": index}

    def collate(self, items: list[dict]) -> dict:
        return token_batch([item["source"] for item in items], [item["target"] for item in items],
                           [item["index"] for item in items], pad_id(self.tokenizer))


class CaptionDataset(ExampleDataset):
    """Images decoded per batch, captions tokenised once; every caption of an image is a reference for it."""

    decodes_images = True

    def __init__(self, split: Split, processor, max_target_length: int):
        self.notes: list[str] = []
        self.paths, self.image_processor, self.tokenizer = split.image_paths, processor.image_processor, processor.tokenizer
        self.targets = tokenise(self.tokenizer, [str(t) for t in split.labels], max_target_length,
                                 f"{split.name} captions", split.rows, self.notes, eos=self.tokenizer.eos_token_id)
        captions: dict = {}
        for path, caption in zip(self.paths, split.labels):
            captions.setdefault(path, []).append(str(caption))
        self.references = [captions[path] for path in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        pixels = self.image_processor(load_rgb(self.paths[index]), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "target": self.targets[index], "index": index}

    def collate(self, items: list[dict]) -> dict:
        return {"inputs": {"pixel_values": torch.stack([item["pixel_values"] for item in items])},
                "labels": pad_rows([item["target"] for item in items], IGNORE),
                "index": torch.tensor([item["index"] for item in items])}


class CausalLMDataset(ExampleDataset):
    """Texts (or prompt + response pairs, the loss on the response only) as token rows.

    packing: every text's tokens, each ending in the end-of-text token, are concatenated and cut into
    blocks of `max_length` (no padding at all; a block may span two texts, as in GPT-2's own training).
    Otherwise each text is one example, cut to `max_length` (counted) and padded per batch."""

    def __init__(self, split: Split, tokenizer, max_length: int, packing: bool, instruction: bool):
        self.notes: list[str] = []
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if instruction:  # prompt tokens are context, not something to learn: their labels are IGNORE
            prompts = tokenizer([str(t) for t in split.texts], add_special_tokens=True)["input_ids"]
            responses = tokenizer([str(t) for t in split.labels], add_special_tokens=False)["input_ids"]
            ids = [list(p) + with_eos(list(r), eos) for p, r in zip(prompts, responses)]
            labels = [[IGNORE] * len(p) + with_eos(list(r), eos) for p, r in zip(prompts, responses)]
        else:
            ids = [with_eos(list(row), eos) for row in tokenizer([str(t) for t in split.texts])["input_ids"]]
            labels = [list(row) for row in ids]
        if packing:
            flat_ids, flat_labels = np.concatenate(ids), np.concatenate(labels)
            blocks = max(1, len(flat_ids) // max_length)  # the tail shorter than a block is left out
            if len(flat_ids) < max_length:
                self.notes.append(f"{split.name}: all {len(flat_ids)} tokens make less than one block of {max_length}")
            self.ids = [flat_ids[i * max_length:(i + 1) * max_length] for i in range(blocks)]
            self.labels = [flat_labels[i * max_length:(i + 1) * max_length] for i in range(blocks)]
        else:
            long = [i for i, row in enumerate(ids) if len(row) > max_length]
            if long:
                self.notes.append(f"{len(long)} {split.name} texts longer than {max_length} tokens were cut to "
                                  f"{max_length} ({rows_listing([split.rows[i] for i in long])})")
            self.ids = [np.asarray(row[:max_length], dtype=np.int64) for row in ids]
            self.labels = [np.asarray(row[:max_length], dtype=np.int64) for row in labels]

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        return [len(row) for row in self.ids]

    def __getitem__(self, index: int) -> dict:
        return {"ids": self.ids[index], "labels": self.labels[index], "index": index}

    def collate(self, items: list[dict]) -> dict:
        # Labels are the inputs themselves; the model shifts them by one to predict each next token.
        return token_batch([item["ids"] for item in items], [item["labels"] for item in items],
                           [item["index"] for item in items], pad_id(self.tokenizer))


class QADataset(ExampleDataset):
    """One example a window of question + context; labels are (start, end) token positions, or (0, 0) (the [CLS]
    position) for a window that does not hold the answer."""

    def __init__(self, split: Split, tokenizer, max_length: int, stride: int):
        self.examples, self.tokenizer = split.labels, tokenizer
        try:
            self.features = prepare_features(tokenizer, self.examples, max_length, stride)
        except ValueError as error:  # a window with no room beside the stride: the recipe's numbers, not a crash
            raise RecipeError([f"task.stride {stride} with model.max_length {max_length} ({split.name}): {error}"]) from None
        self.notes = ([f"{split.name}: {self.features.truncated_questions} question(s) longer than {MAX_QUESTION_TOKENS} "
                       "tokens were cut"]
                      if self.features.truncated_questions else [])
        self.references = [[text for text, _ in example.answers] for example in self.examples]

    def __len__(self) -> int:
        return len(self.features.input_ids)

    def lengths(self) -> list[int]:
        return [len(row) for row in self.features.input_ids]

    def __getitem__(self, index: int) -> dict:
        return {"index": index}

    def collate(self, items: list[dict]) -> dict:
        f, rows = self.features, [item["index"] for item in items]
        return {"inputs": window_inputs(f, rows, self.tokenizer),
                "labels": torch.tensor([[f.start_positions[i], f.end_positions[i]] for i in rows]),
                "index": torch.tensor(rows)}
