"""Exception types raised by the library.

The CLI maps each to a one-line message on stderr and an exit code; library code never prints.
"""

from __future__ import annotations


class AlignprogError(Exception):
    """Base class of every error alignprog raises on purpose (bad input, bad config)."""

    exit_code = 1


class ConfigError(AlignprogError):
    """A setting is unknown, mistyped or out of range."""

    exit_code = 2


class DataError(AlignprogError):
    """A dataset file is missing or malformed.

    The message always names the file and, where known, the task and handle, so that one line is
    enough to find the problem.
    """

    def __init__(self, what: str, *, file: str | None = None, task: str | None = None,
                 handle: str | None = None) -> None:
        self.what = what
        self.file = file
        self.task = task
        self.handle = handle
        super().__init__(format_location(file, task, handle) + what)


def format_location(file: str | None, task: str | None, handle: str | None) -> str:
    """`file: task 'T', handle 'H': ` with the parts that are known."""
    parts = []
    if file:
        parts.append(str(file))
    where = []
    if task is not None:
        where.append(f"task '{task}'")
    if handle is not None:
        where.append(f"handle '{handle}'")
    if where:
        parts.append(", ".join(where))
    return "".join(p + ": " for p in parts)
