"""Turning known errors into one-line messages instead of tracebacks.

Bad options, config fields and plugin names exit with code 2 (usage errors);
problems met while running (unreadable checkpoint, diverged training) exit 1.
Set MERT_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import os

import click
from pydantic import ValidationError

from mert_core.config import format_validation_error


def _usage_types():
    from mert_core.labels import LabelStoreMismatch
    from mert_core.registry import PluginError
    from mert_core.runconfig import ConfigError
    from mert_core.scaffold import ScaffoldError

    return (ConfigError, PluginError, LabelStoreMismatch, ScaffoldError)


class ErrorHandlingGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except click.exceptions.Abort:
            raise
        except ValidationError as exc:
            if os.environ.get("MERT_DEBUG"):
                raise
            raise click.UsageError(format_validation_error(exc)) from None
        except Exception as exc:  # noqa: BLE001 - everything else becomes one line
            if os.environ.get("MERT_DEBUG"):
                raise
            if isinstance(exc, _usage_types()):
                raise click.UsageError(str(exc)) from None
            if isinstance(exc, (ValueError, RuntimeError, OSError, KeyError)):
                raise click.ClickException(f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)) from None
            raise
