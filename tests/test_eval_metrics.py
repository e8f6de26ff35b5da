"""Metric code against its references (mir_eval, scikit-learn) on known inputs."""

from __future__ import annotations

import warnings

import mir_eval
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, r2_score, roc_auc_score

from mert_core.evaluation import metrics as M
from mert_core.evaluation.beats import track_beats


def test_key_weighted_score_matches_mir_eval_on_all_576_pairs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ref in range(24):
            for est in range(24):
                expected = mir_eval.key.weighted_score(M.KEY_NAMES[ref], M.KEY_NAMES[est])
                assert M.KEY_WEIGHTS[ref, est] == pytest.approx(expected), (M.KEY_NAMES[ref], M.KEY_NAMES[est])


def test_key_weighted_score_mean_over_items():
    rng = np.random.default_rng(0)
    ref, est = rng.integers(0, 24, 200), rng.integers(0, 24, 200)
    est[:50] = ref[:50]
    expected = np.mean([mir_eval.key.weighted_score(M.KEY_NAMES[r], M.KEY_NAMES[e]) for r, e in zip(ref, est)])
    assert M.key_weighted_score(ref, est) == pytest.approx(expected)


def test_key_index_parses_enharmonics_and_rejects_junk():
    assert M.key_index("C# major") == M.key_index("Db major") == 1
    assert M.key_index("a minor") == 12 + 9
    assert M.key_index("F# minor") == M.KEY_NAMES.index("Gb minor")
    with pytest.raises(ValueError, match="H major"):
        M.key_index("H major")
    with pytest.raises(ValueError, match="expected"):
        M.key_index("C dorian")


def test_accuracy_matches_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 5, 100), rng.integers(0, 5, 100)
    assert M.accuracy(y, p) == pytest.approx(accuracy_score(y, p))


def _multilabel(seed, n=80, c=6):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(int)
    y[0], y[1] = 1, 0  # every column has both classes
    scores = np.round(rng.normal(size=(n, c)) + y, 1)  # rounding makes ties, which both must rank alike
    return y, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_and_average_precision_match_sklearn_with_ties(seed):
    y, s = _multilabel(seed)
    assert M.roc_auc_macro(y, s) == pytest.approx(roc_auc_score(y, s, average="macro"))
    assert M.average_precision_macro(y, s) == pytest.approx(average_precision_score(y, s, average="macro"))
    per_class = M.average_precision_per_class(y, s)
    assert per_class == pytest.approx([average_precision_score(y[:, c], s[:, c]) for c in range(y.shape[1])])


def test_columns_without_both_classes_are_skipped_not_fatal():
    y, s = _multilabel(3)
    y_bad = y.copy()
    y_bad[:, 2] = 0  # a tag absent from this split: sklearn's roc_auc raises
    keep = [0, 1, 3, 4, 5]
    assert M.roc_auc_macro(y_bad, s) == pytest.approx(roc_auc_score(y[:, keep], s[:, keep], average="macro"))
    assert M.average_precision_macro(y_bad, s) == pytest.approx(average_precision_score(y[:, keep], s[:, keep], average="macro"))


def test_r2_matches_sklearn_including_constant_columns():
    rng = np.random.default_rng(4)
    t = rng.normal(size=(40, 3))
    p = t + rng.normal(scale=0.7, size=(40, 3))
    assert M.r2_per_output(t, p) == pytest.approx(r2_score(t, p, multioutput="raw_values"))
    t[:, 1] = 2.0
    p[:, 2] = t[:, 2]
    assert M.r2_per_output(t, p) == pytest.approx(r2_score(t, p, multioutput="raw_values"))


def test_beat_f_measure_is_mean_of_mir_eval_and_honours_the_tolerance():
    refs = [np.arange(1.0, 10.0, 0.5), np.arange(0.5, 8.0, 0.6)]
    rng = np.random.default_rng(5)
    ests = [refs[0] + rng.normal(scale=0.03, size=len(refs[0])), refs[1][::2]]
    expected = np.mean([mir_eval.beat.f_measure(r, np.sort(e)) for r, e in zip(refs, ests)])
    assert M.beat_f_measure(refs, ests) == pytest.approx(expected)
    shifted = [refs[0] + 0.05]
    assert M.beat_f_measure(refs[:1], shifted, tolerance_seconds=0.07) == pytest.approx(1.0)
    assert M.beat_f_measure(refs[:1], shifted, tolerance_seconds=0.02) == pytest.approx(0.0)
    assert M.beat_f_measure(refs[:1], [np.zeros(0)]) == 0.0


@pytest.mark.parametrize("method", ["dp", "peaks"])
def test_beat_tracking_recovers_beats_from_a_clean_activation(method):
    rate = 75.0
    beats = np.arange(0.4, 12.0, 0.5)  # 120 BPM
    act = np.zeros(int(12.5 * rate))
    idx = np.round(beats * rate).astype(int)
    act[idx] = 1.0
    act[idx - 1] = act[idx + 1] = 0.5
    act += 0.05 * np.random.default_rng(6).random(len(act))
    est = track_beats(act, rate, method=method)
    assert M.beat_f_measure([beats], [est], tolerance_seconds=0.02) > 0.95
    assert track_beats(np.zeros(100), rate, method=method).size == 0
