"""Reading audio files: soundfile to decode, soxr to resample, mono mixdown.

Every failure is an :class:`AudioError` naming the file, so that callers can
skip and count bad files instead of crashing mid-run.

Three ways in:

* :func:`load_audio` reads a whole file (or a span given in seconds), for
  evaluation and feature extraction.
* :func:`decode_audio` decodes a whole file held in memory (a shard member).
* :func:`read_crop` reads ``num_samples`` samples starting at ``offset_samples``
  *in the target rate*, seeking in the file instead of decoding all of it. The
  result equals slicing the resampled whole file (to float rounding), which is
  what lets offline label stores and online teachers agree sample for sample.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr
from mert_core.errors import AudioError  # noqa: F401 - re-exported: raised here, imported from here

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
"""What libsndfile (through soundfile) decodes: Ogg holds Vorbis or Opus; AIFF as Apple writes it."""

# soxr's HQ filter needs this much context on each side of a window for the
# window's resampled samples to equal those of the whole file (measured: 10 ms
# is exact to 1e-6 down to 8 kHz sources; we keep a 2.5x margin).
_RESAMPLE_CONTEXT_SECONDS = 0.025

MAX_ABS_SAMPLE = 100.0
"""Largest sample magnitude accepted after decoding (40 dB above full scale).

Integer formats decode to [-1, 1]; float files may overshoot a little, but a
peak beyond this is a wrongly scaled or corrupt file (e.g. int16 values stored
as float, or garbage around 1e30) that would turn every batch non-finite."""

SAMPLE_RATE_RANGE = (1000, 1_000_000)
"""Header sample rates accepted, in Hz. Outside it the header is corrupt, and
resampling a 1 Hz "file" to 24 kHz would allocate 24000 samples per frame."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says."""

    sample_rate: int
    frames: int
    channels: int

    @property
    def duration_seconds(self) -> float:
        return self.frames / self.sample_rate


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """Samples soxr produces when resampling ``frames`` samples of a whole file
    (``round(frames * target / source)``, halves rounded up), in exact integers."""
    if source_rate == target_rate:
        return frames
    return (2 * frames * target_rate + source_rate) // (2 * source_rate)


def audio_info(path: str | Path) -> AudioInfo:
    """Read the header of ``path`` (cheap: nothing is decoded).

    Raises:
        AudioError: the header cannot be read, the file holds no samples, or a
            WAV file is truncated (its header declares more data than present).
    """
    path = Path(path)
    _check_regular_file(path)
    try:
        info = sf.info(str(path))
    except Exception as exc:  # noqa: BLE001 - soundfile raises several types
        raise AudioError(f"{path}: cannot read audio header ({_one_line(exc)}); check or remove the file") from None
    if info.channels <= 0:
        raise AudioError(f"{path}: header says {info.channels} channels; expected > 0")
    _check_rate(info.samplerate, path)
    if info.frames <= 0:
        raise AudioError(f"{path}: no audio samples (empty or truncated file)")
    if info.format in ("WAV", "WAVEX"):
        _check_wav_complete(path)
    return AudioInfo(sample_rate=int(info.samplerate), frames=int(info.frames), channels=int(info.channels))


def _check_wav_complete(path: Path) -> None:
    """Raise if a RIFF/WAVE file's data chunk declares more bytes than the file holds.

    libsndfile silently shortens such files to what is present; an interrupted
    copy or download is better reported than trained on as a shorter clip.
    Streaming writers put 0 or 0xFFFFFFFF as a placeholder size: those pass.
    """
    try:
        with open(path, "rb") as f:
            _check_wav_chunks(f, os.path.getsize(path), path)
    except OSError as exc:
        raise AudioError(f"{path}: cannot read file ({_one_line(exc)})") from None


def _check_wav_chunks(f: BinaryIO, size: int, name: str | Path) -> None:
    """:func:`_check_wav_complete` on an open binary file of ``size`` bytes (a file or a shard member in memory)."""
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return  # RF64, W64, ...: leave it to libsndfile
    pos = 12
    while pos + 8 <= size:
        f.seek(pos)
        chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
        if chunk_id == b"data":
            present = size - (pos + 8)
            if chunk_size not in (0, 0xFFFFFFFF) and chunk_size < 0x7FFFFFFF and chunk_size > present:
                raise AudioError(
                    f"{name}: truncated WAV: header declares {chunk_size} data bytes, file holds {present}; "
                    "re-copy or remove the file"
                )
            return
        pos += 8 + chunk_size + (chunk_size & 1)


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
        AudioError: the file cannot be decoded, is empty or truncated, or holds NaN/inf
            or samples beyond :data:`MAX_ABS_SAMPLE`.
    """
    path = Path(path)
    _check_regular_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            _check_rate(sr, path)
            if f.format in ("WAV", "WAVEX"):  # libsndfile would silently read a truncated file as a shorter one
                _check_wav_complete(path)
            start = int(round(offset_seconds * sr))
            frames = -1 if duration_seconds is None else int(round(duration_seconds * sr))
            if start:
                f.seek(start)
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - soundfile raises several types
        raise AudioError(f"{path}: cannot decode audio ({_one_line(exc)}); check or remove the file") from None
    return _mono_at(data, sr, sample_rate, path)


def decode_audio(data: bytes, name: str, sample_rate: int) -> np.ndarray:
    """Decode a whole audio file held in memory (a shard member) as mono float32 at ``sample_rate``.

    The same decoder, checks and resampler as :func:`load_audio` of the whole
    file, so the result equals ``load_audio(path, sample_rate)`` of the file
    the bytes came from, sample for sample.

    Args:
        data: the file's bytes (wav, flac, ogg, mp3, ...).
        name: what to call it in errors (a shard and member name).
        sample_rate: target rate.

    Returns:
        ``(S,)`` float32 array.

    Raises:
        AudioError: as :func:`load_audio`.
    """
    if not data:
        raise AudioError(f"{name}: no audio samples (empty member)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = f.samplerate
            _check_rate(sr, name)
            if f.format in ("WAV", "WAVEX"):
                _check_wav_chunks(io.BytesIO(data), len(data), name)
            decoded = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - soundfile raises several types
        raise AudioError(f"{name}: cannot decode audio ({_one_line(exc)}); check or remove the file") from None
    return _mono_at(decoded, sr, sample_rate, name)


def _mono_at(data: np.ndarray, source_rate: int, sample_rate: int, name: str | Path) -> np.ndarray:
    """Decoded ``(S, C)`` samples -> checked ``(S',)`` mono float32 at ``sample_rate``."""
    if data.shape[0] == 0:
        raise AudioError(f"{name}: no audio samples (empty or truncated file)")
    mono = _mono_usable(data, name)
    if source_rate != sample_rate:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)


