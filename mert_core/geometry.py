"""Frame geometry: how many frames the student makes from how many samples.

One fact, one place. The student's conv stack (kernels 10,3,3,3,3,2,2,
strides 5,2,2,2,2,2,2 in the MERT paper's configuration) reads 24 kHz audio
with a hop of 320 samples (75 Hz) and a receptive field of 400 samples; frame
``t`` sees samples ``[t * hop, t * hop + receptive_field)``. (The ``cpu``
preset's front end keeps the hop and sees 1840 samples; teachers' targets are
shifted onto its frames by :attr:`FrameGeometry.lead_frames`.) A student reports
its own :class:`FrameGeometry` (``student.geometry``); teachers, label stores
and probes read it from there instead of restating the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

PAPER_RECEPTIVE_FIELD = 400
"""Samples one frame of the MERT paper's conv stack sees: the grid every teacher frames audio on."""


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
class FrameGeometry:
    """The student's framing of audio.

    Attributes:
        sample_rate: of the audio the student reads (24000).
        hop_samples: samples between frames: the product of the conv strides (320).
        receptive_field: samples one frame sees (400); shorter input gives no frame.
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
    def lead_frames(self) -> int:
        """Target frames to drop before this student's first frame.

        Teachers frame audio on the paper student's grid: frame ``t`` reads the
        400 samples from ``t * hop`` (the k-means features are centred there, the
        CQT on ``t * hop``), so a receptive field longer than 400 samples puts the
        student's frame ``t`` ``(receptive_field - 400) / 2`` samples later: 0 for
        the paper's stack, 2 frames for the ``cpu`` preset's 1840 samples. The
        trainer and the label store drop these frames (``teacher.follows_student``
        teachers are exempt: they frame audio with the student itself).
        """
        return max(0, round((self.receptive_field - PAPER_RECEPTIVE_FIELD) / (2 * self.hop_samples)))

    @property
    def lead_samples(self) -> int:
        """``lead_frames`` in samples: the silence that puts this student's frame ``t`` at
        ``t * hop`` like the paper's (``mert extract`` leads every file with it; 640 for ``cpu``)."""
        return self.lead_frames * self.hop_samples

    @property
    def trailing_frames(self) -> int:
        """Target frames past this student's last frame, beyond the one frame of
        slack every teacher has (0 for the paper's stack, 3 for ``cpu``'s)."""
        return max(0, math.ceil((self.receptive_field - PAPER_RECEPTIVE_FIELD) / self.hop_samples) - self.lead_frames)

    def num_frames(self, num_samples):
        """Frames for ``num_samples`` samples (an int, integer tensor or array); see :func:`frames_for`."""
        return frames_for(num_samples, self.hop_samples, self.receptive_field)


STUDENT_GEOMETRY = FrameGeometry()
"""The geometry of every preset student (24 kHz, hop 320, receptive field 400).

A default for code that runs without a student (a teacher built on its own, a
label store written ahead of training); a run reads ``student.geometry``.
"""
