"""Integrity: damaged caches and label stores are noticed, hostile or
malformed files give one-line errors, a full disk is named, and metadata
cannot make us allocate a model its file does not hold."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from mert_core.evaluation.extract import ExtractOptions, extract
from mert_core.evaluation.upstreams import HandcraftedUpstream
from test_eval_probe import _one_thread, registry, tone_dir  # noqa: F401 - fixtures reused

# -- 1. the evaluation feature cache ----------------------------------------------------------


def _overwrite_rows(d):
    f = np.load(d / "features.npy", mmap_mode="r+")
    f[2:4] = f[4:6] * 0.5
    f.flush()


def _nans(d):
    f = np.load(d / "features.npy", mmap_mode="r+")
    f[1, 0, :10] = np.nan
    f.flush()


def _edit_header_shape(d):
    raw = (d / "features.npy").read_bytes()
    (d / "features.npy").write_bytes(raw.replace(b"(8, 4, 696)", b"(4, 4, 696)", 1))


def _permute_index(d):
    index = np.load(d / "index.npy")
    np.save(d / "index.npy", index[::-1].copy())


def _truncate(d):
    raw = (d / "features.npy").read_bytes()
    (d / "features.npy").write_bytes(raw[: len(raw) // 2])


def _delete_index(d):
    (d / "index.npy").unlink()


def _zero_bytes(d):
    (d / "features.npy").write_bytes(b"")


def _garbage_meta(d):
    (d / "meta.json").write_text("{not json")


@pytest.mark.parametrize("damage", [_overwrite_rows, _nans, _edit_header_shape, _permute_index, _truncate, _delete_index,
                                    _zero_bytes, _garbage_meta])
def test_a_damaged_feature_cache_is_re_extracted_not_reused(damage, registry, tone_dir, tmp_path, caplog):  # noqa: F811
    task = registry.build("task", "tone-class", {"data_dir": tone_dir})
    opts = ExtractOptions(audio_workers=0, batch_windows=4)
    first = extract(HandcraftedUpstream(), task, "valid", opts, cache_dir=tmp_path, progress=False)
    clean = np.array(first.features), np.array(first.index)
    assert first.features.shape == (8, 4, 696)
    damage(first.directory)
    with caplog.at_level(logging.INFO, logger="mert.evaluation"):
        again = extract(HandcraftedUpstream(), task, "valid", opts, cache_dir=tmp_path, progress=False)
    assert not again.reused and "do not verify" in caplog.text and "reusing" not in caplog.text
    # the same computation on the same inputs: the numbers the clean cache held
    np.testing.assert_array_equal(np.asarray(again.index), clean[1])
    np.testing.assert_allclose(np.asarray(again.features), clean[0], rtol=0, atol=1e-6)
    # and the fresh entry verifies: a third call reuses it
    assert extract(HandcraftedUpstream(), task, "valid", opts, cache_dir=tmp_path, progress=False).reused
    assert not [p for p in first.directory.parent.iterdir() if p.name.startswith(".")]
