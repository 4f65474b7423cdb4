"""Data preflight: every split is read and checked, and every problem comes back in one DataError.

Small files only; nothing here loads a model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import sentiment_rows, write_image_folder, write_tsv
from PIL import Image

from tuneforge import cli
from tuneforge.api import load_task_data
from tuneforge.data.common import TaskData, label_key
from tuneforge.data.tables import read_split
from tuneforge.errors import DataError
from tuneforge.config import DataSpec, TaskSpec


def load(task: dict | None = None, **data) -> TaskData:
    return load_task_data(DataSpec(**data), TaskSpec(**(task or {})))


def data_problems(task: dict | None = None, **data) -> list[str]:
    with pytest.raises(DataError) as info:
        load(task, **data)
    return info.value.problems


def only(problems: list[str], prefix: str) -> str:
    """The one problem starting with `prefix` (e.g. 'validation: file')."""
    matches = [problem for problem in problems if problem.startswith(prefix)]
    assert len(matches) == 1, f"expected one problem starting {prefix!r}, got {problems}"
    return matches[0]


# ---------------------------------------------------------------- readers


def test_tsv_keeps_double_quotes_inside_sentences(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nhe said "hi there\t1\nit\'s "fine" , ok\t0\n"quoted whole"\t1\n')
    data = load(train=str(path), text_column="sentence")
    train = data.splits["train"]
    assert train.texts == ['he said "hi there', 'it\'s "fine" , ok', '"quoted whole"']
    assert train.labels == [1, 0, 1]
    assert train.rows == [f"{path}:2", f"{path}:3", f"{path}:4"]  # file line numbers, header is line 1
    assert data.labels == ["0", "1"] and data.modality == "text"


def test_csv_reads_quoted_fields(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"hello, world",pos\nplain,neg\n"she said ""hi""",pos\n')
    data = load(train=str(path))
    assert data.splits["train"].texts == ["hello, world", "plain", 'she said "hi"']
    assert data.splits["train"].labels == ["pos", "neg", "pos"]
    assert data.labels == ["neg", "pos"]


def test_jsonl_reads_one_object_per_line(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a \"quoted\" film", "label": "pos"}, {"text": "dull", "label": "neg"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    train = load(train=str(path)).splits["train"]
    assert train.texts == ['a "quoted" film', "dull"]
    assert train.labels == ["pos", "neg"]
    assert train.rows == [f"{path}:1", f"{path}:2"]


def test_json_array_file_is_read(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "good", "label": 1}, {"text": "bad", "label": 0}]))
    assert load(train=str(path)).splits["train"].texts == ["good", "bad"]


def test_parquet_is_read(tmp_path):
    path = tmp_path / "train.parquet"
    pd.DataFrame({"review": ["great plot", "awful actor", "fine"], "stars": [5, 1, 3]}).to_parquet(path)
    data = load(train=str(path), text_column="review", label_column="stars")
    assert data.splits["train"].texts == ["great plot", "awful actor", "fine"]
    assert [label_key(value) for value in data.splits["train"].labels] == ["5", "1", "3"]
    assert data.labels == ["1", "3", "5"]
    assert data.splits["train"].rows == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_csv_without_header_uses_data_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("hello there,1\nbye now,0\n")
    train = load(train=str(path), columns=["text", "label"]).splits["train"]
    assert train.texts == ["hello there", "bye now"]  # the first line is data, not a header
    assert train.labels == [1, 0]
    assert train.rows == [f"{path}:1", f"{path}:2"]


def test_tsv_without_header_and_declared_format(tmp_path):
    path = tmp_path / "train.data"  # unknown suffix: data.format decides
    path.write_text('a "b\tx\nc d\ty\n')
    train = load(train=str(path), format="tsv", columns=["sentence", "tag"], text_column="sentence",
                 label_column="tag").splits["train"]
    assert train.texts == ['a "b', "c d"]
    assert train.labels == ["x", "y"]


def test_txt_suffix_is_read_as_tsv(tmp_path):
    path = write_tsv(tmp_path / "train.txt", [("a, b", 0), ("c", 1)])
    assert load(train=str(path), text_column="sentence").splits["train"].texts == ["a, b", "c"]


