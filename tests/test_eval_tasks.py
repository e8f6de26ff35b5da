"""Task plugins: the MARBLE adapters on tiny fake trees in the official
layouts, the demo tasks, and clear errors for missing or malformed folders."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mert_core.registry import PluginError, load_registry
from mert_core.tasks import SPLITS, TaskDataError


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _wav(path: Path, seconds: float = 0.25, sr: int = 8000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr)).astype(np.float32), sr)
    return path


def _sha1_mod(text: str, n: int) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % n


def test_every_marble_and_demo_task_is_registered_with_described_options(registry):
    expected = {"gtzan-genre", "giantsteps-key", "nsynth-pitch", "nsynth-instrument", "emomusic", "vocalset-technique",
                "vocalset-singer", "mtt-tagging", "mtg-top50", "mtg-genre", "mtg-instrument", "mtg-moodtheme",
                "demo-key", "demo-pitch", "demo-timbre", "demo-beat"}
    assert expected <= set(registry.names("task"))
    for name in expected:
        cls = registry.get("task", name).obj
        assert cls.metrics and cls.description
        for field_name, f in cls.Options.model_fields.items():
            assert f.description, f"{name}.{field_name} has no description"
    with pytest.raises(PluginError, match="data_dri"):
        registry.build("task", "gtzan-genre", {"data_dri": "/x"})


@pytest.mark.parametrize("name", ["gtzan-genre", "giantsteps-key", "nsynth-pitch", "emomusic", "vocalset-singer", "mtt-tagging", "mtg-genre"])
def test_missing_data_dir_names_the_option_and_the_expected_layout(registry, name, tmp_path):
    task = registry.build("task", name)
    with pytest.raises(TaskDataError, match="is required"):
        task.examples("test")
    option = "mtg_data_dir" if name == "giantsteps-key" else "data_dir"
    task = registry.build("task", name, {"data_dir": tmp_path / "nowhere", "mtg_data_dir": tmp_path / "nowhere"} if option != "data_dir"
                          else {"data_dir": tmp_path / "nowhere"})
    with pytest.raises(TaskDataError, match="not a folder; expected"):
        task.examples("train")


# -- GTZAN -----------------------------------------------------------------------

def _gtzan(root: Path) -> Path:
    for genre in ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"):
        for k in range(2):
            _wav(root / "genres" / genre / f"{genre}.{k:05d}.wav", seconds=0.5, seed=k)
    (root / "splits").mkdir()
    (root / "splits" / "train_filtered.txt").write_text("blues/blues.00000.wav\njazz/jazz.00000.wav\nrock/rock.00001.wav\n")
    (root / "splits" / "valid_filtered.txt").write_text("pop/pop.00000.wav\n")
    (root / "splits" / "test_filtered.txt").write_text("metal/metal.00001.wav\n\nreggae/reggae.00000.wav\n")
    return root


def test_gtzan_reads_the_fault_filtered_lists(registry, tmp_path):
    root = _gtzan(tmp_path / "GTZAN")
    task = registry.build("task", "gtzan-genre", {"data_dir": root, "split_dir": root / "splits"})
    train = task.examples("train")
    assert [e.path.relative_to(root).as_posix() for e in train] == ["genres/blues/blues.00000.wav", "genres/jazz/jazz.00000.wav", "genres/rock/rock.00001.wav"]
    assert [task.labels()[e.label] for e in train] == ["blues", "jazz", "rock"]
    assert [task.labels()[e.label] for e in task.examples("test")] == ["metal", "reggae"]
    no_lists = registry.build("task", "gtzan-genre", {"data_dir": root})
    with pytest.raises(TaskDataError, match="train_filtered.txt"):
        no_lists.examples("train")
    (root / "splits" / "valid_filtered.txt").write_text("polka/polka.00000.wav\n")
    with pytest.raises(TaskDataError, match="valid_filtered.txt:1"):
        registry.build("task", "gtzan-genre", {"data_dir": root, "split_dir": root / "splits"}).examples("valid")


def test_gtzan_extraction_skips_and_counts_a_corrupt_file(registry, tmp_path):
    from mert_core.evaluation.extract import ExtractOptions, extract
    from mert_core.evaluation.upstreams import HandcraftedUpstream

    root = _gtzan(tmp_path / "GTZAN")
    (root / "genres" / "jazz" / "jazz.00000.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    task = registry.build("task", "gtzan-genre", {"data_dir": root, "split_dir": root / "splits"})
    fs = extract(HandcraftedUpstream(), task, "train", ExtractOptions(audio_workers=0), cache_dir=tmp_path / "cache", progress=False)
    assert len(fs) == 2 and fs.index.tolist() == [0, 2]
    assert len(fs.meta["skipped"]) == 1 and "jazz.00000.wav" in fs.meta["skipped"][0]["path"]


# -- GiantSteps -------------------------------------------------------------------

def _names_in(split: str, n: int, ratio_valid=(100, 116)) -> list[str]:
    """Artist names that MARBLE's hash puts in ``split``."""
    out, i = [], 0
    while len(out) < n:
        name = f"Artist {i}"
        is_valid = _sha1_mod(name.lower(), 116) >= 100
        if is_valid == (split == "valid"):
            out.append(name)
        i += 1
    return out


