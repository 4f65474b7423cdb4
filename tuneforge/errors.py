"""User-facing errors. Each carries every problem found, so one run shows them all."""

from __future__ import annotations


class TuneforgeError(Exception):
    """A problem with the user's input: the CLI prints it and exits with code 2."""

    kind = "problem"

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
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
