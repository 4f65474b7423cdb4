"""Text-generation and SQuAD metrics: identities, hand-computed cases, multiple references, no nltk data."""

from __future__ import annotations

import math
import socket
from fractions import Fraction

import nltk
import pytest

from tuneforge.tasks.text_metrics import generation_scores, normalize_answer, squad_scores

SENTENCE = "The quick brown fox jumps over the lazy dog."


def test_identical_text_scores_100():
    scores = generation_scores([SENTENCE], [[SENTENCE]])
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert scores[key] == pytest.approx(100.0), key
    assert scores["num_examples"] == 1


def test_meteor_of_identical_text_is_only_reduced_by_the_one_chunk_penalty():
    # 10 tokens (the period is one), all matched in one chunk: Fmean = 1, penalty = 0.5 * (1/10)^3.
    penalty = 0.5 * (1 / 10) ** 3
    assert generation_scores([SENTENCE], [[SENTENCE]])["meteor"] == pytest.approx(100 * (1 - penalty), abs=1e-9)


def test_bleu_by_hand():
    prediction = "the quick brown fox jumps over the dog"         # 8 tokens
    reference = "the quick brown fox jumped over the lazy dog"    # 9 tokens
    # Clipped matches / prediction n-grams:
    p1 = Fraction(7, 8)   # the x2, quick, brown, fox, over, dog
    p2 = Fraction(4, 7)   # the quick, quick brown, brown fox, over the
    p3 = Fraction(2, 6)   # the quick brown, quick brown fox
    p4 = Fraction(1, 5)   # the quick brown fox
    brevity_penalty = math.exp(1 - 9 / 8)  # prediction shorter than the reference: exp(1 - r/c)
    expected = 100 * brevity_penalty * float(p1 * p2 * p3 * p4) ** 0.25
    assert generation_scores([prediction], [[reference]])["bleu"] == pytest.approx(expected, abs=1e-6)


def test_rouge_by_hand():
    prediction = "on the mat the cat sat down"  # 7 tokens
    reference = "The cat sat on the mat"       # 6 tokens (lowercased)
    scores = generation_scores([prediction], [[reference]])

    def f1(precision, recall):
        return float(2 * precision * recall / (precision + recall))

    # Unigrams: all of the reference's 6 are in the prediction, "down" is not.
    assert scores["rouge1"] == pytest.approx(100 * f1(Fraction(6, 7), Fraction(6, 6)))  # 12/13
    # Bigrams matched: on the, the mat, the cat, cat sat (of 6 predicted, 5 reference).
    assert scores["rouge2"] == pytest.approx(100 * f1(Fraction(4, 6), Fraction(4, 5)))  # 8/11
    # Longest common subsequence: "the cat sat" (3).
    assert scores["rougeL"] == pytest.approx(100 * f1(Fraction(3, 7), Fraction(3, 6)))  # 6/13


def test_rouge_keeps_non_ascii_letters():
    assert generation_scores(["Ein Mädchen läuft"], [["ein mädchen läuft"]])["rouge1"] == pytest.approx(100.0)
    assert generation_scores(["Mädchen"], [["Madchen"]])["rouge1"] == 0.0
    # An ASCII-only tokenizer would reduce both to "m dchen" and call them equal,
    assert generation_scores(["Mädchen"], [["Mèdchen"]])["rouge1"] == 0.0
    # and would drop Cyrillic altogether.
    assert generation_scores(["привет мир"], [["привет мир"]])["rouge1"] == pytest.approx(100.0)
    # Decomposed umlaut (a + combining diaeresis) is the same word as the composed one.
    assert generation_scores(["Ma\u0308dchen"], [["M\u00e4dchen"]])["rouge1"] == pytest.approx(100.0)


def test_meteor_by_hand_with_stem_match_and_fragmentation():
    prediction = "a brown dog runs across green fields"         # 7 tokens
    reference = "across green fields a brown dog is running"    # 8 tokens
    # Exact: a, brown, dog, across, green, fields; stem: runs ~ running (both "run"); "is" unmatched: m = 7.
    # In prediction order the reference positions are 3 4 5 | 7 | 0 1 2: three chunks.
    precision, recall = Fraction(7, 7), Fraction(7, 8)
    fmean = 10 * precision * recall / (recall + 9 * precision)
    penalty = Fraction(1, 2) * Fraction(3, 7) ** 3
    expected = 100 * float(fmean * (1 - penalty))
    assert generation_scores([prediction], [[reference]])["meteor"] == pytest.approx(expected, abs=1e-9)


def test_meteor_needs_no_nltk_data_or_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to load nltk data or reach the network")

    monkeypatch.setattr(nltk.data, "find", refuse)
    monkeypatch.setattr(nltk.data, "load", refuse)
    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    # Unmatched words ("cat", "feline", "sat") reach the synonym stage, where WordNet would be consulted.
    scores = generation_scores(["the cat sat", ""], [["the feline rested"], ["something"]])
    assert 0 < scores["meteor"] < 100


def test_best_reference_counts():
    prediction = "the cat is on the mat today"
    scores = generation_scores([prediction], [["a dog was in the garden", prediction]])
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert scores[key] == pytest.approx(100.0), key


def test_ragged_references_ignore_the_missing_ones():
    # The first prediction has one reference, the second two. A missing reference must not count as an
    # empty one: an empty reference (length 0) would tie with the 8-token one for the 4-token prediction
    # and remove its brevity penalty. Repeating its only reference is equivalent.
    predictions = ["a b c d", "p q r s t"]
    ragged = generation_scores(predictions, [["a b c d e f g h"], ["p q r s t", "u v w"]])
    padded = generation_scores(predictions, [["a b c d e f g h"] * 2, ["p q r s t", "u v w"]])
    assert ragged == pytest.approx(padded)
    assert ragged["bleu"] < 100


def test_empty_prediction_scores_zero():
    scores = generation_scores([""], [["a perfectly fine reference"]])
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "meteor"):
        assert scores[key] == 0.0, key


def test_generation_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        generation_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        generation_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="is a string"):
        generation_scores(["a"], ["a"])


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    # Articles are removed as whole words only, after punctuation is gone.
    assert normalize_answer("An anthem, theory of a-team") == "anthem theory of ateam"


def test_squad_exact_match():
    assert squad_scores(["the Denver Broncos"], [["Denver Broncos"]])["exact_match"] == 100.0
    assert squad_scores(["Denver"], [["Denver Broncos"]])["exact_match"] == 0.0


def test_squad_f1_by_hand():
    # [denver, broncos, team] vs [denver, broncos]: P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8.
    scores = squad_scores(["Denver Broncos team"], [["the Denver Broncos"]])
    assert scores["f1"] == pytest.approx(80.0)
    assert scores["exact_match"] == 0.0


def test_squad_takes_the_best_gold_answer_and_averages_questions():
    predictions = ["Denver Broncos team", "Carolina"]
    references = [["Broncos", "the Denver Broncos", "Panthers"],  # best: 0.8 (the second)
                  ["Carolina Panthers", "Carolina"]]               # best: exact
    scores = squad_scores(predictions, references)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (0.8 + 1.0) / 2)
    assert scores["num_examples"] == 2


def test_squad_counts_repeated_tokens_once_per_occurrence():
    # [new, new, york] vs [new, york]: overlap 2 (new once, york once); P = 2/3, R = 1, F1 = 0.8.
    assert squad_scores(["new new york"], [["New York"]])["f1"] == pytest.approx(80.0)


def test_squad_input_errors():
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        squad_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="1 predictions but 2"):
        squad_scores(["a"], [["a"], ["b"]])
