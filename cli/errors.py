"""Turning known errors into one-line messages instead of tracebacks.

Bad input (options, config fields, plugin names, data folders, damaged or
malformed files) exits with code 2 and one line, ``Error: ...``, naming the
file or field; problems met while running (diverged training, a full disk)
exit 1. Which errors those are is declared in :mod:`mert_core.errors`; any
other exception is a bug and keeps its traceback. Set MERT_DEBUG=1 to see the
traceback of a one-line error too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from typing import Iterator

import click
from pydantic import ValidationError

from mert_core.config import format_validation_error
from mert_core.errors import MertError


class InputError(click.UsageError):
    """Bad input: exit code 2 like a usage error, but one line without the usage banner
    (the message names the file or field; the banner would only push it down)."""

    show = click.ClickException.show


def one_line(exc: BaseException) -> click.ClickException | None:
    """The one-line CLI error for ``exc``, or None for an unexpected error (a bug: keep its traceback).

    One line for the user-facing errors of :mod:`mert_core.errors` (exit 2 for bad input, 1 for a
    failure while running), a config that does not validate, and an operating-system error (a file
    that cannot be opened, a full disk); a plain ``ValueError``, ``KeyError`` or ``RuntimeError`` is
    a bug and keeps its traceback.
    """
    if isinstance(exc, ValidationError):
        return InputError(format_validation_error(exc))
    if isinstance(exc, MertError):
        return InputError(str(exc)) if exc.exit_code == 2 else click.ClickException(str(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return click.ClickException(f"no space left on device{where}; free some space and run again (earlier files are intact)")
    if isinstance(exc, OSError):
        return click.ClickException(str(exc))
    return None


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn what the block raises into the one-line error of :func:`one_line`
    (unexpected errors, and every error under ``MERT_DEBUG=1``, keep their traceback)."""
    try:
        yield
    except InputError as exc:
        if os.environ.get("MERT_DEBUG") and exc.__cause__ is not None:
            raise exc.__cause__  # the input error behind it, with its traceback
        raise
    except click.UsageError as exc:  # click's own (missing option, bad choice): one line too, with where to look
        where = f" (see `{exc.ctx.command_path} -h`)" if exc.ctx is not None else ""
        raise InputError(exc.format_message() + where) from None
    except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
        raise
    except Exception as exc:  # noqa: BLE001 - the user-facing errors become one line, the rest re-raised
        if os.environ.get("MERT_DEBUG"):
            raise
        error = one_line(exc)
        if error is None:
            raise
        raise error from None


def usage_errors(fn):
    """:func:`one_line_errors` for a command that may run on its own, outside the ``mert`` group."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_line_errors():
            return fn(*args, **kwargs)

    return wrapper


class ErrorHandlingGroup(click.Group):
    """A group whose commands fail with one line (see :func:`one_line_errors`)."""

    def invoke(self, ctx):
        with one_line_errors():
            return super().invoke(ctx)
