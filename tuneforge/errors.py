"""User-facing errors. Each carries every problem found, so one run shows them all."""

from __future__ import annotations

MAX_PROBLEM_CHARS = 1000


def shorten(text: str, limit: int) -> str:
    """`text` cut in the middle to about `limit` characters, saying how much was left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 2)
    return f"{text[:keep * 2 // 3]} … [{len(text) - keep:,} characters left out] … {text[len(text) - keep // 3:]}"


def listing(values, limit: int = 60, count: int = 10) -> str:
    """Values from a file (column names, labels) for a message: the first `count`, each cut to `limit`."""
    values = [shorten(value, limit) for value in values]
    return ", ".join(values[:count]) + (f" and {len(values) - count} more" if len(values) > count else "")


class TuneforgeError(Exception):
    """A problem with the user's input: the CLI prints it and exits with code 2."""

    kind = "problem"

    def __init__(self, problems: list[str] | str, source: str | None = None):
        # A problem quotes values from the user's files; a 1 MB line must not become a 1 MB message.
        self.problems = [shorten(p, MAX_PROBLEM_CHARS) for p in ([problems] if isinstance(problems, str) else problems)]
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        count = len(self.problems)
        header = f"{count} {self.kind}{'s' if count != 1 else ''}{where}:"
        return "\n".join([header, *(f"  - {problem}" for problem in self.problems)])


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RecipeError(TuneforgeError):
    kind = "recipe problem"


class DataError(TuneforgeError):
    kind = "data problem"


class ModelError(TuneforgeError):
    kind = "model problem"


class ResumeError(TuneforgeError):
    kind = "resume problem"


class StorageError(TuneforgeError):
    kind = "storage problem"


class TrainingError(TuneforgeError):
    kind = "training problem"
