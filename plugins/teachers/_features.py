"""Frame-aligned acoustic features in torch, shared by fitting and labelling.

Every extractor here maps ``(B, S)`` waveforms to ``(B, T, D)`` features with
exactly the student's frame count ``T = floor((S - 400) / hop) + 1``: the
student's conv stack sees samples ``[t * hop, t * hop + 400)`` for frame ``t``,
so we centre an ``n_fft`` analysis window on the middle of that span (sample
``t * hop + 200``). Concretely the wave is zero-padded by ``(n_fft - 400) // 2``
on the left and the rest of ``n_fft - 400`` on the right, and the STFT runs
with ``center=False``. Zero padding (not reflection) keeps the features of a
window a function of that window's samples alone, whatever its length.

The same modules run when a k-means teacher is fitted (streamed, chunk by
chunk) and when it labels audio (online in the trainer or offline into a label
store), which is what makes online and offline labels identical.
"""

from __future__ import annotations

import librosa
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from mert_core.errors import ConfigError
from mert_core.geometry import TARGET_GRID

LOG_OFFSET = 1e-6
"""Added to mel energies before the log (torchaudio's MFCC uses the same)."""


def pad_for_frames(wave: torch.Tensor, n_fft: int) -> torch.Tensor:
    """Zero-pad ``(B, S)`` so an ``n_fft``-window, ``center=False`` STFT gives
    the student's frames, each window centred on its student frame."""
    if n_fft < TARGET_GRID.receptive_field:
        raise ConfigError(f"n_fft must be >= {TARGET_GRID.receptive_field} (one frame of the target grid), got {n_fft}")
    extra = n_fft - TARGET_GRID.receptive_field
    return F.pad(wave, (extra // 2, extra - extra // 2))


def _check_wave(wave: torch.Tensor) -> torch.Tensor:
    if wave.dim() != 2:
        raise ValueError(f"expected a (B, S) batch of waveforms, got shape {tuple(wave.shape)}")
    return wave.float()


class FrameFeatures(nn.Module):
    """Base of the extractors: ``forward((B, S)) -> (B, T, dim)``."""

    dim: int

    def __init__(self, hop_samples: int):
        super().__init__()
        self.hop_samples = hop_samples

    def empty(self, wave: torch.Tensor) -> torch.Tensor:
        return wave.new_zeros(wave.shape[0], 0, self.dim)


class PowerSpectrogram(nn.Module):
    """``|STFT|^2`` of frames centred on the student's frames (hann window).

    ``re^2 + im^2`` rather than ``abs().pow(2)``: the same values (to float
    rounding) without a square root per bin, 3x faster on CPU.
    """

    def __init__(self, n_fft: int, hop_samples: int):
        super().__init__()
        self.n_fft, self.hop_samples = n_fft, hop_samples
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` -> ``(B, T, n_fft // 2 + 1)``."""
        z = torch.stft(pad_for_frames(wave, self.n_fft), self.n_fft, self.hop_samples, window=self.window, center=False, return_complex=True)
        return (z.real.square() + z.imag.square()).transpose(1, 2)


def _mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """``(n_fft // 2 + 1, n_mels)`` Slaney-scale, Slaney-normalised mel filters (librosa's defaults)."""
    return torchaudio.functional.melscale_fbanks(
        n_freqs=n_fft // 2 + 1, f_min=0.0, f_max=sample_rate / 2, n_mels=n_mels, sample_rate=sample_rate, norm="slaney", mel_scale="slaney"
    )


class MFCCFeatures(FrameFeatures):
    """MFCC (log-mel, orthonormal DCT-II) plus delta and delta-delta.

    13 coefficients give 39 dims (MusicHuBERT's default), 20 give 60. Mel
    filters use the Slaney scale and norm (librosa's defaults), so the
    coefficients equal librosa's ``mfcc`` of ``log(mel + 1e-6)``; deltas are
    ``torchaudio.functional.compute_deltas`` over 5 frames.

    Args:
        sample_rate: waveform rate.
        hop_samples: student hop.
        n_mfcc: cepstral coefficients.
        n_mels: mel bands.
        n_fft: analysis window (hann).
        deltas: append delta and delta-delta.
    """

    def __init__(self, sample_rate: int, hop_samples: int, n_mfcc: int = 13, n_mels: int = 64, n_fft: int = 1024, deltas: bool = True):
        super().__init__(hop_samples)
        self.deltas = deltas
        self.dim = n_mfcc * (3 if deltas else 1)
        self.power = PowerSpectrogram(n_fft, hop_samples)
        self.register_buffer("mel_fb", _mel_filters(sample_rate, n_fft, n_mels), persistent=False)
        self.register_buffer("dct", torchaudio.functional.create_dct(n_mfcc, n_mels, norm="ortho"), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` -> ``(B, T, dim)``."""
        wave = _check_wave(wave)
        if wave.shape[1] < TARGET_GRID.receptive_field:  # no frame of the target grid
            return self.empty(wave)
        logmel = torch.log(self.power(wave) @ self.mel_fb + LOG_OFFSET)  # B, T, n_mels
        c = logmel @ self.dct  # B, T, n_mfcc
        if self.deltas:
            ct = c.transpose(1, 2)  # compute_deltas runs along the last axis
            d1 = torchaudio.functional.compute_deltas(ct, win_length=5)
            d2 = torchaudio.functional.compute_deltas(d1, win_length=5)
            c = torch.cat([ct, d1, d2], dim=1).transpose(1, 2)
        return c.contiguous()


class LogMelFeatures(FrameFeatures):
    """Log-mel energies ``log(mel + 1e-6)`` (power spectrum, Slaney mel filters).

    Args:
        sample_rate: waveform rate.
        hop_samples: student hop.
        n_mels: mel bands (= feature dims).
        n_fft: analysis window (hann).
    """

    def __init__(self, sample_rate: int, hop_samples: int, n_mels: int = 128, n_fft: int = 1024):
        super().__init__(hop_samples)
        self.dim = n_mels
        self.power = PowerSpectrogram(n_fft, hop_samples)
        self.register_buffer("mel_fb", _mel_filters(sample_rate, n_fft, n_mels), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` -> ``(B, T, n_mels)``."""
        wave = _check_wave(wave)
        if wave.shape[1] < TARGET_GRID.receptive_field:  # no frame of the target grid
            return self.empty(wave)
        return torch.log(self.power(wave) @ self.mel_fb + LOG_OFFSET)


class ChromaFeatures(FrameFeatures):
    """Chroma from the power STFT, each frame scaled to max 1 (librosa's ``chroma_stft``).

    The chroma filterbank is ``librosa.filters.chroma`` (tuning 0) turned into a
    buffer, so the result equals ``librosa.feature.chroma_stft(..., tuning=0)``
    on the same padded frames.

    Args:
        sample_rate: waveform rate.
        hop_samples: student hop.
        n_chroma: pitch classes.
        n_fft: analysis window (hann); 2048 at 24 kHz resolves 11.7 Hz bins.
    """

    def __init__(self, sample_rate: int, hop_samples: int, n_chroma: int = 12, n_fft: int = 2048):
        super().__init__(hop_samples)
        self.dim = n_chroma
        self.power = PowerSpectrogram(n_fft, hop_samples)
        fb = librosa.filters.chroma(sr=sample_rate, n_fft=n_fft, n_chroma=n_chroma, tuning=0.0)
        self.register_buffer("chroma_fb", torch.from_numpy(fb).float().T.contiguous(), persistent=False)  # n_fft // 2 + 1, n_chroma

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` -> ``(B, T, n_chroma)``."""
        wave = _check_wave(wave)
        if wave.shape[1] < TARGET_GRID.receptive_field:  # no frame of the target grid
            return self.empty(wave)
        chroma = self.power(wave) @ self.chroma_fb  # B, T, n_chroma
        # librosa.util.normalize(norm=inf): frames below the smallest normal float stay as they are
        peak = chroma.amax(dim=-1, keepdim=True)
        peak = torch.where(peak < torch.finfo(chroma.dtype).tiny, torch.ones_like(peak), peak)
        return chroma / peak


class HiddenStateFeatures(FrameFeatures):
    """Hidden states of one layer of a trained student (HuBERT's second iteration).

    Args:
        student: a ``MertStudent`` (kept in eval mode: no dropout, no masking).
        layer: index into ``hidden_states`` (0 = the transformer's input,
            ``num_layers`` = its output).
        hop_samples: the student's hop.
    """

    def __init__(self, student: nn.Module, layer: int, hop_samples: int, dim: int):
        super().__init__(hop_samples)
        self.student = student.eval()
        self.layer = layer
        self.dim = dim

    def train(self, mode: bool = True):  # the student stays in eval mode whatever the caller does
        super().train(mode)
        self.student.eval()
        return self

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` -> ``(B, T, dim)``."""
        wave = _check_wave(wave)
        if wave.shape[1] < TARGET_GRID.receptive_field:  # no frame of the target grid
            return self.empty(wave)
        out = self.student(wave, None, output_hidden_states=True)  # every clip full length: no padding mask
        return out.hidden_states[self.layer].float()