def test_text_pair_column_is_read_and_checked(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("premise\thypothesis\tlabel\na cat\ta pet\t1\na dog\t\t0\n")
    problems = data_problems(train=str(path), text_column="premise", text_pair_column="hypothesis")
    assert problems == [f"train: 1 empty or missing value(s) in column 'hypothesis' at {path}:3; fill or remove those rows"]


# ---------------------------------------------------------------- file-level problems


def test_missing_validation_and_test_files_are_reported_together(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(8))
    problems = data_problems(train=str(train), validation=str(tmp_path / "dev.tsv"), test=str(tmp_path / "test.tsv"),
                             text_column="sentence")
    assert problems == [
        f"validation: file {tmp_path / 'dev.tsv'} does not exist (data.validation)",
        f"test: file {tmp_path / 'test.tsv'} does not exist (data.test)",
    ]


def test_missing_column_lists_the_columns_found_in_every_split(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(8))
    validation = write_tsv(tmp_path / "dev.tsv", sentiment_rows(4), header=("text", "label"))
    problems = data_problems(train=str(train), validation=str(validation))  # text_column defaults to 'text'
    assert problems == [f"train: {train} has no column 'text'; columns are: sentence, label"]
    problems = data_problems(train=str(train), validation=str(validation), text_column="sentence", label_column="y")
    assert problems == [
        f"train: {train} has no column 'y'; columns are: sentence, label",
        f"validation: {validation} has no column 'sentence', 'y'; columns are: text, label",
    ]


def test_wrong_delimiter_gets_a_hint(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence\tlabel\ngood\t1\n")
    message = only(data_problems(train=str(path), text_column="sentence"), "train:")
    assert "columns are: sentence\tlabel" in message
    assert "is the delimiter right?" in message and "data.format: tsv" in message


def test_zero_byte_file_is_reported(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("")
    assert data_problems(train=str(path)) == [f"train: file {path} is empty"]


def test_malformed_tsv_is_reported_not_raised(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\na\t1\nb\t0\textra\n")
    message = only(data_problems(train=str(path)), "train:")
    assert message.startswith(f"train: cannot read {path} as tsv:")
    assert "line 3" in message


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nabc,1\nx\xe9y,0\n")
    message = only(data_problems(train=str(path)), "train:")
    assert message.startswith(f"train: {path} is not UTF-8 text") and "re-save it as UTF-8" in message


def test_non_utf8_message_points_at_the_bad_byte(tmp_path):
    path = tmp_path / "train.csv"
    content = b"text,label\n" + b"abc,1\n" * 5 + b"x\xe9y,1\n"
    path.write_bytes(content)
    message = only(data_problems(train=str(path)), "train:")
    offset = content.index(b"\xe9")
    assert f"byte {offset}, line 7" in message


def test_train_must_be_set():
    with pytest.raises(DataError) as info:
        load_task_data(DataSpec(), TaskSpec())
    assert info.value.problems == ["data.train is not set: give the training file or image folder"]


# ---------------------------------------------------------------- content problems


def test_every_content_problem_is_in_one_data_error(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("good movie", 1), ("", 0), ("bad film", 0), ("   ", 1),
                                               ("ok plot", ""), *sentiment_rows(6)])
    validation = write_tsv(tmp_path / "dev.tsv", [("good", 7), ("bad", 0), ("lovely", "banana"), ("dull", "")])
    test = write_tsv(tmp_path / "test.tsv", [])  # header only: no examples
    with pytest.raises(DataError) as info:
        load(train=str(train), validation=str(validation), test=str(test), text_column="sentence")
    problems = info.value.problems
    assert len(problems) == 5, problems

    # Line 1 is the header; the empty text is on line 3, the blank-looking one on line 5.
    assert only(problems, "train: 2 empty") == (
        f"train: 2 empty or missing value(s) in column 'sentence' at {train}:3, {train}:5; fill or remove those rows")
    assert only(problems, "train: 1 missing label") == f"train: 1 missing label(s) in column 'label' at {train}:6"
    assert only(problems, "validation: 1 missing label") == (
        f"validation: 1 missing label(s) in column 'label' at {validation}:5")
    assert only(problems, "test:") == f"test: split {test} has no examples"
    unseen = only(problems, "validation: label(s)")
    assert unseen.startswith("validation: label(s) ['7', 'banana'] are not known to the model (known: ['0', '1'])")
    assert f"{validation}:2, {validation}:4" in unseen and "task.labels" in unseen

    rendered = str(info.value)
    assert rendered.splitlines()[0] == "5 data problems:"


def test_unseen_test_labels_are_reported(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(8))
    test = write_tsv(tmp_path / "test.tsv", [("x", 1), ("y", 2)])
    problems = data_problems(train=str(train), test=str(test), text_column="sentence")
    assert problems == [f"test: label(s) ['2'] are not known to the model (known: ['0', '1']) at {test}:3; "
                        "they never appear in train: fix them or list them in task.labels"]


def test_long_lists_of_bad_rows_are_summarised(tmp_path):
    rows = [("", 0)] * 8 + sentiment_rows(4)
    train = write_tsv(tmp_path / "train.tsv", rows)
    message = only(data_problems(train=str(train), text_column="sentence"), "train:")
    assert message.startswith("train: 8 empty or missing value(s)")
    assert f"{train}:2, {train}:3, {train}:4, {train}:5, {train}:6 and 3 more" in message
    assert f"{train}:7" not in message


def test_nan_text_in_jsonl_and_parquet_names_the_row(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "good", "label": 1}\n{"text": null, "label": 0}\n{"text": "", "label": 1}\n'
                     '{"text": "bad", "label": 0}\n')
    assert data_problems(train=str(jsonl)) == [
        f"train: 2 empty or missing value(s) in column 'text' at {jsonl}:2, {jsonl}:3; fill or remove those rows"]
    parquet = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["a", None, "b"], "label": [0, 1, 1]}).to_parquet(parquet)
    assert data_problems(train=str(parquet)) == [
        f"train: 1 empty or missing value(s) in column 'text' at {parquet}:2; fill or remove those rows"]


