"""The errors a user sees: every class whose message is the whole story.

A :class:`MertError`'s message names the file, field or option, shows what was
expected and what was found, and says what to do; the CLI prints it as one line
(``Error: ...``) and exits with its :attr:`~MertError.exit_code`: 2 for bad input
(:class:`BadInputError`: options, config fields, plugin names, data folders,
damaged or malformed files), 1 for a failure while running (diverged training, a
fit that made its teacher worse). Anything else that escapes (a plain
``ValueError``, ``KeyError``, ``RuntimeError``) is a bug and keeps its traceback.

Each class also subclasses the built-in exception it always was (``ValueError``
or ``RuntimeError``), so ``except ValueError`` around the Python API keeps
working; the modules that raise them re-export them under their old names
(``mert_core.checkpoint.CheckpointError`` and so on). A plugin raises these too
(or subclasses them) for its own user-facing errors.

This module is a leaf: it imports nothing of ``mert_core``.
"""

from __future__ import annotations

from typing import ClassVar


class MertError(Exception):
    """Base of every user-facing error: one line in the CLI, exit code :attr:`exit_code`."""

    exit_code: ClassVar[int] = 1
    """1: a failure while running; 2 (:class:`BadInputError`): bad input."""


class BadInputError(MertError, ValueError):
    """Bad input a user has to fix (an option, a flag, a field, a file): exit code 2."""

    exit_code: ClassVar[int] = 2


# -- bad input (exit code 2) -------------------------------------------------------


class ConfigError(BadInputError):
    """A bad config field, file, flag or override; the message names it."""


class PluginError(BadInputError):
    """A plugin problem a user can act on (duplicate name, unknown name, bad options)."""


class DataError(BadInputError):
    """A data problem the user has to fix (missing folder, malformed manifest, no usable files)."""


class TaskDataError(BadInputError):
    """A dataset folder that is missing or not in the expected layout.

    The message names the path, what was expected there and what to do.
    """


class CheckpointError(BadInputError):
    """A checkpoint that cannot be used, with the path and what to do."""


class RunFolderTaken(BadInputError):
    """A new run was asked for in a folder that holds another run's files."""


class HFConversionError(BadInputError):
    """The folder or state dict is not a HuBERT model this student can hold."""


class LabelStoreError(BadInputError):
    """A label store that cannot serve a request: file not labelled or changed,
    crop off the grid, frame counts that disagree, or a damaged store."""


class LabelStoreMismatch(LabelStoreError):
    """A label store made by another teacher configuration or window size."""


class ScaffoldError(BadInputError):
    """A plugin name or output folder that cannot be used; the message says why."""


class ShardError(BadInputError):
    """A shard corpus that cannot be used: nothing at the address, a malformed index, a bad pattern."""


class StreamError(BadInputError):
    """Settings or a saved state the stream cannot work with; the message says what to change."""


class InitFromError(ConfigError):
    """``model.init_from`` cannot start this run; the message names the tensor or argument."""


class TeacherFileError(ConfigError):
    """A fitted teacher file that is missing, unreadable or does not fit the options
    (a bad ``teacher_file`` option: the CLI reports it in one line with exit code 2)."""


# -- failures while running (exit code 1) ------------------------------------------


class AudioError(MertError, ValueError):
    """A file that cannot be used: unreadable, empty, truncated, a corrupt
    header, or samples that are not finite or far outside [-1, 1]."""


class ExportError(MertError, ValueError):
    """The source cannot be exported; the message says why and what to do."""


class TrainingError(MertError, RuntimeError):
    """The run cannot go on; the message says why and what was saved."""


class TargetLengthError(MertError, ValueError):
    """A teacher's targets do not line up with the student's frames."""


class RunFolderBusy(MertError, RuntimeError):
    """Another process is writing into the same run folder."""


class FitDiverged(MertError, RuntimeError):
    """A fit ended with a worse or non-finite quality than it started with; nothing was written."""


class FitError(MertError, ValueError):
    """A fit that cannot run: too little audio for what the options ask, nothing readable to fit on."""


class MissingTeacherFile(MertError, ValueError):
    """A teacher that must be fitted was given no fitted file."""


class NotFittedError(MertError, ValueError):
    """Targets were asked of a teacher that has no fitted state yet."""


class NonFiniteFeatures(MertError, RuntimeError):
    """An upstream made NaN or infinite features; the message names it, the layer and the file."""