def test_giantsteps_key_splits_by_artist_hash_and_filters_confidence(registry, tmp_path):
    gs, mtg = tmp_path / "giantsteps-key-dataset", tmp_path / "giantsteps-mtg-key-dataset"
    (gs / "annotations" / "key").mkdir(parents=True)
    for did, key in ((10, "Eb minor"), (3, "A major")):
        (gs / "annotations" / "key" / f"{did}.LOFI.key").write_text(key)
    train_artists, valid_artists = _names_in("train", 3), _names_in("valid", 1)
    (mtg / "annotations").mkdir(parents=True)
    meta = [("1", train_artists[0]), ("2", train_artists[1]), ("3", f"{train_artists[2]}, {valid_artists[0]}"),
            ("4", train_artists[2]), ("5", train_artists[0]), ("6", train_artists[1])]
    (mtg / "annotations" / "beatport_metadata.txt").write_text("ID\tARTIST\tTITLE\n" + "".join(f"{i}\t{a}\tx\n" for i, a in meta))
    ann = [("1", "C# minor", "2"), ("2", "G major", "2"), ("3", "D minor", "2"), ("4", "F major", "2"),
           ("5", "A minor", "1"), ("6", "C major / A minor", "2")]
    (mtg / "annotations" / "annotations.txt").write_text("ID\tMANUAL KEY\tC\tG\n" + "".join(f"{i}\t{k}\t{c}\tx\n" for i, k, c in ann))
    task = registry.build("task", "giantsteps-key", {"data_dir": gs, "mtg_data_dir": mtg})
    names = task.labels()
    test = task.examples("test")
    assert [(e.path.name, names[e.label]) for e in test] == [("3.LOFI.mp3", "A major"), ("10.LOFI.mp3", "Eb minor")]
    train, valid = task.examples("train"), task.examples("valid")
    # 5: low confidence; 6: two keys. Track 3 has a valid artist, so it and every
    # track of its collaborator (track 4) are valid.
    assert sorted(e.path.name for e in train) == ["1.LOFI.mp3", "2.LOFI.mp3"]
    assert sorted(e.path.name for e in valid) == ["3.LOFI.mp3", "4.LOFI.mp3"]
    assert names[[e for e in train if e.path.name == "1.LOFI.mp3"][0].label] == "Db minor"
    (mtg / "annotations" / "annotations.txt").write_text("ID\tKEY\n1\tC major\n")
    with pytest.raises(TaskDataError, match="MANUAL KEY"):
        registry.build("task", "giantsteps-key", {"data_dir": gs, "mtg_data_dir": mtg}).examples("train")


# -- NSynth -------------------------------------------------------------------------

def test_nsynth_pitch_and_instrument_use_the_official_folders(registry, tmp_path):
    root = tmp_path / "nsynth"
    families = ["bass", "guitar", "vocal", "mallet"]
    for split in SPLITS:
        notes = {f"{fam}_acoustic_000-0{60 + i}-100": {"pitch": 60 + i, "instrument_family_str": fam} for i, fam in enumerate(families)}
        (root / f"nsynth-{split}").mkdir(parents=True)
        (root / f"nsynth-{split}" / "examples.json").write_text(json.dumps(notes))
    pitch = registry.build("task", "nsynth-pitch", {"data_dir": root})
    ex = pitch.examples("valid")
    assert len(pitch.labels()) == 128
    assert sorted(e.label for e in ex) == [60, 61, 62, 63]
    assert ex[0].path == root / "nsynth-valid" / "audio" / f"{ex[0].path.stem}.wav"
    inst = registry.build("task", "nsynth-instrument", {"data_dir": root, "max_train_examples": 2})
    assert len(inst.labels()) == 11
    assert sorted(inst.labels()[e.label] for e in inst.examples("test")) == sorted(families)
    assert len(inst.examples("train")) == 2
    (root / "nsynth-test" / "examples.json").write_text("{not json")
    with pytest.raises(TaskDataError, match="not valid JSON"):
        registry.build("task", "nsynth-pitch", {"data_dir": root}).examples("test")