def test_na_like_words_are_text_not_missing(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("NA", 0), ("null", 1), ("None", 0), ("nan", 1)])
    assert load(train=str(train), text_column="sentence").splits["train"].texts == ["NA", "null", "None", "nan"]


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood one\t1\n\nbad one\t0\n\t1\n")  # the empty text is on line 5
    problems = data_problems(train=str(path), text_column="sentence")
    assert any(f"{path}:5" in problem for problem in problems), problems


def test_a_single_label_is_not_a_classification_task(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("a", 1), ("b", 1)])
    assert data_problems(train=str(train), text_column="sentence") == [
        "train: only one label (['1']) found in column 'label'; classification needs at least two"]


def test_train_labels_missing_from_task_labels_are_reported(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 1), ("c", 2)])
    assert data_problems({"labels": ["0", "1"]}, train=str(train), text_column="sentence") == [
        "train: label(s) ['2'] are not in task.labels ['0', '1']; add them to task.labels"]


# ---------------------------------------------------------------- images


def test_unreadable_images_are_reported_with_their_paths(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=3)
    garbage, empty = root / "red" / "x.jpg", root / "blue" / "y.png"
    garbage.write_bytes(b"this is not a jpeg at all")
    empty.write_bytes(b"")
    (root / "blue" / "notes.txt").write_text("not an image: ignored")
    problems = data_problems(train=str(root))
    message = only(problems, "train:")
    assert len(problems) == 1
    assert message.startswith("train: 2 unreadable image(s): ")
    assert f"{garbage} (" in message and f"{empty} (" in message
    assert "notes.txt" not in message
    assert message.endswith("remove them or set data.skip_unreadable_images: true")


def test_a_truncated_jpeg_is_unreadable(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=2)
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 100, dtype=np.uint8)).save(buffer, "JPEG")
    truncated = root / "red" / "half.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    message = only(data_problems(train=str(root)), "train:")
    assert message.startswith("train: 1 unreadable image(s): ") and str(truncated) in message


