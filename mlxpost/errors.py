"""Exceptions that end a command with a given exit status (DESIGN.md's exit statuses).

The library raises these; only the command layer (mlxpost/cli.py) turns them
into a one-line message on stderr and the exit status below.
"""


class MlxpostError(Exception):
    """An expected way for a command to end: one clear line, no traceback."""

    exit_code = 1


class UserError(MlxpostError):
    """Bad input named precisely (file, line, column or option): exit status 2."""

    exit_code = 2


class NonFiniteError(MlxpostError):
    """Training met NaN or inf values and stopped before writing any of them: exit status 3."""

    exit_code = 3


class Interrupted(MlxpostError):
    """Ctrl-C (SIGINT): exit status 130, saying how to continue where that makes sense."""

    exit_code = 130


def first_line(err: BaseException) -> str:
    """An exception's message condensed to its first non-empty line (or its type), for the
    one-line errors of a third-party library's multi-line report."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
