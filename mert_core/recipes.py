"""Recipes: named bundles of teachers, augmentations and hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Recipe:
    """A named partial training config.

    Attributes:
        name: what users type after ``--recipe``.
        description: one line.
        config: ``preset -> dict`` giving the partial ``TrainConfig`` (as plain
            data) for a model preset ("tiny", "cpu", "95m", "330m"). Values given on
            the command line or in a config file override it.
        default_preset: the preset used when none is given.
    """

    name: str
    description: str
    config: Callable[[str], dict[str, Any]] = field(default=lambda preset: {})
    default_preset: str = "95m"