# -- Emomusic -------------------------------------------------------------------------

def test_emomusic_uses_mediaeval_evaluation_set_as_test_and_artist_hash_for_valid(registry, tmp_path):
    root = tmp_path / "emomusic"
    (root / "annotations").mkdir(parents=True)
    artists = [f"Band {chr(97 + i % 10)}{chr(107 + i // 10)}" for i in range(30)]  # letters: the hash ignores digits
    with open(root / "annotations" / "songs_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "file_name", "Artist", "Song title", "Mediaeval 2013 set"])
        for i, a in enumerate(artists, start=2):
            w.writerow([i, f"{i}.mp3", a, "t", "evaluation" if i % 4 == 0 else "development"])
    with open(root / "annotations" / "static_annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "mean_arousal", "std_arousal", "mean_valence", "std_valence"])
        for i in range(2, 2 + len(artists)):
            w.writerow([i, 3.0 + i / 10, 1, 5.0 - i / 10, 1])
    task = registry.build("task", "emomusic", {"data_dir": root})
    splits = {s: [int(e.path.stem) for e in task.examples(s)] for s in SPLITS}
    assert splits["test"] == [i for i in range(2, 32) if i % 4 == 0]
    assert splits["valid"] and splits["train"]
    for i in range(2, 32):
        if i % 4:
            clean = " ".join(artists[i - 2].lower().split())
            expected = "valid" if _sha1_mod(clean, 10) >= 8 else "train"
            assert i in splits[expected]
    ex = task.examples("test")[0]
    assert ex.label == pytest.approx((3.0 + 4 / 10, 5.0 - 4 / 10))
    assert ex.path == root / "clips_45seconds" / "4.mp3"
    assert task.labels() == ["arousal", "valence"] and task.primary_metric == "r2"
    (root / "annotations" / "songs_info.csv").unlink()
    with pytest.raises(TaskDataError, match="songs_info.csv"):
        registry.build("task", "emomusic", {"data_dir": root}).examples("train")


# -- VocalSet ---------------------------------------------------------------------------

def test_vocalset_technique_holds_out_singers_and_cuts_3s_segments(registry, tmp_path):
    root = tmp_path / "VocalSet"
    for singer in ("female1", "female2", "male3", "male4", "male10"):
        for tech in ("belt", "vibrato", "forte"):
            _wav(root / "FULL" / singer / "arpeggios" / tech / f"{singer}_arpeggios_{tech}_a.wav", seconds=7.0, sr=4000)
    _wav(root / "FULL" / "female2" / "arpeggios" / "vibrato" / "caro_vibrato.wav", seconds=7.0, sr=4000)
    task = registry.build("task", "vocalset-technique", {"data_dir": root})
    test = task.examples("test")
    assert {e.path.parts[-4] for e in test} == {"female2", "male3", "male10"}
    assert all(e.path.name != "caro_vibrato.wav" for e in test)
    assert {task.labels()[e.label] for e in test} == {"belt", "vibrato"}  # 'forte' is not a technique class
    assert [(e.start_seconds, e.end_seconds) for e in test[:2]] == [(0.0, 3.0), (3.0, 6.0)]
    train, valid = task.examples("train"), task.examples("valid")
    recordings = lambda exs: {e.path for e in exs}  # noqa: E731
    assert recordings(train) | recordings(valid) == {p for p in (root / "FULL").glob("*/*/*/*.wav")
                                                     if p.parts[-4] in ("female1", "male4") and p.parts[-2] != "forte"}
    assert not recordings(train) & recordings(valid)

    singer = registry.build("task", "vocalset-singer", {"data_dir": root})
    by_split = {s: {e.path for e in singer.examples(s)} for s in SPLITS}
    assert sum(len(v) for v in by_split.values()) == 15 and not (by_split["train"] & by_split["test"])
    assert len(singer.labels()) == 20 and singer.labels()[singer.examples("test")[0].label] in ("f1", "f2", "m3", "m4", "m10")


# -- MagnaTagATune ----------------------------------------------------------------------

def test_mtt_top_tags_and_folder_split(registry, tmp_path):
    root = tmp_path / "MTT"
    tags = ["guitar", "piano", "rock", "quiet", "techno"]
    rows = [("0/a.mp3", [1, 0, 1, 0, 0]), ("b/b.mp3", [1, 1, 0, 0, 0]), ("c/c.mp3", [1, 0, 1, 1, 0]),
            ("d/d.mp3", [0, 0, 1, 0, 1]), ("f/e.mp3", [1, 0, 0, 0, 0])]
    with open(root.joinpath("annotations_final.csv") if root.mkdir() is None else None, "w") as f:
        f.write("\t".join(f'"{h}"' for h in ["clip_id", *tags, "mp3_path"]) + "\n")
        for i, (p, t) in enumerate(rows):
            f.write("\t".join(f'"{v}"' for v in [i, *t, p]) + "\n")
    task = registry.build("task", "mtt-tagging", {"data_dir": root, "num_tags": 3})
    assert task.labels() == ["guitar", "rock", "piano"]  # by frequency, ties in column order
    assert [e.path.name for e in task.examples("train")] == ["a.mp3", "b.mp3"]
    assert [e.path.name for e in task.examples("valid")] == ["c.mp3"]
    assert [e.path.name for e in task.examples("test")] == ["d.mp3", "e.mp3"]
    assert task.examples("train")[1].label == (0, 2)
    assert task.targets(task.examples("test")).tolist() == [[0, 1, 0], [1, 0, 0]]
    (root / "annotations_final.csv").write_text("a\tb\n1\t2\n")
    with pytest.raises(TaskDataError, match="clip_id"):
        registry.build("task", "mtt-tagging", {"data_dir": root}).examples("train")


# -- MTG-Jamendo --------------------------------------------------------------------------

def test_mtg_jamendo_reads_official_split_files(registry, tmp_path):
    root = tmp_path / "mtg-jamendo-dataset"
    split_dir = root / "data" / "splits" / "split-0"
    split_dir.mkdir(parents=True)
    header = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\n"
    files = {"train": [("14/1014.mp3", ["genre---rock", "genre---pop"])], "validation": [("15/15.mp3", ["genre---jazz"])],
             "test": [("16/16.mp3", ["genre---rock"]), ("17/17.mp3", ["genre---ambient", "genre---jazz"])]}
    for split, rows in files.items():
        (split_dir / f"autotagging_genre-{split}.tsv").write_text(
            header + "".join(f"track_{i}\tartist_1\talbum_1\t{p}\t200.0\t" + "\t".join(t) + "\n" for i, (p, t) in enumerate(rows)))
    task = registry.build("task", "mtg-genre", {"data_dir": root, "audio_dir": tmp_path / "audio"})
    assert task.labels() == ["genre---ambient", "genre---jazz", "genre---pop", "genre---rock"]
    train = task.examples("train")
    assert train[0].path == tmp_path / "audio" / "14" / "1014.low.mp3" and train[0].label == (2, 3)
    assert len(task.examples("valid")) == 1 and len(task.examples("test")) == 2
    hq = registry.build("task", "mtg-genre", {"data_dir": root, "low_quality": False})
    assert hq.examples("test")[0].path == root / "audio" / "16" / "16.mp3"
    with pytest.raises(TaskDataError, match="autotagging_top50tags-train.tsv"):
        registry.build("task", "mtg-top50", {"data_dir": root}).examples("train")


# -- demo -------------------------------------------------------------------------------

def test_demo_tasks_read_the_demo_schema(registry, tmp_path):
    from mert_core.demo import DemoSize, ensure_demo_data

    root = ensure_demo_data(tmp_path / "demo", size=DemoSize(pieces_per_key=3, piece_seconds=2.0, keys=("C major", "A minor", "F# major"),
                                                             note_pitches=(60, 64), timbres=("flute", "bell", "organ"), note_seconds=0.3), progress=False)
    key = registry.build("task", "demo-key", {"data_dir": root})
    assert sorted(key.labels()[e.label] for e in key.examples("test")) == ["A minor", "C major", "Gb major"]
    beat = registry.build("task", "demo-beat", {"data_dir": root})
    assert beat.level == "frame" and beat.problem == "beat" and len(beat.examples("train")[0].label) >= 2
    timbre = registry.build("task", "demo-timbre", {"data_dir": root})
    assert timbre.labels() == ["bell", "flute", "organ"]
    pitch = registry.build("task", "demo-pitch", {"data_dir": root})
    assert {e.label for e in pitch.examples("train")} == {60, 64}
    with pytest.raises(TaskDataError, match="metadata.jsonl"):
        registry.build("task", "demo-key", {"data_dir": tmp_path}).examples("train")
