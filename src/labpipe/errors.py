"""The project's own error types: a mistake in what the user gave us, not a bug.

The CLI turns these (and only these, plus OSError on a named path) into one line and a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a param, a file, a state on disk): one line that names the key or file."""

    exit_code = 2


class InputError(UserError, ValueError):
    """An input file or value that the stage cannot use (ValueError too, for callers that catch that)."""


class Terminated(BaseException):
    """SIGTERM (Slurm's scancel, docker stop, kill): unwinds like an interrupt, so the MLflow run is marked
    KILLED, staged outputs are dropped and locks released; a BaseException, so no `except Exception` eats it."""


class BusyError(UserError):
    """The output folder is in use by another run."""

    exit_code = 1
