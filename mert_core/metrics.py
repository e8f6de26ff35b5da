"""Metrics of the MARBLE protocol, in numpy.

Each one is tested against its reference implementation (scikit-learn or
mir_eval) in ``tests/test_eval_metrics.py``; they are written out here so that
the probe can score dozens of grid members per epoch without per-call
overhead, and so that edge cases (a tag with no positive clip in a small
split) are handled the same way everywhere: such columns are skipped, where
scikit-learn would raise.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy.stats import rankdata

# -- keys ------------------------------------------------------------------------

PITCH_CLASS_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
KEY_NAMES = tuple(f"{p} major" for p in PITCH_CLASS_NAMES) + tuple(f"{p} minor" for p in PITCH_CLASS_NAMES)
"""The 24 key classes: index ``k`` is tonic ``k % 12``, major for ``k < 12``."""

_TONIC = {"c": 0, "b#": 0, "c#": 1, "db": 1, "d": 2, "d#": 3, "eb": 3, "e": 4, "fb": 4, "e#": 5, "f": 5,
          "f#": 6, "gb": 6, "g": 7, "g#": 8, "ab": 8, "a": 9, "a#": 10, "bb": 10, "b": 11, "cb": 11}


def key_index(key: str) -> int:
    """Class index (0..23) of a key string like ``"Eb minor"`` or ``"c# major"``.

    Raises:
        ValueError: not "<tonic> major|minor" with a known tonic.
    """
    parts = str(key).strip().replace("\t", " ").split()
    if len(parts) != 2 or parts[0].lower() not in _TONIC or parts[1].lower() not in ("major", "minor"):
        raise ValueError(f"key {key!r}: expected '<tonic> major' or '<tonic> minor' with tonic in C, C#, Db, ..., B")
    return _TONIC[parts[0].lower()] + (12 if parts[1].lower() == "minor" else 0)


def _key_weight_matrix() -> np.ndarray:
    """``W[ref, est]``: the MIREX weighted score of estimating ``est`` when
    the truth is ``ref``: 1 same key, 0.5 a perfect fifth above in the same
    mode, 0.3 the relative key, 0.2 the parallel key, else 0."""
    w = np.zeros((24, 24))
    for ref in range(24):
        ref_tonic, ref_minor = ref % 12, ref >= 12
        for est in range(24):
            est_tonic, est_minor = est % 12, est >= 12
            if ref == est:
                w[ref, est] = 1.0
            elif ref_minor == est_minor and (est_tonic - ref_tonic) % 12 == 7:
                w[ref, est] = 0.5
            elif not ref_minor and est_minor and est_tonic == (ref_tonic - 3) % 12:
                w[ref, est] = 0.3
            elif ref_minor and not est_minor and est_tonic == (ref_tonic + 3) % 12:
                w[ref, est] = 0.3
            elif ref_tonic == est_tonic and ref_minor != est_minor:
                w[ref, est] = 0.2
    return w


KEY_WEIGHTS = _key_weight_matrix()


def key_weighted_score(ref: Sequence[int], est: Sequence[int]) -> float:
    """Mean MIREX/mir_eval key weighted score over items.

    Args:
        ref, est: ``(N,)`` key class indices (see :data:`KEY_NAMES`).
    """
    ref, est = np.asarray(ref, dtype=np.int64), np.asarray(est, dtype=np.int64)
    return float(KEY_WEIGHTS[ref, est].mean()) if len(ref) else float("nan")


# -- classification ----------------------------------------------------------------


def key_scores(outputs, ref: Sequence[int]) -> dict[str, float]:
    """The key tasks' scores from probe outputs ``(N, 24)``: weighted score and accuracy."""
    pred = np.asarray(outputs).argmax(axis=1)
    return {"key_weighted_score": key_weighted_score(ref, pred), "accuracy": accuracy(ref, pred)}

def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of items whose predicted class is the true one."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def roc_auc_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of each column (Mann-Whitney U statistic).

    Args:
        y_true: ``(N, C)`` 0/1.
        scores: ``(N, C)`` any monotone score (logits or probabilities).

    Returns:
        ``(C,)``; NaN for a column whose labels are all 0 or all 1.
    """
    y_true, scores = np.asarray(y_true) > 0.5, np.asarray(scores, dtype=np.float64)
    out = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        pos = y_true[:, c]
        n_pos = int(pos.sum())
        n_neg = len(pos) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(scores[:, c])  # ties get their mean rank
        out[c] = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return out


def average_precision_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision of each column, as scikit-learn computes it:
    sum over thresholds of (recall step) x precision, no interpolation.

    Returns:
        ``(C,)``; NaN for a column without a positive item.
    """
    y_true, scores = np.asarray(y_true) > 0.5, np.asarray(scores, dtype=np.float64)
    out = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        pos = y_true[:, c]
        n_pos = int(pos.sum())
        if n_pos == 0:
            continue
        order = np.argsort(-scores[:, c], kind="mergesort")
        s, p = scores[order, c], pos[order]
        # One threshold per distinct score: take cumulative counts at the last item of each run.
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
        tps = np.cumsum(p)[last]
        fps = (last + 1) - tps
        precision = tps / (tps + fps)
        recall = tps / n_pos
        out[c] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return out


def _macro(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def roc_auc_macro(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro ROC-AUC over the columns that have both classes."""
    return _macro(roc_auc_per_class(y_true, scores))


def average_precision_macro(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro average precision over the columns that have a positive."""
    return _macro(average_precision_per_class(y_true, scores))


# -- regression --------------------------------------------------------------------

def r2_per_output(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination of each output column.

    A constant truth column scores 1.0 if predicted exactly, else 0.0 (as
    scikit-learn's ``force_finite``).

    Returns:
        ``(C,)``.
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    ss_res = ((y_true - y_pred) ** 2).sum(axis=0)
    ss_tot = ((y_true - y_true.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    return np.where(ss_tot > 0, r2, np.where(ss_res == 0, 1.0, 0.0))


# -- beats -------------------------------------------------------------------------

def beat_f_measure(refs: Sequence[np.ndarray], ests: Sequence[np.ndarray], tolerance_seconds: float = 0.07) -> float:
    """Mean over tracks of mir_eval's beat F-measure.

    Args:
        refs, ests: per track, beat times in seconds.
        tolerance_seconds: half-width of the hit window; mir_eval's default
            is 0.07 s (the MERT thesis quotes 20 ms).
    """
    import mir_eval

    scores = []
    with warnings.catch_warnings():
        # mir_eval warns (and scores 0) when a track has no estimated beats.
        warnings.simplefilter("ignore")
        for ref, est in zip(refs, ests):
            ref = np.sort(np.asarray(ref, dtype=np.float64))
            est = np.sort(np.asarray(est, dtype=np.float64))
            scores.append(mir_eval.beat.f_measure(ref, est, f_measure_threshold=tolerance_seconds))
    return float(np.mean(scores)) if scores else float("nan")
