"""Errors the library raises on purpose.

`UserError` and its subclasses mean bad input (a path, a plan, a model, a flag): front ends print the message as
one line and exit with code 2. Anything else is a bug.
"""


class UserError(Exception):
    """Bad input from the user; the message is one line that says what is wrong and, where possible, what to do."""


class UnsupportedModelError(UserError):
    """The model's family has no table in surgery.arch."""


class PlanError(UserError):
    """A plan file is malformed or does not fit the model; `problems` lists every problem found."""

    SHOWN = 100  # problems kept; a hostile plan can have millions

    def __init__(self, problems: list[str]):
        unique = list(dict.fromkeys(problems))  # identical problems once, first-seen order kept
        if len(unique) > self.SHOWN:
            unique = unique[: self.SHOWN] + [f"... and {len(unique) - self.SHOWN:,} more problem(s) not shown"]
        self.problems = unique
        head = self.problems[0] if self.problems else "invalid plan"
        more = f" (and {len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        super().__init__(head + more)


class SourceError(UserError):
    """A model source (path, hub id, GGUF file, alias) cannot be resolved or read."""


class FingerprintMismatch(UserError):
    """A plan was made for other weights."""
