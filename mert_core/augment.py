"""The augmentation contract.

Augmentations run on the training device *after* every teacher has made its
targets from the clean audio: the trainer guarantees that order for every
augmentation, built-in or third-party, so an augmentation can never leak into
the targets.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class AugmentOptions(BaseModel):
    """Base class of an augmentation's options. Subclasses describe every field."""

    model_config = ConfigDict(extra="forbid")


class Augmentation(torch.nn.Module):
    """Base class of augmentations.

    Args:
        options: a validated instance of ``self.Options``.
        sample_rate: sample rate of the waveforms.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[AugmentOptions]] = AugmentOptions

    def __init__(self, options: AugmentOptions, sample_rate: int = 24000) -> None:
        super().__init__()
        self.options = options
        self.sample_rate = sample_rate

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch.

        Args:
            wave: ``(B, S)`` clean waveforms.
            lengths: ``(B,)`` valid samples per clip (the rest is padding).
            generator: seeded generator on ``wave.device``; use it for every
                random draw so that runs are reproducible and resumable.

        Returns:
            ``(B, S)`` augmented waveforms; padding stays zero.
        """
        raise NotImplementedError
