"""The error the command line shows as one line: :class:`UserError` (a mistake in what the user
asked for) and :func:`as_user_error`, which turns a ``ValueError`` raised while checking user
input into one. Core: every layer may raise it; the command line catches it (exit status 2)."""

from __future__ import annotations

from typing import Any

__all__ = ["UserError", "as_user_error"]


class UserError(ValueError):
    """A mistake in what the user asked for (a value, a name, a path, a folder in use). The
    command line prints it as one ``error:`` line and exits with status 2. It is a
    ``ValueError`` so that Python callers can catch bad input the usual way."""


def as_user_error(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` on what the user gave: its ``ValueError`` or missing file is
    the user's mistake and is raised as a :class:`UserError` prefixed with ``what`` (which input).
    Used only where user input is being checked, so internal errors keep their traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        raise UserError(f"{what}: {exc}") from exc
