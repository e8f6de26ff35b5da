"""Normalised, stacked log-mel frames: the input of the ``best-rq`` and ``mel-rvq`` teachers.

MusicFM (Won et al., ICASSP 2024) and MuQ (Zhu et al., 2025) both quantise
log-mel frames standardised with per-bin mean and std measured on the training
data, several frames stacked into one vector. Here the frames are the
student's (75 Hz, :class:`LogMelFeatures` centres each window on a student
frame), and frame ``t`` is stacked with its neighbours ``t - (k - 1) // 2 ...
t + k // 2`` so the targets keep the student's rate (MusicFM instead folds 4
frames of 100 Hz into one 25 Hz token: its student runs at 25 Hz). At the
edges of a clip the first and last frames are repeated.

Both teachers are fitted (:func:`measure_mel_stats` at least) into one
self-describing safetensors file, read back with
:func:`mert_core.fitting.read_teacher_file`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mert_core.fitting import FitQuality, FittedTeacherOptions, SamplePlan, measure_frame_stats, plan_sample, write_teacher_file
from mert_plugins.teachers._features import FrameFeatures, LogMelFeatures

log = logging.getLogger("mert.teachers.mel")


class StackedMelOptions(FittedTeacherOptions):
    """Options shared by the teachers that quantise normalised, stacked log-mel frames (fitted: ``teacher_file``)."""

    n_mels: int = Field(128, ge=1, description="Mel bands (MusicFM and MuQ: 128).")
    n_fft: int = Field(2048, ge=400, description="STFT window (hann) centred on each student frame (MusicFM and MuQ: 2048 at 24 kHz).")
    stack_frames: int = Field(4, ge=1, description="Frames stacked into one vector: t - (k-1)//2 ... t + k//2 (BEST-RQ and MusicFM stack 4).")
    seed: int | None = Field(None, description="Seed of the fit sample and of the random parts; None: the seed passed to fit() (the run's seed).")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of the audio to fit on, drawn at random in chunks (seeded).")
    sample_hours: float | None = Field(10.0, gt=0, description="Upper bound on the hours of audio to fit on; None: no bound beyond sample_fraction.")
    chunk_seconds: float = Field(5.0, gt=0, description="The fit sample is drawn as chunks of this length (5 s = the training crop).")
    batch_size: int = Field(16, ge=1, description="Chunks per feature batch while fitting.")


MEL_FIT_FIELDS = frozenset({"teacher_file", "seed", "sample_fraction", "sample_hours", "chunk_seconds", "batch_size"})
"""Options that only steer which audio the fit reads; the seed actually used is recorded separately."""


def stack_frames(x: torch.Tensor, k: int) -> torch.Tensor:
    """Stack each frame with its neighbours, edges repeated.

    Args:
        x: ``(B, T, D)`` frames, ``T >= 1``.
        k: frames per stack; frame ``t`` gets ``t - (k - 1) // 2 ... t + k // 2``.

    Returns:
        ``(B, T, k * D)``, the earliest frame's ``D`` values first.
    """
    if k == 1:
        return x
    before, after = (k - 1) // 2, k // 2
    padded = F.pad(x.transpose(1, 2), (before, after), mode="replicate")  # B, D, T + k - 1
    windows = padded.unfold(2, k, 1)  # B, D, T, k
    return windows.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[1], k * x.shape[2])


class NormalisedMelStack(FrameFeatures):
    """Log-mel frames at the student's rate, standardised per bin, stacked.

    Args:
        sample_rate: waveform rate.
        hop_samples: student hop.
        n_mels: mel bands.
        n_fft: analysis window.
        stack: frames per stacked vector.
    """

    def __init__(self, sample_rate: int, hop_samples: int, n_mels: int, n_fft: int, stack: int):
        super().__init__(hop_samples)
        self.logmel = LogMelFeatures(sample_rate, hop_samples, n_mels=n_mels, n_fft=n_fft)
        self.stack = stack
        self.dim = n_mels * stack
        self.register_buffer("bin_mean", torch.zeros(n_mels))
        self.register_buffer("bin_std", torch.ones(n_mels))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Use per-bin ``(n_mels,)`` mean and std."""
        self.bin_mean.copy_(mean)
        self.bin_std.copy_(std)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` -> ``(B, T, n_mels * stack)`` float32, ``T`` the student's frame count."""
        # labels are argmins: reduced precision would flip near-ties between online and stored labels
        with torch.autocast(wave.device.type, enabled=False):
            mel = self.logmel(wave)  # B, T, n_mels
            if mel.shape[1] == 0:
                return self.empty(wave)
            return stack_frames((mel - self.bin_mean) / self.bin_std, self.stack)


def measure_mel_stats(
    logmel: LogMelFeatures, plan: SamplePlan, sample_rate: int, batch_size: int, device: torch.device, name: str, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, str]]:
    """Per-bin mean and std of log-mel frames over the chunks of ``plan``.

    Returns:
        ``(mean, std, frames, failures)``: ``(n_mels,)`` float32 each (std at
        least 1e-5), the frames measured, and the files that failed to decode.

    Raises:
        ValueError: fewer than 2 frames could be read.
    """
    return measure_frame_stats(logmel, plan, sample_rate, batch_size, device, f"{name}: mel", progress, min_std=1e-5)


def fit_sample(options: StackedMelOptions, files: list[Path], sample_rate: int, seed: int, progress: bool) -> SamplePlan:
    """The seeded sample of chunks a fit reads (see :func:`plan_sample`)."""
    return plan_sample(files, sample_rate, options.chunk_seconds, options.sample_fraction, options.sample_hours, seed, progress)


def save_artifact(out_file: Path, artifact_format: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  quality: Iterable[FitQuality] = ()) -> Path:
    """Write ``tensors`` (as float32) with JSON ``meta`` atomically, unless a ``quality`` the fit
    measured ended worse than it started (see :func:`mert_core.fitting.write_teacher_file`)."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    return write_teacher_file(Path(out_file), tensors, artifact_format, meta, quality, meta["teacher"])


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first buffer or parameter (CPU when it has none)."""
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
