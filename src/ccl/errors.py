"""The errors `ccl` raises on purpose: one base class, `CclError`, for everything a user can fix.

Each subclass also derives from the built-in exception that older code caught (`ValueError`, `TypeError`,
`RuntimeError`, `ImportError`), so `except ValueError` keeps working. The command line prints a `CclError` as
one line naming what is wrong (exit code 2) and lets anything else, a bug, show its traceback; `--debug` shows
the traceback of every error.
"""

from __future__ import annotations

__all__ = [
    "CclError",
    "ConfigError",
    "DataError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "MissingDependencyError",
    "RunDirectoryError",
    "RunLockedError",
    "TrainingError",
]


class CclError(Exception):
    """Base class of every error whose message tells the user what to change."""


class InvalidArgumentError(CclError, ValueError):
    """An argument has a valid type but a bad value; the message names the argument, the value and what is
    expected."""


class InvalidArgumentTypeError(CclError, TypeError):
    """An argument has the wrong type; the message names the argument, the value and what is expected."""


class ConfigError(CclError, ValueError):
    """A configuration value or key is invalid; the message says which and what is expected."""


class DataError(CclError, ValueError):
    """A dataset file is missing, corrupt or not in the expected format."""


class RunDirectoryError(CclError, ValueError):
    """The run directory is missing, incomplete, corrupt, or would be overwritten or mixed with another run."""


class RunLockedError(RunDirectoryError):
    """Another live process holds the run directory (or a model of a shared cache)."""


class TrainingError(CclError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss or weights); the message names the epoch and batch."""


class MissingDependencyError(CclError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""
