"""Metrics for text generation and extractive question answering, all on a 0-100 scale.

generation_scores(predictions, references) -- references holds one or more reference strings per prediction:

- bleu: sacrebleu's corpus BLEU with its defaults (13a tokenisation, case-sensitive, "exp" smoothing,
  max n-gram order 4, closest reference length for the brevity penalty). When predictions have different
  numbers of references, the shorter lists are padded with None, which sacrebleu documents as "no reference
  here": that prediction is scored against its own references only (padding with "" would instead count an
  empty reference and could change the brevity penalty).
- chrf: sacrebleu's corpus chrF with its defaults (character n-grams up to 6, word n-grams 0, beta 2),
  references padded as for BLEU.
- rouge1, rouge2, rougeL: rouge-score's F-measure for each prediction, taking the best reference
  (RougeScorer.score_multi, per ROUGE type), then averaged over predictions. rougeL is the sentence-level
  LCS (no splitting on newlines). Tokens are our own: text NFC-normalised, lowercased, then every regex
  \\w+ match (Unicode letters, digits, underscore). rouge-score's default tokenizer keeps only [a-z0-9] and
  would silently drop umlauts, accents and whole non-Latin scripts. No stemming: rouge-score's stemmer is
  the English Porter stemmer and would be wrong for other languages.
- meteor: nltk's meteor_score (alpha 0.9, beta 3, gamma 0.5), best reference per prediction, averaged over
  predictions. Of its three matching stages only exact match and Porter-stem match (nltk's PorterStemmer)
  are used; the WordNet synonym stage is switched off with a stand-in WordNet that knows no synsets, so
  no nltk data is ever loaded. Tokens: text NFC-normalised, lowercased, then every regex \\w+|[^\\w\\s] match
  (words, and each punctuation character as its own token). Per sentence, with m matched unigrams:
  P = m / hypothesis tokens, R = m / reference tokens, Fmean = 10PR / (R + 9P),
  penalty = 0.5 * (chunks / m)^3, score = Fmean * (1 - penalty); 0 when nothing matches.
- num_examples: the number of predictions.

squad_scores(predictions, references) -- the official SQuAD v1.1 evaluation: answers are normalised by
normalize_answer (lowercase, drop string.punctuation, drop the words a/an/the, collapse whitespace);
exact_match is 1 when the normalised prediction equals a normalised gold answer; f1 is the token F1 between
the normalised whitespace tokens (overlap counted with multiplicity); each question takes the best over its
gold answers, and both are averaged over questions. As in v1.1, two answers that both normalise to nothing
get exact match 1 but F1 0.

Empty prediction strings score 0 for their sentence; a prediction with no references, mismatched lengths
or no predictions at all raise ValueError.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

# sacrebleu, rouge-score and nltk are imported where they score: nltk alone takes seconds to import, and a
# run of a task without text metrics (or `tuneforge --help`) should not wait for it.

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_WORD = re.compile(r"\w+")
_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _check_inputs(predictions: list[str], references: list[list[str]]) -> None:
    """Fail early and clearly: the libraries' own errors for these cases are cryptic or absent."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists; "
                         "give one list of references per prediction")
    if not predictions:
        raise ValueError("no predictions to score")
    for i, refs in enumerate(references):
        # A bare string would be taken as a list of one-character references.
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] is a string; give a list of reference strings per prediction")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; every prediction needs at least one reference")


def _unicode_words(text: str) -> list[str]:
    # NFC first, so that a letter written as base + combining accent is one \w character, not a word break.
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


class _UnicodeTokenizer:
    """What RougeScorer expects of a tokenizer: an object with tokenize(text) -> list of tokens."""

    def tokenize(self, text: str) -> list[str]:
        return _unicode_words(text)


class _NoWordNet:
    """Stands in for nltk's WordNet so METEOR's synonym stage finds nothing and never loads corpus data."""

    def synsets(self, word: str) -> list:
        return []


def _meteor_tokens(text: str) -> list[str]:
    # nltk's word_tokenize would need the punkt data; this regex keeps words and punctuation marks apart.
    return _WORD_OR_PUNCT.findall(unicodedata.normalize("NFC", text).lower())


def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-prediction reference lists -> sacrebleu's reference streams, ragged lists padded with None."""
    width = max(len(refs) for refs in references)
    padded = [list(refs) + [None] * (width - len(refs)) for refs in references]
    return [list(stream) for stream in zip(*padded)]


def _rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=_UnicodeTokenizer())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        best = scorer.score_multi(refs, prediction)
        for rouge_type in ROUGE_TYPES:
            totals[rouge_type] += best[rouge_type].fmeasure
    return {rouge_type: 100 * total / len(predictions) for rouge_type, total in totals.items()}


def _meteor(predictions: list[str], references: list[list[str]]) -> float:
    from nltk.translate.meteor_score import meteor_score

    no_wordnet = _NoWordNet()
    total = 0.0
    for prediction, refs in zip(predictions, references):
        total += meteor_score([_meteor_tokens(r) for r in refs], _meteor_tokens(prediction), wordnet=no_wordnet)
    return 100 * total / len(predictions)


def generation_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """BLEU, chrF, ROUGE-1/2/L and METEOR (0-100) of predictions against one or more references each.

    The exact definitions are in the module docstring."""
    from sacrebleu.metrics import BLEU, CHRF

    _check_inputs(predictions, references)
    streams = _reference_streams(references)
    scores = {
        "bleu": float(BLEU().corpus_score(predictions, streams).score),
        "chrf": float(CHRF().corpus_score(predictions, streams).score),
    }
    scores.update(_rouge(predictions, references))
    scores["meteor"] = _meteor(predictions, references)
    scores["num_examples"] = len(predictions)
    return scores


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation, in its order: lowercase, drop punctuation, drop articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    # Counter & keeps the smaller count of each token: a repeated word only matches as often as it is in both.
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """SQuAD v1.1 exact match and F1 (0-100): best over each question's gold answers, averaged over questions.

    Every question needs at least one gold answer (as in SQuAD's own evaluation data); an empty
    list raises ValueError naming its position."""
    _check_inputs(predictions, references)
    exact = f1 = 0.0
    for prediction, golds in zip(predictions, references):
        exact += max(_exact_match(prediction, gold) for gold in golds)
        f1 += max(_token_f1(prediction, gold) for gold in golds)
    count = len(predictions)
    return {"exact_match": 100 * exact / count, "f1": 100 * f1 / count, "num_examples": count}
