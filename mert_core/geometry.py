"""Frame geometry: how many frames come from how many samples, on two grids.

One fact, one place, and two ideas kept apart:

* the **student's frames** (:class:`FrameGeometry`, ``student.geometry``): its
  conv stack reads 24 kHz audio with a hop of 320 samples (75 Hz) and a
  receptive field that depends on the preset: 400 samples for the MERT paper's
  stack (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2), 1840 for the ``cpu``
  presets' front end; frame ``t`` sees samples ``[t * hop, t * hop + receptive_field)``.
* the **target grid** (:attr:`FrameGeometry.target_grid`): the frames targets
  are made on. Every teacher that does not follow the student frames audio on
  the paper's grid (400-sample frames at ``t * hop``) whatever the student, and
  the trainer and the label store shift those targets onto the student's frames
  by :meth:`FrameGeometry.shift_from` (``lead_frames`` dropped at the start,
  ``trailing_frames`` accepted at the end).

A student reports its own geometry; teachers, label stores and probes read it
from there instead of restating the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

def frames_for(num_samples, hop_samples: int, receptive_field: int):
    """``floor((S - receptive_field) / hop) + 1`` frames, 0 when ``S < receptive_field``.

    For a stack of unpadded convolutions this equals applying each layer's
    ``floor((L - kernel) / stride) + 1`` in turn (nested floors of integer
    divisions compose), so it is exact for the student.

    Args:
        num_samples: an int, or an integer tensor or numpy array of any shape.
    """
    if isinstance(num_samples, torch.Tensor):
        return (torch.div(num_samples - receptive_field, hop_samples, rounding_mode="floor") + 1).clamp(min=0)
    if isinstance(num_samples, np.ndarray):
        return np.maximum((num_samples - receptive_field) // hop_samples + 1, 0)
    return max(0, (int(num_samples) - receptive_field) // hop_samples + 1)


@dataclass(frozen=True)
class GridShift:
    """How targets made on one grid line up with a student's frames.

    Attributes:
        lead_frames: targets before the student's first frame, dropped.
        trailing_frames: targets past the student's last frame beyond the one
            frame of slack every teacher has, accepted and dropped.
    """

    lead_frames: int = 0
    trailing_frames: int = 0


@dataclass(frozen=True)
class FrameGeometry:
    """A framing of audio: a student's frames, or the grid targets are made on.

    Attributes:
        sample_rate: of the audio (24000).
        hop_samples: samples between frames: the product of the conv strides (320).
        receptive_field: samples one frame sees (400 for the paper's stack, 1840
            for the ``cpu`` presets); shorter input gives no frame.
    """

    sample_rate: int = 24000
    hop_samples: int = 320
    receptive_field: int = 400

    def __post_init__(self) -> None:
        if self.sample_rate < 1 or self.hop_samples < 1 or self.receptive_field < 1:
            raise ValueError(f"FrameGeometry needs positive sample_rate, hop_samples and receptive_field, got {self}")

    @property
    def frame_rate_hz(self) -> float:
        """Frames per second (75.0 at 24 kHz with hop 320)."""
        return self.sample_rate / self.hop_samples

    @property
    def target_grid(self) -> FrameGeometry:
        """The grid targets are made on for this student: its sample rate and hop,
        the paper's 400-sample frames (what :attr:`Teacher.grid <mert_core.teacher.Teacher.grid>`
        is for every teacher that does not follow the student)."""
        return FrameGeometry(self.sample_rate, self.hop_samples, receptive_field=400)

    def shift_from(self, grid: FrameGeometry) -> GridShift:
        """How targets made on ``grid`` (same rate and hop) line up with these frames.

        Frame ``t`` of ``grid`` reads its ``grid.receptive_field`` samples from
        ``t * hop`` (the k-means features are centred there, the CQT on
        ``t * hop``), so a longer receptive field puts this student's frame ``t``
        ``(receptive_field - grid.receptive_field) / 2`` samples later: the
        leading targets are dropped (0 on the paper's stack, 2 frames for the
        ``cpu`` presets' 1840 samples on the paper's grid; 0 for a teacher on
        the student's own frames), and the trailing ones past its last frame
        are accepted.
        """
        if (grid.sample_rate, grid.hop_samples) != (self.sample_rate, self.hop_samples):
            raise ValueError(f"targets on {grid} cannot be shifted onto {self}: sample rate and hop must agree")
        extra = self.receptive_field - grid.receptive_field
        lead = max(0, round(extra / (2 * self.hop_samples)))
        return GridShift(lead, max(0, math.ceil(extra / self.hop_samples) - lead))

    @property
    def lead_frames(self) -> int:
        """Targets of the :attr:`target_grid` to drop before this student's first frame
        (``shift_from(target_grid).lead_frames``: 0 for the paper's stack, 2 for ``cpu``'s)."""
        return self.shift_from(self.target_grid).lead_frames

    @property
    def lead_samples(self) -> int:
        """``lead_frames`` in samples: the silence that puts this student's frame ``t`` at
        ``t * hop`` like the paper's (``mert extract`` leads every file with it; 640 for ``cpu``)."""
        return self.lead_frames * self.hop_samples

    @property
    def trailing_frames(self) -> int:
        """Targets of the :attr:`target_grid` past this student's last frame, beyond the one
        frame of slack every teacher has (0 for the paper's stack, 3 for ``cpu``'s)."""
        return self.shift_from(self.target_grid).trailing_frames

    def num_frames(self, num_samples):
        """Frames for ``num_samples`` samples (an int, integer tensor or array); see :func:`frames_for`."""
        return frames_for(num_samples, self.hop_samples, self.receptive_field)


STUDENT_GEOMETRY = FrameGeometry()
"""The frames of a student with the paper's conv stack (24 kHz, hop 320, receptive field 400:
the ``tiny``, ``small``, ``95m`` and ``330m`` presets; not ``cpu`` and ``cpu-small``).

A default for code that runs without a student (a teacher built on its own, a
label store written ahead of training); a run reads ``student.geometry``.
"""

TARGET_GRID = STUDENT_GEOMETRY.target_grid
"""The grid targets are made on at 24 kHz: 400-sample frames every 320 samples, for every student."""
