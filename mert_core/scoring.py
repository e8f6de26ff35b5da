"""Scoring probe outputs against labels, per problem type: the leaf module the
task contract (:meth:`mert_core.tasks.Task.score`) uses.

It reads only numpy and the metric functions (:mod:`mert_core.metrics`,
:mod:`mert_core.beats`, both leaves), never the evaluation engine
(:mod:`mert_core.evaluation`: extraction, probing, reports).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mert_core import metrics as M
from mert_core.beats import track_beats


def score_multiclass(targets: np.ndarray, outputs: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """Accuracy of ``(N, C)`` logits against ``(N,)`` class indices (``label_names`` unused)."""
    pred = np.asarray(outputs).argmax(axis=1)
    return {"accuracy": M.accuracy(targets, pred)}


def score_multilabel(targets: np.ndarray, outputs: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """Macro ROC-AUC and average precision of ``(N, C)`` scores against ``(N, C)`` multi-hot labels."""
    scores = np.asarray(outputs, dtype=np.float64)
    return {"roc_auc": M.roc_auc_macro(targets, scores), "average_precision": M.average_precision_macro(targets, scores)}


def score_regression(targets: np.ndarray, outputs: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """Mean R² of ``(N, C)`` values, and ``r2_<name>`` for each of the ``C`` outputs."""
    per_output = M.r2_per_output(targets, np.asarray(outputs, dtype=np.float64))
    out = {"r2": float(np.mean(per_output))}
    out.update({f"r2_{name}": float(v) for name, v in zip(label_names, per_output)})
    return out


def score_beats(activations: Sequence[np.ndarray], reference_beats: Sequence[np.ndarray], frame_rate_hz: float,
                tolerance_seconds: float = 0.07, postprocess: str = "dp") -> dict[str, float]:
    """Beat F-measure of ``(T_i,)`` beat activations in [0, 1] against
    reference beat times (seconds), after beat tracking with ``postprocess``."""
    refs = [np.asarray(r, dtype=np.float64) for r in reference_beats]
    ests = [track_beats(np.asarray(a), frame_rate_hz, method=postprocess) for a in activations]
    return {"beat_f_measure": M.beat_f_measure(refs, ests, tolerance_seconds=tolerance_seconds)}
