"""Data of the tasks that have no classes: seq2seq (source -> target text), captioning (image -> text),
causal language modelling (text, or prompt + response) and extractive question answering.

Reading and checking follow the classification path's rules: every problem of every split is
reported at once, with the file, the row and the fix, before a model is loaded. Each split is a
`Split` whose `texts` are the inputs and whose `labels` are what the model must produce (target
texts, captions, responses, or `QAExample`s).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tuneforge.data.loaders import load_rgb
from tuneforge.data.preflight import TaskData, _check_images, _check_texts, _listing, _missing, _sample
from tuneforge.data.sources import Split, not_text, read_table
from tuneforge.errors import DataError, RecipeError, listing

IGNORE = -100  # label positions the loss skips (padding, prompts): transformers' convention


# ---------------------------------------------------------------- reading

def _open_lines(path: Path, encoding: str) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding) as file:
        return file.read().splitlines()


def _decodes(path: Path, encoding: str) -> bool:
    try:
        _open_lines(path, encoding)
    except UnicodeDecodeError:
        return False
    return True


def _language_file(stem: str, language: str) -> Path:
    for candidate in (Path(f"{stem}.{language}"), Path(f"{stem}.{language}.gz")):
        if candidate.is_file():
            return candidate
    return Path(f"{stem}.{language}")


def read_parallel(name: str, stem: str, spec) -> Split:
    """Aligned line files: line i of <stem>.<source> translates to line i of <stem>.<target>."""
    source, target = _language_file(stem, spec.source_language), _language_file(stem, spec.target_language)
    missing = [str(p) for p in (source, target) if not p.is_file()]
    if missing:
        return Split(name, stem, [], [], texts=[], problems=[f"{name}: {', '.join(missing)} not found (data.{name} is the "
                                                             "stem; files <stem>.<language> or <stem>.<language>.gz)"])
    try:
        sources, targets = _open_lines(source, spec.encoding), _open_lines(target, spec.encoding)
    except UnicodeDecodeError:
        bad = next(p for p in (source, target) if not _decodes(p, spec.encoding))
        return Split(name, stem, [], [], texts=[], problems=[not_text(name, bad, spec.encoding)])
    problems = []
    if len(sources) != len(targets):
        problems.append(f"{name}: {source} has {len(sources)} lines but {target} has {len(targets)}; aligned files "
                        "need one line per sentence pair")
    rows = [f"{source.name}:{i + 1}" for i in range(len(sources))]
    return Split(name, f"{source} + {target}", targets[:len(sources)], rows, texts=sources, problems=problems)


def _column(frame, column: str, name: str, path: Path, what: str) -> tuple[list, list[str]]:
    if column not in frame.columns:
        return [], [f"{name}: {path} has no column '{column}' ({what}); its columns are {listing(map(str, frame.columns))}"]
    return [None if _missing(v) else v for v in frame[column].tolist()], []


def read_text_task_split(name: str, where: str, spec, kind: str) -> Split:
    """One split of seq2seq, captioning or causal_lm data (qa: read_qa_split)."""
    if spec.format == "parallel":
        return read_parallel(name, where, spec)
    path = Path(where)
    if not path.is_file():
        return Split(name, where, [], [], texts=[], problems=[f"{name}: file {where} not found"])
    if spec.format == "text" or (spec.format == "auto" and path.suffix == ".txt" and kind == "causal_lm"):
        try:
            lines = _open_lines(path, spec.encoding)
        except UnicodeDecodeError:
            return Split(name, where, [], [], texts=[], problems=[not_text(name, path, spec.encoding)])
        kept = [(i, line) for i, line in enumerate(lines) if line.strip()]  # blank lines separate, they are not texts
        return Split(name, where, [None] * len(kept), [f"{path.name}:{i + 1}" for i, _ in kept],
                     texts=[line for _, line in kept])
    fmt = spec.format if spec.format != "auto" else {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}.get(
        path.suffix.lower(), "jsonl")
    try:
        frame = read_table(path, fmt, spec.columns, spec.encoding)
    except UnicodeDecodeError:
        return Split(name, where, [], [], texts=[], problems=[not_text(name, path, spec.encoding)])
    except Exception as error:  # pandas raises many kinds for a malformed file
        return Split(name, where, [], [], texts=[], problems=[f"{name}: cannot read {where} as {fmt} ({error})"])
    first_row = 2 if fmt in ("csv", "tsv") and not spec.columns else 1  # the file's own line numbers
    rows = [f"{path.name}:{i + first_row}" for i in range(len(frame))]
    if kind == "captioning":
        images, problems = _column(frame, spec.image_column, name, path, "the image file")
        captions, more = _column(frame, spec.target_column, name, path, "the caption")
        if problems or more:
            return Split(name, where, [], [], image_paths=[], problems=problems + more)
        root = Path(spec.image_root) if spec.image_root else path.parent
        paths = [None if image is None else root / str(image) for image in images]
        return Split(name, where, captions, rows, image_paths=paths)
    if kind == "causal_lm" and spec.prompt_column:
        prompts, problems = _column(frame, spec.prompt_column, name, path, "the prompt")
        responses, more = _column(frame, spec.response_column, name, path, "the response")
        return Split(name, where, responses, rows, texts=prompts, problems=problems + more)
    texts, problems = _column(frame, spec.text_column, name, path, "the source text" if kind == "seq2seq" else "the text")
    if kind == "seq2seq":
        targets, more = _column(frame, spec.target_column, name, path, "the target text")
        return Split(name, where, targets, rows, texts=texts, problems=problems + more)
    return Split(name, where, [None] * len(texts), rows, texts=texts, problems=problems)


def read_qa_split(name: str, where: str, require_answers: bool) -> tuple[Split, list[str]]:
    """A SQuAD-format file as a Split: questions as texts, contexts as pairs, QAExamples as labels."""
    from tuneforge.data.qa import check_examples, read_squad

    examples, problems = read_squad(where)
    split = Split(name, where, examples, [e.where for e in examples], texts=[e.question for e in examples],
                  text_pairs=[e.context for e in examples], problems=problems)
    if problems:
        return split, []
    problems, notes = check_examples(examples, name, require_answers)
    split.problems = problems
    return split, notes


# ---------------------------------------------------------------- checking

def _carve(split: Split, fraction: float, seed: int, name: str, kind: str) -> tuple[Split, Split]:
    """Hold out `fraction` of a split: whole articles for qa (no context in both parts), whole images for
    captioning (all of an image's captions on one side), rows otherwise."""
    if kind in ("qa", "captioning"):
        from tuneforge.data.qa import split_by_article

        groups = [e.title for e in split.labels] if kind == "qa" else [str(p) for p in split.image_paths]
        try:
            kept, held = split_by_article(list(range(len(split))), fraction, seed, key=groups.__getitem__)
        except ValueError as error:  # a single article (or image): nothing to hold out without sharing it
            what = "article" if kind == "qa" else "image"
            raise DataError([f"{split.name}: cannot hold out a {name} split by whole {what}s ({error}); give "
                             f"data.{name} as a file instead"]) from None
        parts = split.select(kept), split.select(held)
    else:
        order = np.random.default_rng(seed).permutation(len(split)).tolist()
        cut = max(1, int(round(fraction * len(split))))
        parts = split.select(sorted(order[cut:])), split.select(sorted(order[:cut]))
    parts[1].name = name
    return parts


def load_text_task_data(data_spec, task_spec) -> TaskData:
    """Read, carve and check the splits of a seq2seq, qa, captioning or causal_lm recipe."""
    kind, problems, notes = task_spec.type, [], []
    if not data_spec.train:
        raise DataError(["data.train is not set: give the training file"])
    locations = {"train": data_spec.train, "validation": data_spec.validation, "test": data_spec.test}
    splits = {}
    for name, where in locations.items():
        if not where:
            continue
        if kind == "qa":
            splits[name], found = read_qa_split(name, where, require_answers=True)
            notes += found
        else:
            splits[name] = read_text_task_split(name, where, data_spec, kind)
        problems += splits[name].problems
    if problems:
        raise DataError(problems)
    if data_spec.test_fraction:
        if "test" in splits:
            raise DataError(["give data.test or data.test_fraction, not both"])
        splits["train"], splits["test"] = _carve(splits["train"], data_spec.test_fraction, data_spec.split_seed, "test", kind)
    if data_spec.validation_fraction:
        splits["train"], splits["validation"] = _carve(splits["train"], data_spec.validation_fraction,
                                                       data_spec.split_seed, "validation", kind)
    splits["train"] = _sample(splits["train"], data_spec.max_train_examples, data_spec.split_seed)
    if "validation" in splits:
        splits["validation"] = _sample(splits["validation"], data_spec.max_validation_examples, data_spec.split_seed)
    for split in splits.values():
        problems += check_text_task_split(split, data_spec, kind, notes)
    if problems:
        raise DataError(problems)
    return TaskData(splits, [], [], "image" if kind == "captioning" else "text", notes, kind)


def check_text_task_split(split: Split, spec, kind: str, notes: list[str]) -> list[str]:
    """Empty sources, targets, captions, prompts or responses; missing or unreadable images; no rows."""
    problems = []
    if len(split) == 0:
        return [f"{split.name}: {split.source} has no examples"]
    if kind == "captioning":
        problems += _check_images(split, spec.skip_unreadable_images, notes)
        problems += _check_texts(split, spec.target_column, split.labels)
    elif kind == "seq2seq":
        problems += _check_texts(split, "source" if spec.format == "parallel" else spec.text_column, split.texts)
        problems += _check_texts(split, "target" if spec.format == "parallel" else spec.target_column, split.labels)
    elif kind == "causal_lm":
        problems += _check_texts(split, spec.prompt_column or spec.text_column, split.texts)
        if spec.response_column:
            problems += _check_texts(split, spec.response_column, split.labels)
    return problems


# ---------------------------------------------------------------- tokenising

def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    """Targets end in the end-of-sequence token, so generation learns to stop (GPT-2's tokenizer adds none)."""
    return ids if eos is None or (ids and ids[-1] == eos) else [*ids, eos]


def _tokenise(tokenizer, texts: list[str], limit: int, what: str, rows: list[str], notes: list[str],
              target: bool = False, eos: int | None = None) -> list[np.ndarray]:
    """Token ids per text, cut to `limit` tokens; overlong texts are counted in a note, never an error."""
    encoded = tokenizer(text_target=texts) if target else tokenizer(texts)
    ids = [_with_eos(list(row), eos) for row in encoded["input_ids"]]
    long = [i for i, row in enumerate(ids) if len(row) > limit]
    if long:
        notes.append(f"{len(long)} {what} longer than {limit} tokens were cut to {limit} ({_listing([rows[i] for i in long])})")
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


class Seq2SeqDataset(Dataset):
    """Source ids and target ids per pair; the targets' padding becomes -100 so the loss skips it.
    `references` are the raw target texts (captioning: every caption of the same image), for the metrics."""

    def __init__(self, split: Split, tokenizer, max_length: int, max_target_length: int, prefix: str = ""):
        self.notes: list[str] = []
        self.tokenizer = tokenizer
        self.sources = _tokenise(tokenizer, [prefix + str(t) for t in split.texts], max_length, f"{split.name} sources",
                                 split.rows, self.notes)
        self.targets = _tokenise(tokenizer, [str(t) for t in split.labels], max_target_length, f"{split.name} targets",
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


class CaptionDataset(Dataset):
    """Images decoded per batch, captions tokenised once; every caption of an image is a reference for it."""

    decodes_images = True

    def __init__(self, split: Split, processor, max_target_length: int):
        self.notes: list[str] = []
        self.paths, self.image_processor, self.tokenizer = split.image_paths, processor.image_processor, processor.tokenizer
        self.targets = _tokenise(self.tokenizer, [str(t) for t in split.labels], max_target_length,
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


class CausalLMDataset(Dataset):
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
            ids = [list(p) + _with_eos(list(r), eos) for p, r in zip(prompts, responses)]
            labels = [[IGNORE] * len(p) + _with_eos(list(r), eos) for p, r in zip(prompts, responses)]
        else:
            ids = [_with_eos(list(row), eos) for row in tokenizer([str(t) for t in split.texts])["input_ids"]]
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
                                  f"{max_length} ({_listing([split.rows[i] for i in long])})")
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


class QADataset(Dataset):
    """One example a window of question + context; labels are (start, end) token positions, or (0, 0) (the [CLS]
    position) for a window that does not hold the answer."""

    def __init__(self, split: Split, tokenizer, max_length: int, stride: int):
        from tuneforge.data.qa import MAX_QUESTION_TOKENS, prepare_features

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


def window_inputs(features, rows, tokenizer) -> dict[str, torch.Tensor]:
    """Model inputs for some QA windows, padded to the longest."""
    inputs = {"input_ids": pad_rows([np.asarray(features.input_ids[i]) for i in rows], pad_id(tokenizer)),
              "attention_mask": pad_rows([np.asarray(features.attention_mask[i]) for i in rows], 0)}
    if features.token_type_ids is not None:
        inputs["token_type_ids"] = pad_rows([np.asarray(features.token_type_ids[i]) for i in rows], 0)
    return inputs


def make_text_task_dataset(split: Split, kind: str, preprocessor, recipe) -> Dataset:
    task, max_length = recipe.task, recipe.model.max_length
    if kind == "seq2seq":
        return Seq2SeqDataset(split, preprocessor, max_length, task.max_target_length, task.source_prefix)
    if kind == "captioning":
        return CaptionDataset(split, preprocessor, task.max_target_length)
    if kind == "causal_lm":
        return CausalLMDataset(split, preprocessor, max_length, task.packing, recipe.data.prompt_column is not None)
    return QADataset(split, preprocessor, max_length, task.stride)
