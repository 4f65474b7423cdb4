"""Extractive question answering, the data side: read SQuAD-style files, check them, split them by
article, turn (question, context) pairs into model windows with answer token positions, and turn the
model's start/end logits back into answer text.

The model sees "[CLS] question [SEP] context [SEP]" and predicts, for every token, how likely the answer
starts and ends there. Contexts longer than the window are cut into several overlapping windows, so an
answer near a cut is whole in at least one of them; at prediction time the best span over all of an
example's windows wins. Character offsets link tokens back to the context, so answers are always
returned as exact slices of the original text, never as detokenised strings.

Problems are collected, not raised one at a time: each message names the file or split, where the
offending questions are (a few shown, then "and N more"), how many there are, and how to fix them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.data.common import split_by_group

SHOWN = 5  # how many offending questions a message lists before summarising
MAX_QUESTION_TOKENS = 64  # longer questions are cut, so every window keeps room for context


@dataclass
class QAExample:
    id: str
    title: str  # the article: splits are made by article so no context leaks between train and test
    context: str
    question: str
    answers: list[tuple[str, int]]  # (text, answer_start as a character offset into context); the first is the target
    where: str  # location for messages, e.g. "xquad.en.json: data[3].paragraphs[2].qas[5] (id 56beb...)"


@dataclass
class QAFeatures:
    """One row per window. Windows are not padded: a collator pads each batch (tokenizer.pad)."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    token_type_ids: list[list[int]] | None  # None for tokenizers without segment ids (RoBERTa, ...)
    start_positions: list[int]  # token index of the answer start in this window; 0 ([CLS]) when it is not inside
    end_positions: list[int]
    example_index: list[int]  # which example each window came from
    offsets: list[list[tuple[int, int] | None]]  # per token: its (start, end) characters in the context; None elsewhere
    truncated_questions: int  # questions cut to max_question_length (count, for a warning)

    def __len__(self) -> int:
        return len(self.input_ids)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


# ---------------------------------------------------------------- reading


def read_squad(path) -> tuple[list[QAExample], list[str]]:
    """Examples and problems (problems: file not found / not JSON / not SQuAD-shaped, with the fix).

    Malformed entries are reported and left out; the well-formed rest is still returned, so one run shows
    every problem. An article without a title is grouped under "data[i]" (it is still one article)."""
    path = Path(path)
    if not path.is_file():
        return [], [f"{path}: file not found; give the path of a SQuAD-format JSON file"]
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        return [], [f"{path}: not UTF-8 text ({error}); save the file as UTF-8 JSON"]
    except json.JSONDecodeError as error:
        return [], [f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                    "fix the file or give a SQuAD-format JSON file"]
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return [], [f"{path}: not SQuAD-shaped: expected an object with a \"data\" list of articles "
                    '({"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}); convert the file to that format']
    examples: list[QAExample] = []
    faults: dict[str, list[str]] = defaultdict(list)  # what is wrong -> where
    for a, article in enumerate(document["data"]):
        _read_article(path.name, a, article, examples, faults)
    problems = [f"{path}: {len(places)} {what} at {_listing(places)}" for what, places in faults.items()]
    if not examples and not problems:
        problems.append(f"{path}: no questions found; the \"data\" list holds no article with questions")
    return examples, problems


def _read_article(name: str, a: int, article, examples: list[QAExample], faults: dict[str, list[str]]) -> None:
    here = f"{name}: data[{a}]"
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
        faults["article(s) without a \"paragraphs\" list; each article needs {\"title\", \"paragraphs\": [...]}"].append(here)
        return
    title = article.get("title")
    title = str(title) if title not in (None, "") else f"data[{a}]"
    for p, paragraph in enumerate(article["paragraphs"]):
        where = f"{here}.paragraphs[{p}]"
        if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str) \
                or not isinstance(paragraph.get("qas"), list):
            faults["paragraph(s) without a \"context\" string and a \"qas\" list; add them"].append(where)
            continue
        for q, qa in enumerate(paragraph["qas"]):
            example = _read_question(f"{where}.qas[{q}]", title, paragraph["context"], qa, faults)
            if example is not None:
                examples.append(example)


