"""The error the command line shows as one line: :class:`UserError` (a mistake in what the user
asked for) and :func:`as_user_error`, which turns a ``ValueError`` raised while checking user
input into one (:func:`keywords_as_user_error` also a ``TypeError`` raised by a keyword value the
user gave). Core: every layer may raise it; the command line catches it (exit status 2)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["UserError", "as_user_error", "keywords_as_user_error"]


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


def keywords_as_user_error(what: str, keywords: Mapping[str, Mapping[str, Any]], fn: Any,
                           *args: Any, **kwargs: Any) -> Any:
    """:func:`as_user_error` for a constructor that receives the user's keywords: ``keywords``
    maps the config field they came from to them (``{"loss_kwargs": {"temperature": "abc"}}``).
    When any was given, a ``TypeError`` (a keyword of the wrong type, or one the constructor
    does not take) is the user's mistake too: a :class:`UserError` prefixed with ``what`` that
    names the config key (``loss_kwargs.temperature``) of the keyword the message names, or
    else every keyword given. Without user keywords a ``TypeError`` is an internal error and
    keeps its traceback."""
    try:
        return as_user_error(what, fn, *args, **kwargs)
    except TypeError as exc:
        given = {f"{field}.{key}": value for field, kw in keywords.items()
                 for key, value in (kw or {}).items()}
        if not given:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        named = {name: value for name, value in given.items()
                 if re.search(rf"\b{re.escape(name.rsplit('.', 1)[-1])}\b", text)}
        keys = ", ".join(f"{name}={value!r}" for name, value in (named or given).items())
        raise UserError(f"{what}: {text} ({'' if named else 'the keywords given: '}{keys}); "
                        "check the keyword's name and the type of its value") from exc
