"""The downstream-task contract (filled in by the evaluation machinery).

A task says where its audio and labels are, whether it is clip- or
frame-level, and how it is scored. See ``mert_core.evaluation`` for the
extract/probe engine that consumes it.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class TaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task:
    """Base class of downstream tasks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[TaskOptions]] = TaskOptions

    def __init__(self, options: TaskOptions):
        self.options = options
