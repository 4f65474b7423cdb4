"""Readers of text tasks' data: aligned line files (translation), plain text lines, tables of text columns,
and SQuAD JSON (data/qa.py). Each split is a `Split` whose `texts` are the inputs and whose `labels` are what
the model must produce (target texts, captions, responses, or QAExamples)."""

from __future__ import annotations

import gzip
from pathlib import Path

from tuneforge.data.common import Split, missing
from tuneforge.data.qa import check_examples, read_squad
from tuneforge.data.tables import not_text, read_table, table_format
from tuneforge.errors import listing


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


def read_lines(name: str, where: str, spec) -> Split:
    """One text a non-empty line (blank lines separate texts; they are not texts)."""
    path = Path(where)
    if not path.is_file():
        return Split(name, where, [], [], texts=[], problems=[f"{name}: file {where} not found"])
    try:
        lines = _open_lines(path, spec.encoding)
    except UnicodeDecodeError:
        return Split(name, where, [], [], texts=[], problems=[not_text(name, path, spec.encoding)])
    kept = [(i, line) for i, line in enumerate(lines) if line.strip()]
    return Split(name, where, [None] * len(kept), [f"{path.name}:{i + 1}" for i, _ in kept],
                 texts=[line for _, line in kept])


def read_columns(name: str, where: str, spec, wanted: dict[str, str]) -> tuple[dict[str, list], list[str], list[str]]:
    """The columns `wanted` ({column: what it holds}) of a table, each row's place in the file, and the problems
    that stopped the reading (a missing file, an unreadable table, absent columns): empty when it worked."""
    path = Path(where)
    if not path.is_file():
        return {}, [], [f"{name}: file {where} not found"]
    fmt = table_format(path, spec.format)
    try:
        frame = read_table(path, fmt, spec.columns, spec.encoding)
    except UnicodeDecodeError:
        return {}, [], [not_text(name, path, spec.encoding)]
    except Exception as error:  # pandas raises many kinds for a malformed file
        return {}, [], [f"{name}: cannot read {where} as {fmt} ({error})"]
    absent = [f"{name}: {path} has no column '{column}' ({what}); its columns are {listing(map(str, frame.columns))}"
              for column, what in wanted.items() if column not in frame.columns]
    if absent:
        return {}, [], absent
    first_row = 2 if fmt in ("csv", "tsv") and not spec.columns else 1  # the file's own line numbers
    columns = {column: [None if missing(v) else v for v in frame[column].tolist()] for column in wanted}
    return columns, [f"{path.name}:{i + first_row}" for i in range(len(frame))], []


def read_qa_split(name: str, where: str, require_answers: bool) -> tuple[Split, list[str]]:
    """A SQuAD-format file as a Split: questions as texts, contexts as pairs, QAExamples as labels."""
    examples, problems = read_squad(where)
    split = Split(name, where, examples, [e.where for e in examples], texts=[e.question for e in examples],
                  text_pairs=[e.context for e in examples], problems=problems)
    if problems:
        return split, []
    problems, notes = check_examples(examples, name, require_answers)
    split.problems = problems
    return split, notes