def _read_question(where: str, title: str, context: str, qa, faults: dict[str, list[str]]) -> QAExample | None:
    if not isinstance(qa, dict) or "id" not in qa or not isinstance(qa.get("question"), str):
        faults["question(s) without an \"id\" and a \"question\" string; add them"].append(where)
        return None
    where = f"{where} (id {qa['id']})"
    answers = []
    for answer in qa.get("answers") or []:  # SQuAD 2.0 unanswerable questions have an empty list
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        # bool is an int in Python, but true/false as an offset is a mistake
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str) \
                or not isinstance(start, int) or isinstance(start, bool):
            faults["answer(s) that are not {\"text\": string, \"answer_start\": integer}; fix them"].append(where)
            return None
        answers.append((answer["text"], start))
    return QAExample(str(qa["id"]), title, context, qa["question"], answers, where)


# ---------------------------------------------------------------- checking


def check_examples(examples, split_name: str, require_answers: bool) -> tuple[list[str], list[str]]:
    """(problems, notes). Problems, one line each with counts, where, and the fix: empty context or question,
    empty answer text, answer_start outside the context, answer text not found at answer_start (showing what
    is there instead), duplicate ids, and with require_answers questions without an answer.
    Notes: questions with several answers (the first is the training target) and unanswered ones when allowed."""
    problems, notes = [], []

    def report(bad: list[str], what: str, fix: str) -> None:
        if bad:
            problems.append(f"{split_name}: {len(bad)} {what} at {_listing(bad)}; {fix}")

    report([e.where for e in examples if not e.context.strip()], "empty context(s)", "fill or remove those paragraphs")
    report([e.where for e in examples if not e.question.strip()], "empty question(s)", "fill or remove those questions")
    report([e.where for e in examples for text, _ in e.answers if not text.strip()], "empty answer text(s)",
           "fill in the answer text or remove the answer")
    outside = [f"{e.where} (answer_start {start}, {len(text)} characters, context {len(e.context)})"
               for e in examples for text, start in e.answers if text.strip() and not _inside(e.context, text, start)]
    report(outside, "answer(s) that do not fit inside the context", "correct answer_start (a character offset into the context)")
    misaligned = [_misalignment(e, text, start) for e in examples for text, start in e.answers
                  if text.strip() and _inside(e.context, text, start) and e.context[start:start + len(text)] != text]
    report(misaligned, "answer(s) whose text is not at answer_start",
           "correct answer_start to the character offset where the answer text begins in the context")

    counts: dict[str, int] = defaultdict(int)
    for example in examples:
        counts[example.id] += 1
    duplicated = [e.where for e in examples if counts[e.id] > 1]
    report(duplicated, "question(s) sharing an id with another", "give every question its own id (predictions are matched by id)")

    unanswered = [e.where for e in examples if not e.answers]
    if require_answers:
        report(unanswered, "question(s) without an answer", "add an answer or remove those questions (training needs a target)")
    elif unanswered:
        notes.append(f"{split_name}: {len(unanswered)} question(s) without an answer (only predictions can be made for them)")
    several = [e for e in examples if len(e.answers) > 1]
    if several:
        notes.append(f"{split_name}: {len(several)} question(s) have several answers; the first is the training target, "
                     "all count when scoring")
    if not examples:
        problems.append(f"{split_name}: no questions")
    return problems, notes


def _inside(context: str, text: str, start: int) -> bool:
    return 0 <= start and start + len(text) <= len(context)


def _misalignment(example: QAExample, text: str, start: int) -> str:
    found = example.context[start:start + len(text)]
    elsewhere = example.context.find(text)  # the likely intended offset, which makes the fix concrete
    hint = f"; the text occurs at {elsewhere}" if elsewhere >= 0 else "; the text does not occur in the context"
    return f"{example.where}: expected {text!r} at {start}, found {found!r}{hint}"


# ---------------------------------------------------------------- splitting


def split_by_article(examples, fraction: float, seed: int, key=lambda example: example.title) -> tuple[list, list]:
    """(kept, held_out): whole articles (titles) go to held_out until it holds >= fraction of the examples.
    Questions about one article share its paragraphs, so splitting by question would let the model see a
    held-out context in training (common.split_by_group: the seeded order, both parts in file order)."""
    return split_by_group(examples, fraction, seed, key, word="article")


