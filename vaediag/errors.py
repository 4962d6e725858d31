"""Errors that the command line turns into one line on stderr and exit code 2."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 120) -> str:
    """``"TypeName: the first line of its message"`` (cut to ``limit``), for one-line reports of
    errors from libraries whose messages run over several lines."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit]}" if text else type(exc).__name__


class UserError(Exception):
    """Something the user gave us is wrong: a path, a config value, a data file, a run dir.

    The message must be one line that says what is wrong and, where it helps, what to do.
    """


class ConfigError(UserError):
    """An unknown key, a wrong type or a value out of range in a config."""


class DataError(UserError):
    """A data source that cannot be used: missing, empty, unreadable or the wrong shape."""


class RunDirError(UserError):
    """A run directory that is missing, partial, corrupt, in use, or not ours to overwrite."""


class TrainingStopped(Exception):
    """Training stopped on purpose (non-finite policy ``stop``); the run dir holds the state."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
