"""The teacher contract: what a plugin implements to make training targets.

A teacher turns a batch of clean 24 kHz waveforms into per-frame targets at the
student's frame rate. It declares those targets with a :class:`TargetSpec`;
the core builds the prediction head and the loss from that declaration, so a
teacher never touches the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

IGNORE_LABEL = -1
"""Discrete label value meaning "no target here" (e.g. codebooks not drawn this batch)."""


class TeacherOptions(BaseModel):
    """Base class of a teacher's options. Subclasses describe every field."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TargetSpec:
    """What a teacher produces, per student frame.

    Attributes:
        kind: ``"discrete"`` (class labels, cross-entropy) or ``"continuous"``
            (a vector, mean squared error).
        num_codebooks: discrete only: how many label streams (8 for EnCodec).
        num_classes: discrete only: classes per codebook (K).
        dim: continuous only: size of the target vector (336 for the CQT).
        frame_rate_hz: rate of the targets; must equal the student's.
        default_weight: weight of this teacher's loss in the total when the
            config gives none (MERT: acoustic alpha=1, musical 1).
    """

    kind: Literal["discrete", "continuous"]
    frame_rate_hz: float
    num_codebooks: int = 1
    num_classes: int = 0
    dim: int = 0
    default_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind == "discrete" and (self.num_codebooks < 1 or self.num_classes < 2):
            raise ValueError(
                f"discrete TargetSpec needs num_codebooks >= 1 and num_classes >= 2, "
                f"got {self.num_codebooks} and {self.num_classes}"
            )
        if self.kind == "continuous" and self.dim < 1:
            raise ValueError(f"continuous TargetSpec needs dim >= 1, got {self.dim}")


class Teacher(torch.nn.Module):
    """Base class of all teachers.

    Subclasses set ``name``, ``description`` and ``Options`` and implement
    :meth:`target_spec` and :meth:`targets`. Teachers are ``nn.Module`` s so
    that ``.to(device)`` moves their buffers (filters, centroids, codecs); they
    are never trained by the student's optimizer.

    Args:
        options: a validated instance of ``self.Options``.
        sample_rate: sample rate of the waveforms handed to :meth:`targets`.
        hop_samples: the student's hop (320 at 24 kHz = 75 Hz).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[TeacherOptions]] = TeacherOptions

    def __init__(self, options: TeacherOptions, sample_rate: int = 24000, hop_samples: int = 320) -> None:
        super().__init__()
        self.options = options
        self.sample_rate = sample_rate
        self.hop_samples = hop_samples

    @property
    def frame_rate_hz(self) -> float:
        """The student's frame rate, which targets must match (75 Hz)."""
        return self.sample_rate / self.hop_samples

    def target_spec(self) -> TargetSpec:
        """Declare the targets (kind, size, frame rate)."""
        raise NotImplementedError

    @torch.no_grad()
    def targets(self, wave: torch.Tensor) -> torch.Tensor:
        """Make targets from clean audio.

        Args:
            wave: ``(B, S)`` float waveforms at ``sample_rate``.

        Returns:
            discrete: ``(B, T, num_codebooks)`` int64 labels (``IGNORE_LABEL``
            where there is no target); continuous: ``(B, T, dim)`` float32.
            ``T`` is within one frame of the student's ``S // hop_samples``.
        """
        raise NotImplementedError

    # -- optional: offline label stores ----------------------------------------

    @torch.no_grad()
    def store_targets(self, wave: torch.Tensor) -> torch.Tensor:
        """What an offline label store saves for ``wave``: by default the
        targets themselves. A teacher whose targets vary per batch (one random
        codebook) stores the full labels and selects in :meth:`targets_from_store`."""
        return self.targets(wave)

    def targets_from_store(self, labels: torch.Tensor) -> torch.Tensor:
        """Turn stored labels ``(B, T, C)`` into this batch's targets (default: as stored)."""
        return labels

    # -- optional: teachers that must be fitted before use (k-means) ----------

    # Convention: a teacher that needs fitting takes its fitted artifact through
    # an option named ``teacher_file``. After ``mert train`` fits one, it writes
    # the artifact's path into the run config, so checkpoints are self-contained
    # and a resumed run loads the artifact instead of refitting.

    def needs_fit(self) -> bool:
        """True when the teacher cannot make targets until :meth:`fit` has run."""
        return False

    def fit(self, files: list[Path], out_file: Path, seed: int = 0) -> Path:
        """Fit the teacher on audio ``files`` and save it to ``out_file``."""
        raise NotImplementedError(f"teacher {self.name!r} has nothing to fit")

    def fit_plan(self, files: list[Path], seed: int = 0, device: str | torch.device | None = None) -> str:
        """One line saying what :meth:`fit` will read and about how long it will take ("" when unknown)."""
        return ""

    def config_hash(self) -> str:
        """A short hash identifying everything that determines the targets
        (options, fitted state). Offline label stores are keyed by it."""
        import hashlib

        payload = f"{self.name}|{self.sample_rate}|{self.hop_samples}|{self.options.model_dump_json()}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
