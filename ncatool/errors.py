"""User-facing errors.

Every problem caused by the user's input (a bad file, a bad option, an inconsistent dataset) is raised
as :class:`NcaError`. The CLI turns it into one line on stderr and exit code 2; nothing else in the
package should print tracebacks for user mistakes. Never use ``assert`` for user input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: Exit code for user errors (bad input, bad options), as click uses for usage errors.
USER_ERROR_EXIT_CODE = 2


class NcaError(Exception):
    """An error caused by user input; the message names the file (if any) and what is wrong.

    Args:
        message: What is wrong, and where possible the expected versus the actual value.
        path: The file or folder concerned; prefixed to the message when given.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class ValidationError(NcaError):
    """Several problems collected over a whole dataset, reported together.

    Args:
        problems: One human-readable line per problem, each naming its file.
        summary: A one-line headline, e.g. ``"3 of 10 pairs are invalid"``.
    """

    def __init__(self, problems: Sequence[str], summary: str) -> None:
        self.problems = list(problems)
        lines = [summary, *(f"  - {p}" for p in self.problems)]
        super().__init__("\n".join(lines))