def read_crop(path: str | Path, sample_rate: int, offset_samples: int, num_samples: int) -> np.ndarray:
    """Read ``num_samples`` mono samples at ``sample_rate`` starting at ``offset_samples``.

    Offsets and lengths are in the *target* rate. Only the needed window (plus
    a little resampling context) is decoded. The window is resampled on a grid
    aligned with the whole file, so the result equals
    ``load_audio(path, sample_rate)[offset : offset + num_samples]`` up to
    float rounding (~1e-6).

    Args:
        path: audio file.
        sample_rate: target rate.
        offset_samples: first sample, in the target rate (>= 0).
        num_samples: samples wanted (> 0); fewer come back where the file ends.

    Returns:
        ``(n,)`` float32 array, ``1 <= n <= num_samples``.

    Raises:
        AudioError: cannot decode, truncated (fewer samples than the header
            promised), offset past the end, a sample rate outside
            :data:`SAMPLE_RATE_RANGE`, NaN/inf or samples beyond :data:`MAX_ABS_SAMPLE`.
    """
    path = Path(path)
    if offset_samples < 0 or num_samples <= 0:
        raise ValueError(f"read_crop({path}): expected offset_samples >= 0 and num_samples > 0, got {offset_samples}, {num_samples}")
    _check_regular_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr, frames = f.samplerate, f.frames
            _check_rate(sr, path)
            total = resampled_length(frames, sr, sample_rate)
            if offset_samples >= total:
                raise AudioError(
                    f"{path}: crop offset {offset_samples} is past the end ({total} samples at {sample_rate} Hz); "
                    "the file changed since it was scanned: re-run the scan"
                )
            if sr == sample_rate:
                # No resampling: the window is exactly the file's samples.
                start, stop = offset_samples, min(frames, offset_samples + num_samples)
                out_first = start
            else:
                # Start the window on a sample where the source and target grids
                # meet (a multiple of sr/gcd source samples), so its resampled
                # samples land on the whole file's output grid.
                g = math.gcd(sr, sample_rate)
                block_src, block_out = sr // g, sample_rate // g
                context = math.ceil(_RESAMPLE_CONTEXT_SECONDS * sr)
                first_src = offset_samples * sr // sample_rate
                start = max(0, (first_src - context) // block_src * block_src)
                stop = min(frames, -(-(offset_samples + num_samples) * sr // sample_rate) + context + 1)
                out_first = start // block_src * block_out
            f.seek(start)
            data = f.read(frames=stop - start, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # noqa: BLE001 - soundfile raises several types
        raise AudioError(f"{path}: cannot decode audio ({_one_line(exc)}); check or remove the file") from None
    if data.shape[0] < stop - start:
        raise AudioError(
            f"{path}: truncated: header promises {frames} frames but reading frames {start}-{stop} gave "
            f"{data.shape[0]}; re-copy or remove the file"
        )
    mono = _mono_usable(data, path)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
        # The window's last samples are exact only if it reaches the file's end
        # (or has context after them); both are guaranteed by `stop` above.
        k = offset_samples - out_first
        mono = mono[k : k + num_samples]
    else:
        mono = mono[:num_samples]
    if mono.shape[0] == 0:
        raise AudioError(f"{path}: no samples at offset {offset_samples} (file shorter than its header says)")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_regular_file(path: Path) -> None:
    # opening a FIFO named x.wav would wait forever for a writer
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as exc:
        raise AudioError(f"{path}: cannot open ({_one_line(exc)}); check the path (a dangling link?)") from None
    if not regular:
        raise AudioError(f"{path}: not a regular file (a FIFO, socket, device or folder); pass an audio file")


def _check_rate(sample_rate: int, path: str | Path) -> None:
    low, high = SAMPLE_RATE_RANGE
    if not low <= sample_rate <= high:
        raise AudioError(f"{path}: header says sample rate {sample_rate} Hz; expected {low}..{high} Hz (corrupt header?)")


def _mono_usable(data: np.ndarray, path: str | Path) -> np.ndarray:
    """``(S, C)`` -> ``(S,)`` channel mean; raise on NaN/inf or samples beyond :data:`MAX_ABS_SAMPLE`."""
    # One vectorised pass over every channel: the max of |x| is NaN if any
    # sample is, and a comparison with NaN is False.
    peak = float(np.abs(data).max()) if data.size else 0.0
    if not peak <= MAX_ABS_SAMPLE:
        what = "NaN or infinite samples" if not np.isfinite(peak) else f"samples up to {peak:.3g}, far outside [-1, 1]"
        raise AudioError(f"{path}: holds {what} (limit {MAX_ABS_SAMPLE:g}); re-export or remove the file")
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
