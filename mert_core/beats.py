"""Turning a frame-wise beat activation into beat times.

MARBLE post-processes the probe's activation with madmom's DBN beat tracker;
madmom does not install on Python 3.11, so the default here is librosa's
dynamic-programming beat tracker (Ellis 2007) run on the activation as its
onset envelope: a global tempo is estimated from the activation's
autocorrelation, then the best-scoring beat sequence at that tempo is found
by dynamic programming. ``"peaks"`` is a plain peak picker, for comparison.
"""

from __future__ import annotations

import numpy as np

POSTPROCESSORS = ("dp", "peaks")


def track_beats(activation: np.ndarray, frame_rate_hz: float, method: str = "dp", threshold: float = 0.5,
                min_interval_seconds: float = 0.2) -> np.ndarray:
    """Beat times from a beat activation.

    Args:
        activation: ``(T,)`` beat probability per frame.
        frame_rate_hz: frames per second of ``activation`` (75 for MERT).
        method: ``"dp"`` (librosa dynamic programming) or ``"peaks"``.
        threshold: ``"peaks"`` only: minimum activation of a beat.
        min_interval_seconds: ``"peaks"`` only: minimum time between beats.

    Returns:
        ``(K,)`` beat times in seconds, sorted.
    """
    act = np.nan_to_num(np.asarray(activation, dtype=np.float64).reshape(-1))
    if act.size < 2 or not np.any(act > 0):
        return np.zeros(0)
    if method == "dp":
        import librosa

        # hop_length=1 with sr=frame rate: librosa's frame index is our frame index.
        _, beats = librosa.beat.beat_track(onset_envelope=act, sr=float(frame_rate_hz), hop_length=1, units="frames")
        return np.sort(np.asarray(beats, dtype=np.float64)) / frame_rate_hz
    if method == "peaks":
        from scipy.signal import find_peaks

        distance = max(1, int(round(min_interval_seconds * frame_rate_hz)))
        peaks, _ = find_peaks(act, height=threshold, distance=distance)
        return peaks.astype(np.float64) / frame_rate_hz
    raise ValueError(f"beat post-processing {method!r}: expected one of {', '.join(POSTPROCESSORS)}")