def test_skip_unreadable_images_drops_them_and_says_how_many(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=3)
    garbage, empty = root / "red" / "x.jpg", root / "blue" / "y.png"
    garbage.write_bytes(b"\x00garbage\xff" * 10)
    empty.write_bytes(b"")
    validation = write_image_folder(tmp_path / "val", per_class=2, seed=5)
    data = load(train=str(root), validation=str(validation), skip_unreadable_images=True)

    train = data.splits["train"]
    assert data.modality == "image"
    assert len(train) == 6 and len(train.rows) == 6 and len(train.image_paths) == 6
    assert str(garbage) not in train.rows and str(empty) not in train.rows
    assert garbage not in train.image_paths and empty not in train.image_paths
    assert train.labels == ["blue"] * 3 + ["red"] * 3
    assert all(Path(row).parent.name == label for row, label in zip(train.rows, train.labels))
    assert data.labels == ["blue", "red"]
    assert len(data.splits["validation"]) == 4
    assert len(data.notes) == 1
    assert data.notes[0].startswith("train: skipped 2 unreadable image(s): ")
    assert str(garbage) in data.notes[0] and str(empty) in data.notes[0]


def test_missing_or_empty_image_folders(tmp_path):
    missing = tmp_path / "nowhere"
    assert data_problems(train=str(missing), format="imagefolder") == [
        f"train: folder {missing} does not exist (data.train)"]
    (tmp_path / "flat").mkdir()
    assert data_problems(train=str(tmp_path / "flat")) == [
        f"train: {tmp_path / 'flat'} holds no images; expected {tmp_path / 'flat'}/<label>/<image files>"]


def test_images_outside_class_folders_have_no_label(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=3)
    (root / "red" / "000.png").rename(root / "stray.png")
    problems = data_problems(train=str(root))
    assert problems == [f"train: 1 missing label(s) in column 'label' at {root / 'stray.png'}"]


# ---------------------------------------------------------------- splitting and sampling


@pytest.fixture
def hundred(tmp_path) -> dict[str, Path]:
    return {"train": write_tsv(tmp_path / "train.tsv", sentiment_rows(100, seed=1)),
            "validation": write_tsv(tmp_path / "dev.tsv", sentiment_rows(40, seed=2)),
            "test": write_tsv(tmp_path / "test.tsv", sentiment_rows(30, seed=3))}


def test_validation_fraction_is_seeded_and_disjoint(hundred):
    def carve(seed):
        return load(train=str(hundred["train"]), test=str(hundred["test"]), validation_fraction=0.2,
                    split_seed=seed, text_column="sentence")

    first, again, other = carve(5), carve(5), carve(6)
    train, validation = first.splits["train"], first.splits["validation"]
    assert (len(train), len(validation)) == (80, 20)
    assert validation.name == "validation"
    assert set(train.rows).isdisjoint(validation.rows)
    assert set(train.rows) | set(validation.rows) == {f"{hundred['train']}:{line}" for line in range(2, 102)}
    assert validation.rows == again.splits["validation"].rows and train.rows == again.splits["train"].rows
    assert validation.texts == again.splits["validation"].texts
    assert validation.rows != other.splits["validation"].rows
    assert len(first.splits["test"]) == 30


def test_max_train_examples_samples_exactly_that_many_reproducibly(hundred):
    def sample(seed, count=10):
        return load(train=str(hundred["train"]), validation=str(hundred["validation"]), test=str(hundred["test"]),
                    max_train_examples=count, split_seed=seed, text_column="sentence")

    first, again, other = sample(3), sample(3), sample(4)
    train = first.splits["train"]
    assert len(train) == 10 and len(set(train.rows)) == 10
    assert train.rows == again.splits["train"].rows
    assert train.rows != other.splits["train"].rows
    original = dict(zip((f"{hundred['train']}:{i + 2}" for i in range(100)), sentiment_rows(100, seed=1)))
    assert all(original[row][0] == text and original[row][1] == label
               for row, text, label in zip(train.rows, train.texts, train.labels))
    assert len(first.splits["validation"]) == 40 and len(first.splits["test"]) == 30
    assert len(sample(3, count=1000).splits["train"]) == 100  # more than there are: all of them


def test_the_test_split_is_never_subsampled(hundred):
    data = load(train=str(hundred["train"]), validation=str(hundred["validation"]), test=str(hundred["test"]),
                max_train_examples=10, max_validation_examples=7, text_column="sentence")
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 10, "validation": 7, "test": 30}
    assert data.splits["test"].rows == [f"{hundred['test']}:{line}" for line in range(2, 32)]


