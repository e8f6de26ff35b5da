"""Reading audio files: soundfile to decode, soxr to resample, mono mixdown.

Every failure is an :class:`AudioError` naming the file, so that callers can
skip and count bad files instead of crashing mid-run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


class AudioError(ValueError):
    """A file that cannot be used: unreadable, empty, truncated or not finite."""


def load_audio(path: str | Path, sample_rate: int, offset_seconds: float = 0.0, duration_seconds: float | None = None) -> np.ndarray:
    """Read a file (or part of it) as mono float32 at ``sample_rate``.

    Args:
        path: audio file (wav, flac, ogg, mp3).
        sample_rate: target rate; the file is resampled with soxr if needed.
        offset_seconds: where to start reading.
        duration_seconds: how much to read; None reads to the end.

    Returns:
        ``(S,)`` float32 array.

    Raises:
        AudioError: the file cannot be decoded, is empty or holds NaN/inf.
    """
    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            start = int(round(offset_seconds * sr))
            frames = -1 if duration_seconds is None else int(round(duration_seconds * sr))
            if start:
                f.seek(start)
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - soundfile raises several types
        raise AudioError(f"{path}: cannot decode audio ({type(exc).__name__}: {exc}); check or remove the file") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples (empty or truncated file)")
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: holds NaN or infinite samples")
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)
