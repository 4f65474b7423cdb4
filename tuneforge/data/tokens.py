"""Token rows: tokenising texts once (overlong ones cut and counted), and padding rows into batches."""

from __future__ import annotations

import numpy as np
import torch

from tuneforge.data.common import rows_listing

IGNORE = -100  # label positions the loss skips (padding, prompts): transformers' convention


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    """Targets end in the end-of-sequence token, so generation learns to stop (GPT-2's tokenizer adds none)."""
    return ids if eos is None or (ids and ids[-1] == eos) else [*ids, eos]


def tokenise(tokenizer, texts: list[str], limit: int, what: str, rows: list[str], notes: list[str],
              target: bool = False, eos: int | None = None) -> list[np.ndarray]:
    """Token ids per text, cut to `limit` tokens; overlong texts are counted in a note, never an error."""
    encoded = tokenizer(text_target=texts) if target else tokenizer(texts)
    ids = [with_eos(list(row), eos) for row in encoded["input_ids"]]
    long = [i for i, row in enumerate(ids) if len(row) > limit]
    if long:
        notes.append(f"{len(long)} {what} longer than {limit} tokens were cut to {limit} ({rows_listing([rows[i] for i in long])})")
        # Keep the final special token (end of sequence / [SEP]) where the tokenizer put one.
        specials = set(tokenizer.all_special_ids)
        ids = [row if len(row) <= limit else row[:limit - 1] + [row[-1]] if row[-1] in specials else row[:limit]
               for row in ids]
    return [np.asarray(row, dtype=np.int64) for row in ids]


def pad_rows(rows: list[np.ndarray], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        if left:
            out[i, width - len(row):] = row
        else:
            out[i, :len(row)] = row
    return torch.from_numpy(out)


def token_batch(ids: list[np.ndarray], labels: list[np.ndarray], indices: list[int], pad: int) -> dict:
    """A batch of token rows padded to the longest: padding masked out of attention, -100 in the labels."""
    return {"inputs": {"input_ids": pad_rows(ids, pad), "attention_mask": pad_rows([np.ones(len(row), dtype=np.int64) for row in ids], 0)},
            "labels": pad_rows(labels, IGNORE), "index": torch.tensor(indices)}


def pad_id(tokenizer) -> int:
    """The id input padding uses (GPT-2 has no pad token: its end-of-text token, masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def text_tokenizer(preprocessor):
    """The tokenizer inside a preprocessor (captioning's is a pair of image processor and tokenizer)."""
    return getattr(preprocessor, "tokenizer", preprocessor)


def window_inputs(features, rows, tokenizer) -> dict[str, torch.Tensor]:
    """Model inputs for some QA windows, padded to the longest."""
    inputs = {"input_ids": pad_rows([np.asarray(features.input_ids[i]) for i in rows], pad_id(tokenizer)),
              "attention_mask": pad_rows([np.asarray(features.attention_mask[i]) for i in rows], 0)}
    if features.token_type_ids is not None:
        inputs["token_type_ids"] = pad_rows([np.asarray(features.token_type_ids[i]) for i in rows], 0)
    return inputs
