"""The synthetic demo data: determinism, schema, splits and that the labels are true."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf

from mert_core.demo import KEYS, TIMBRES, TONIC_NAMES, DemoSize, ensure_demo_data, generate_demo_data, load_demo_metadata

SR = 24000
# Four major and four minor keys with tonics spread over the octave.
TEST_KEYS = ("C major", "Eb major", "F# major", "A major", "Db minor", "E minor", "G minor", "B minor")
SMALL = DemoSize(pieces_per_key=3, piece_seconds=6.0, keys=TEST_KEYS, note_pitches=(36, 47, 59, 72, 84), note_seconds=1.0)
TINY = DemoSize(pieces_per_key=1, piece_seconds=3.0, keys=("D major", "F minor"), note_pitches=(60, 61), timbres=("pluck", "bell"), note_seconds=0.5)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_demo_data(root, seed=0, size=SMALL, progress=False)
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    generate_demo_data(tmp_path / "a", seed=7, size=TINY, progress=False)
    generate_demo_data(tmp_path / "b", seed=7, size=TINY, progress=False)
    generate_demo_data(tmp_path / "c", seed=8, size=TINY, progress=False)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b
    assert set(a) == set(c) and a["pieces/piece-D-major-0.wav"] != c["pieces/piece-D-major-0.wav"]


def test_schema_and_files(small):
    records = load_demo_metadata(small)
    pieces = [r for r in records if r["kind"] == "piece"]
    notes = [r for r in records if r["kind"] == "note"]
    assert len(pieces) == 8 * 3 and len(notes) == 5 * len(TIMBRES)
    for r in records:
        info = sf.info(str(small / r["path"]))
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert info.frames == round(r["duration_seconds"] * SR)
        assert r["split"] in ("train", "valid", "test")
    for r in pieces:
        assert set(r) == {"path", "kind", "split", "duration_seconds", "key", "tonic", "mode", "tempo_bpm", "beats", "downbeats"}
        assert r["key"] == f"{r['tonic']} {r['mode']}" and r["key"] in KEYS
        assert 70 <= r["tempo_bpm"] <= 160
        gaps = np.diff(r["beats"])
        np.testing.assert_allclose(gaps, 60 / r["tempo_bpm"], atol=1e-3)
        assert r["downbeats"] == r["beats"][::4]
        assert 0 <= r["beats"][0] < 0.5 and r["beats"][-1] < r["duration_seconds"]
    for r in notes:
        assert set(r) == {"path", "kind", "split", "duration_seconds", "pitch", "timbre"}
        assert r["timbre"] in TIMBRES and 36 <= r["pitch"] <= 84
    assert (small / "README.txt").read_text().startswith("mert demo data")
    assert load_demo_metadata(small, kind="note", split="train") == [r for r in notes if r["split"] == "train"]


def test_splits_are_stratified(small):
    records = load_demo_metadata(small)
    key_splits = Counter((r["key"], r["split"]) for r in records if r["kind"] == "piece")
    assert all(key_splits[(k, s)] == 1 for k in TEST_KEYS for s in ("train", "valid", "test"))
    notes = [r for r in records if r["kind"] == "note"]
    train = [r for r in notes if r["split"] == "train"]
    assert {r["pitch"] for r in train} == set(SMALL.note_pitches)
    assert {r["timbre"] for r in train} == set(TIMBRES)
    # every pitch has len(TIMBRES) - 2 training notes, one valid, one test
    per_pitch = Counter((r["pitch"], r["split"]) for r in notes)
    assert all(per_pitch[(p, "train")] == len(TIMBRES) - 2 and per_pitch[(p, "valid")] == 1 for p in SMALL.note_pitches)


# Krumhansl-Kessler probe-tone profiles: an independent reference for what a key sounds like.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def key_ranking(y: np.ndarray) -> list[str]:
    """All 24 keys, best first, by correlation of the mean chroma with the rotated profiles."""
    chroma = librosa.feature.chroma_cqt(y=y, sr=SR).mean(axis=1)
    score = {
        f"{TONIC_NAMES[t]} {mode}": np.corrcoef(chroma, np.roll(profile, t))[0, 1]
        for mode, profile in (("major", KK_MAJOR), ("minor", KK_MINOR))
        for t in range(12)
    }
    return sorted(score, key=score.get, reverse=True)


def test_piece_chroma_matches_its_key(small):
    pieces = [r for r in load_demo_metadata(small, kind="piece") if r["path"].endswith("-0.wav")]
    ranks = [key_ranking(sf.read(str(small / r["path"]), dtype="float32")[0]).index(r["key"]) for r in pieces]
    # A profile estimator is right on most pieces and close on the rest; a
    # wrong tonic or mode in the labels would put the true key far down.
    assert sum(r == 0 for r in ranks) >= 6, ranks
    assert max(ranks) <= 3, ranks


def test_note_f0_matches_its_pitch(small):
    for r in load_demo_metadata(small, kind="note"):
        y, _ = sf.read(str(small / r["path"]), dtype="float32")
        f0 = librosa.yin(y, fmin=50, fmax=1500, sr=SR, frame_length=2048)
        midi = 69 + 12 * np.log2(np.median(f0) / 440)
        assert abs(midi - r["pitch"]) < 0.35, (r["path"], midi)


def test_beats_fall_on_onsets(small):
    """Detected onsets sit on the labelled beats, not a sixteenth note after them."""
    for r in load_demo_metadata(small, kind="piece")[:6]:
        y, _ = sf.read(str(small / r["path"]), dtype="float32")
        onsets = librosa.onset.onset_detect(y=y, sr=SR, hop_length=240, units="time")
        beats = np.array(r["beats"])

        def recall(times):
            return np.mean([np.abs(onsets - t).min() < 0.05 for t in times])

        on_beat, shifted = recall(beats), recall(beats + 15 / r["tempo_bpm"])
        assert on_beat >= 0.5 and on_beat > shifted + 0.3, (r["path"], on_beat, shifted)


def test_ensure_demo_data_generates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MERT_CACHE", str(tmp_path / "cache"))
    root = ensure_demo_data(size=TINY, progress=False)
    assert root == tmp_path / "cache" / "demo-v1"
    assert len(load_demo_metadata(root)) == 2 + 4
    sentinel = root / "sentinel"
    sentinel.write_text("kept if the folder is reused")
    assert ensure_demo_data(size=TINY, progress=False) == root
    assert sentinel.exists()  # reused, not regenerated
    ensure_demo_data(size=TINY, seed=1, progress=False)  # a different stamp: regenerated in place
    assert not sentinel.exists()
    assert sorted(p.name for p in root.parent.iterdir()) == ["demo-v1"]  # no temporary folders left


def test_ensure_demo_data_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.pdf").write_text("precious")
    with pytest.raises(ValueError, match="not a mert demo folder"):
        ensure_demo_data(tmp_path / "mine", size=TINY, progress=False)
    assert (tmp_path / "mine" / "thesis.pdf").exists()


def test_bad_size_parameters():
    with pytest.raises(ValueError, match="unknown key"):
        DemoSize(keys=("H major",))
    with pytest.raises(ValueError, match="unknown timbre"):
        DemoSize(timbres=("kazoo",))
    with pytest.raises(ValueError, match="not found"):
        load_demo_metadata(Path("/nonexistent"))