# ---------------------------------------------------------------- features


def prepare_features(tokenizer, examples, max_length: int, stride: int,
                     max_question_length: int = MAX_QUESTION_TOKENS) -> QAFeatures:
    """Tokenize (question, context) pairs into windows of at most max_length tokens.

    With a right-padding tokenizer (nearly all) the question goes first and the context second
    (truncation "only_second"); a left-padding one gets the context first ("only_first"), so padding never
    lands between the two. A context longer than the window becomes several windows, consecutive ones sharing
    `stride` context tokens. Questions longer than max_question_length tokens are cut (and counted) so the
    context always has room. The first answer is the training target: its first and last token in each window
    that holds it whole, or 0 and 0 ([CLS]) in windows that do not. Needs a fast tokenizer (for offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"question answering needs a fast tokenizer (for character offsets and windows); "
                         f"{type(tokenizer).__name__} is not one: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    questions, truncated, longest = _cut_questions(tokenizer, [e.question for e in examples], max_question_length)
    room = max_length - longest - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= stride:  # each window must bring new context tokens, or the tokenizer cannot move through a context
        raise ValueError(f"max_length {max_length} leaves {room} context tokens beside the longest question "
                         f"({longest} tokens, cut at max_question_length {max_question_length}), not more than "
                         f"stride {stride}; raise max_length, or lower stride or max_question_length")
    if not examples:
        return QAFeatures([], [], None, [], [], [], [], 0)
    contexts = [e.context for e in examples]
    question_first = tokenizer.padding_side == "right"
    pairs = (questions, contexts) if question_first else (contexts, questions)
    encoded = tokenizer(*pairs, truncation="only_second" if question_first else "only_first", max_length=max_length,
                        stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    context_id = 1 if question_first else 0  # the context's sequence id
    features = QAFeatures([], [], [] if "token_type_ids" in encoded else None, [], [], [], [], truncated)
    for window, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence_ids = encoded.sequence_ids(window)
        offsets = [tuple(span) if sid == context_id else None for sid, span in zip(sequence_ids, encoded["offset_mapping"][window])]
        example = examples[example_index]
        start, end = _answer_tokens(offsets, example.answers[0]) if example.answers else (0, 0)
        features.input_ids.append(encoded["input_ids"][window])
        features.attention_mask.append(encoded["attention_mask"][window])
        if features.token_type_ids is not None:
            features.token_type_ids.append(encoded["token_type_ids"][window])
        features.start_positions.append(start)
        features.end_positions.append(end)
        features.example_index.append(example_index)
        features.offsets.append(offsets)
    return features


def _cut_questions(tokenizer, questions: list[str], limit: int) -> tuple[list[str], int, int]:
    """Questions at most `limit` tokens long, cut at a token's end so the kept part tokenizes the same;
    how many were cut; and the longest one's length in tokens after cutting. Leading whitespace goes too:
    some SQuAD questions have lots, and it only costs room with tokenizers that keep spaces."""
    questions = [q.lstrip() for q in questions]
    if not questions:
        return questions, 0, 0
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    cut = 0
    for i, offsets in enumerate(encoded["offset_mapping"]):
        if len(offsets) > limit:
            questions[i] = questions[i][:offsets[limit - 1][1]]
            cut += 1
    return questions, cut, min(limit, max(len(offsets) for offsets in encoded["offset_mapping"]))


def _answer_tokens(offsets: list[tuple[int, int] | None], answer: tuple[str, int]) -> tuple[int, int]:
    """(first, last) token of the answer in this window, or (0, 0) when the window does not hold all of it."""
    text, start_char = answer
    end_char = start_char + len(text)
    context = [i for i, span in enumerate(offsets) if span is not None and span[1] > span[0]]  # skip empty-span tokens
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    # First token ending after the answer's start, last one starting before its end: a start that falls in
    # whitespace or inside a word still gets the token that holds the answer's first character.
    first = next(i for i in context if offsets[i][1] > start_char)
    last = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return (first, last) if first <= last else (0, 0)


# ---------------------------------------------------------------- predictions


def best_answers(start_logits, end_logits, features: QAFeatures, examples, max_answer_length: int = 30,
                 n_best: int = 20) -> list[dict]:
    """Per example, in examples' order: {"id", "answer", "start", "end", "score", "probability"}.

    The answer is the best span over all the example's windows: start <= end, both context tokens, at most
    max_answer_length tokens, scored start_logit + end_logit (every such span is considered, not only the
    top-scoring tokens). "start"/"end" are character offsets into the context (end exclusive), "answer" the
    context between them. "probability" is the softmax of the best score over the example's n_best highest
    distinct spans (a span seen in two overlapping windows counts once, with its higher score): a confidence
    relative to the alternatives, not a calibrated probability. With no valid span: answer "", start/end/
    score/probability None.

    start_logits/end_logits: (num_features, seq_len) arrays or tensors, or one 1-D row per feature (batches
    padded to different lengths); positions past a window's own tokens are ignored."""
    starts, ends = _rows(start_logits), _rows(end_logits)
    if not len(starts) == len(ends) == len(features.offsets):
        raise ValueError(f"got {len(starts)} start and {len(ends)} end logit rows for {len(features.offsets)} windows; "
                         "pass the logits of every window, in the order of the features")
    candidates: list[dict[tuple[int, int], float]] = [{} for _ in examples]
    for window, example_index in enumerate(features.example_index):
        spans = candidates[example_index]
        for span, score in _window_spans(starts[window], ends[window], features.offsets[window], max_answer_length, n_best):
            if span not in spans or score > spans[span]:
                spans[span] = score
    return [_pick(example, spans, n_best) for example, spans in zip(examples, candidates)]