def test_fraction_then_sampling(hundred):
    data = load(train=str(hundred["train"]), test=str(hundred["test"]), validation_fraction=0.2,
                max_train_examples=10, max_validation_examples=5, text_column="sentence")
    train, validation = data.splits["train"], data.splits["validation"]
    assert (len(train), len(validation), len(data.splits["test"])) == (10, 5, 30)
    assert set(train.rows).isdisjoint(validation.rows)


# ---------------------------------------------------------------- labels


def test_task_labels_fix_class_order_and_label_names_rename(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("good", 1), ("bad", 0), ("fine", 1)])
    default = load(train=str(train), text_column="sentence")
    assert default.labels == ["0", "1"] and default.targets("train") == [1, 0, 1]

    fixed = load({"labels": ["1", "0"], "label_names": ["positive", "negative"]}, train=str(train),
                 text_column="sentence")
    assert fixed.labels == ["1", "0"]
    assert fixed.label_names == ["positive", "negative"]
    assert fixed.targets("train") == [0, 1, 0]


def test_task_labels_may_list_labels_absent_from_train(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("good", 1), ("bad", 0)])
    test = write_tsv(tmp_path / "test.tsv", [("meh", 2), ("bad", 0)])
    data = load({"labels": ["0", "1", "2"]}, train=str(train), test=str(test), text_column="sentence")
    assert data.labels == ["0", "1", "2"] and data.targets("test") == [2, 0]


def test_numeric_labels_sort_as_numbers(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("a", 10), ("b", 2), ("c", 1)])
    assert load(train=str(train), text_column="sentence").labels == ["1", "2", "10"]


@pytest.mark.parametrize("value", [1, 1.0, "1", " 1 ", np.int64(1), np.float64(1.0)])
def test_label_key_makes_formats_agree(value):
    assert label_key(value) == "1"


def test_label_key_keeps_other_values():
    assert label_key(2.5) == "2.5" and label_key("cat") == "cat" and label_key(0) == "0"


def test_labels_from_different_formats_agree(tmp_path):
    # TSV labels read as ints; a column with a missing value reads as floats; JSONL may hold strings.
    train = write_tsv(tmp_path / "train.tsv", [("good", 1), ("bad", 0)])
    validation = tmp_path / "dev.jsonl"
    validation.write_text('{"sentence": "fine", "label": "1"}\n{"sentence": "great", "label": 1.0}\n'
                          '{"sentence": "awful", "label": 0}\n')
    test = tmp_path / "test.parquet"
    pd.DataFrame({"sentence": ["x", "y"], "label": [0.0, 1.0]}).to_parquet(test)
    data = load(train=str(train), validation=str(validation), test=str(test), text_column="sentence")
    assert data.labels == ["0", "1"]
    assert data.targets("validation") == [1, 1, 0]
    assert data.targets("test") == [0, 1]


def test_read_split_is_used_for_single_images(tmp_path):
    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    split = read_split("predict", str(image), DataSpec())
    assert split.labels == [None] and split.image_paths == [image] and split.rows == [str(image)]


# ---------------------------------------------------------------- through the CLI


def _bad_data_recipe(tmp_path) -> Path:
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(8))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  name: {tmp_path / 'no-such-model'}\n"
        f"data:\n  train: {train}\n  validation: {tmp_path / 'missing.tsv'}\n  text_column: sentence\n"
        f"output:\n  dir: {tmp_path / 'run'}\n")
    return recipe


def test_cli_reports_data_problems_before_loading_the_model(tmp_path, capsys):
    recipe = _bad_data_recipe(tmp_path)
    assert cli.main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    # The model folder does not exist either: the data check comes first and stops the run.
    assert err.splitlines() == ["error: 1 data problem:",
                                f"  - validation: file {tmp_path / 'missing.tsv'} does not exist (data.validation)"]


def test_cli_rerun_after_failed_preflight_still_reports_the_data(tmp_path, capsys):
    recipe = _bad_data_recipe(tmp_path)
    assert cli.main(["train", str(recipe)]) == 2
    capsys.readouterr()
    assert cli.main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" not in err
    assert "missing.tsv does not exist" in err
