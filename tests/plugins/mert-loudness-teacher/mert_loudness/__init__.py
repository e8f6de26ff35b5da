"""A third-party mert teacher: per-frame loudness (log RMS energy) in bands.

Written exactly as a plugin outside the mert repository would be.
"""

import torch
from pydantic import Field

from mert_core.hookspecs import hookimpl
from mert_core.teacher import TargetSpec, Teacher, TeacherOptions


class LoudnessOptions(TeacherOptions):
    floor_db: float = Field(-80.0, description="Energies below this level (dB) are clipped to it.")


class LoudnessTeacher(Teacher):
    """Frame log-energy of the clean audio, one value per student frame."""

    name = "loudness"
    description = "Per-frame loudness in dB (example third-party teacher)"
    Options = LoudnessOptions

    def target_spec(self) -> TargetSpec:
        return TargetSpec(kind="continuous", dim=1, frame_rate_hz=self.frame_rate_hz)

    @torch.no_grad()
    def targets(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # frames of 400 samples every hop, like the student's receptive field
        frames = wave.float().unfold(-1, 400, self.hop_samples)  # B, T, 400
        power = frames.pow(2).mean(-1).clamp(min=1e-12)
        db = (10 * torch.log10(power)).clamp(min=self.options.floor_db)
        return (db / 20.0).unsqueeze(-1)  # B, T, 1, roughly unit scale


@hookimpl
def register_teachers(register):
    register(LoudnessTeacher)