def _rows(logits) -> list[np.ndarray]:
    """One float 1-D numpy row per window, from an array, a tensor, or a list of either."""
    def as_numpy(value) -> np.ndarray:
        if hasattr(value, "detach"):  # a torch tensor, possibly bfloat16 on a GPU
            value = value.detach().float().cpu().numpy()
        return np.asarray(value, dtype=np.float64)
    if isinstance(logits, (list, tuple)):
        return [as_numpy(row).reshape(-1) for row in logits]
    array = as_numpy(logits)
    if array.ndim != 2:
        raise ValueError(f"logits must be (num_features, seq_len) or a list of 1-D rows; got shape {array.shape}")
    return list(array)


def _window_spans(start: np.ndarray, end: np.ndarray, offsets, max_answer_length: int, n_best: int):
    """The n_best highest-scoring valid spans of one window, as ((start_char, end_char), score)."""
    length = min(len(start), len(end), len(offsets))
    in_context = np.array([span is not None for span in offsets[:length]], dtype=bool)
    if not in_context.any():
        return []
    # scores[i, d] = start[i] + end[i + d]: every span of 1..max_answer_length tokens starting at i
    width = max(1, min(max_answer_length, length))
    scores = np.full((length, width), -np.inf)
    for d in range(width):
        valid = in_context[:length - d] & in_context[d:length]
        scores[:length - d, d] = np.where(valid, start[:length - d] + end[d:length], -np.inf)
    flat = scores.ravel()
    count = min(n_best, int(np.isfinite(flat).sum()))
    best = np.argpartition(-flat, count - 1)[:count]
    spans = []
    for index in best:
        i, d = divmod(int(index), width)
        spans.append(((offsets[i][0], offsets[i + d][1]), float(flat[index])))
    return spans


def _pick(example: QAExample, spans: dict[tuple[int, int], float], n_best: int) -> dict:
    if not spans:
        return {"id": example.id, "answer": "", "start": None, "end": None, "score": None, "probability": None}
    ranked = sorted(spans.items(), key=lambda item: -item[1])[:n_best]
    scores = np.array([score for _, score in ranked])
    weights = np.exp(scores - scores[0])  # shifted by the maximum so exp cannot overflow
    (start, end), score = ranked[0]
    return {"id": example.id, "answer": example.context[start:end], "start": start, "end": end, "score": score,
            "probability": float(weights[0] / weights.sum())}
