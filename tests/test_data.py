"""The data pipeline on real files: formats, bad files, scan cache, deterministic crops."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mert_core.audio import AudioError, audio_info, load_audio, read_crop, resampled_length
from mert_core.config import DataConfig
from mert_core.data import AudioFile, CropBatches, DataError, Manifest, make_loader, scan_audio

SR = 24000


def tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, sr: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(round(seconds * sr)))).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=8 * len(x)))
    return float(np.argmax(spec) * sr / (8 * len(x)))


def can_write_mp3(tmp_path: Path) -> bool:
    try:
        sf.write(str(tmp_path / "probe.mp3"), tone(440, 0.5, SR), SR, format="MP3")
        sf.info(str(tmp_path / "probe.mp3"))
        return True
    except Exception:  # noqa: BLE001 - any failure means: this libsndfile has no mp3
        return False
    finally:
        (tmp_path / "probe.mp3").unlink(missing_ok=True)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3", "opus", "aiff"])
def test_formats_scan_and_read(tmp_path, cache, ext):
    if ext == "mp3" and not can_write_mp3(tmp_path):
        pytest.skip("this libsndfile cannot write/read mp3 (needs libsndfile >= 1.1 with mpg123/lame)")
    d = tmp_path / "audio"
    d.mkdir()
    # Opus lives in an Ogg container; the folder scan finds it by its .opus name
    kind = {"opus": {"format": "OGG", "subtype": "OPUS"}}.get(ext, {})
    sf.write(str(d / f"a.{ext}"), tone(440, 4.0, 48000), 48000, **kind)
    m = scan_audio([d], cache_dir=cache, progress=False)
    assert m.skipped == {}
    (f,) = m.files
    assert f.sample_rate == 48000
    assert abs(f.duration_seconds - 4.0) < 0.06  # mp3 may pad a frame
    crop = read_crop(f.path, SR, 24000, 48000)
    assert crop.shape == (48000,) and crop.dtype == np.float32
    assert abs(peak_hz(crop, SR) - 440) < 2


def test_stereo_44k_to_mono_24k(tmp_path):
    sr = 44100
    left = tone(1000, 3.3, sr, amp=0.6)
    stereo = np.stack([left, 0.5 * left], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), stereo, sr, subtype="FLOAT")
    y = load_audio(path, SR)
    assert y.shape == (resampled_length(len(left), sr, SR),)
    assert abs(len(y) - 3.3 * SR) <= 1
    assert abs(peak_hz(y[2000:-2000], SR) - 1000) < 2  # the tone survives resampling
    assert abs(np.abs(y[2000:-2000]).max() - 0.45) < 0.01  # mono = mean of channels: 0.75 * 0.6


@pytest.mark.parametrize("sr", [44100, 48000, 22050, 24000, 16000])
def test_read_crop_equals_slice_of_whole_file(tmp_path, sr):
    """Seeking and resampling a window gives the whole file's resampled samples."""
    path = tmp_path / "x.flac"
    sf.write(str(path), noise(6.0, sr, seed=sr), sr)
    whole = load_audio(path, SR)  # reference: soxr on the whole file
    assert len(whole) == resampled_length(sf.info(str(path)).frames, sr, SR)
    for offset in (0, 1, 12345, 50000, len(whole) - 30000, len(whole) - 7):
        crop = read_crop(path, SR, offset, 30000)
        ref = whole[offset : offset + 30000]
        assert crop.shape == ref.shape
        np.testing.assert_allclose(crop, ref, atol=2e-5)
    with pytest.raises(AudioError, match="past the end"):
        read_crop(path, SR, len(whole), 10)


# ---------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------


@pytest.fixture
def messy(tmp_path):
    """A folder with good files and every kind of bad one."""
    d = tmp_path / "messy"
    (d / "sub").mkdir(parents=True)
    sf.write(str(d / "good1.wav"), noise(6.0, SR, 1), SR)
    sf.write(str(d / "sub" / "good2.flac"), noise(7.0, 44100, 2), 44100)
    sf.write(str(d / "good3.ogg"), noise(5.5, SR, 3), SR)
    sf.write(str(d / "short.wav"), noise(2.0, SR, 4), SR)  # too short, not corrupt
    sf.write(str(d / "full.wav"), noise(6.0, SR, 5), SR, subtype="PCM_16")
    raw = (d / "full.wav").read_bytes()
    (d / "truncated.wav").write_bytes(raw[: len(raw) // 2])  # header says 6 s, half present
    (d / "full.wav").unlink()
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("this is not audio\n" * 20)
    (d / "garbage.mp3").write_bytes(np.random.default_rng(0).bytes(3000))
    nan = noise(6.0, SR, 6)
    nan[::1000] = np.nan
    sf.write(str(d / "nan.wav"), nan, SR, subtype="FLOAT")
    (d / "notes.txt").write_text("ignored: not an audio extension")
    return d


def test_bad_files_skipped_and_counted(messy, cache):
    m = scan_audio([messy], cache_dir=cache, progress=False)
    skipped = {Path(p).name: reason for p, reason in m.skipped.items()}
    assert set(skipped) == {"truncated.wav", "empty.wav", "text.wav", "garbage.mp3"}
    assert "truncated" in skipped["truncated.wav"]
    names = sorted(Path(f.path).name for f in m.files)
    assert names == ["good1.wav", "good2.flac", "good3.ogg", "nan.wav", "short.wav"]  # NaN: header is fine
    _, too_short = m.split_by_duration(3.0)
    assert (len(m.files), len(m.skipped), len(too_short)) == (5, 4, 1)

    ds = CropBatches(m, batch_size=4, seed=0)
    assert [Path(p).name for p in ds.too_short] == ["short.wav"]
    seen_bad, seen_paths = set(), set()
    for i in range(6):  # 24 draws over 4 usable files: nan.wav is drawn, fails, is replaced
        item = ds[i]
        assert torch.isfinite(item["wave"]).all()
        seen_paths.update(Path(p).name for p in item["paths"])
        for path, reason in item["skipped"]:
            seen_bad.add(Path(path).name)
            assert "NaN" in reason
    assert seen_bad == {"nan.wav"}
    assert seen_paths == {"good1.wav", "good2.flac", "good3.ogg"}


def test_truncated_compressed_file_fails_at_read(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(str(path), noise(6.0, SR, 7), SR)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    info = audio_info(path)  # the header still promises 6 s
    assert info.frames == 6 * SR
    with pytest.raises(AudioError):
        read_crop(path, SR, 5 * SR, SR)


def test_replacement_is_deterministic(messy, cache):
    """An item that met a bad file is the same in a fresh process and on a repeat."""
    m = scan_audio([messy], cache_dir=cache, progress=False)
    first = CropBatches(m, batch_size=4, seed=3)
    index = next(i for i in range(50) if first[i]["skipped"])
    a = first[index]  # the bad file is now known to `first`
    b = CropBatches(m, batch_size=4, seed=3)[index]  # fresh: must open it, fail, replace
    assert a["paths"] == b["paths"] and a["offsets"] == b["offsets"] and a["skipped"] == b["skipped"]
    assert torch.equal(a["wave"], b["wave"])


def test_all_files_bad_is_a_clear_error(tmp_path, cache):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.wav").write_text("nope")
    m = scan_audio([d], cache_dir=cache, progress=False)
    with pytest.raises(DataError, match="no training files"):
        CropBatches(m, batch_size=2)
    with pytest.raises(DataError, match="no such file or folder"):
        scan_audio([tmp_path / "missing"], cache_dir=cache)


# ---------------------------------------------------------------------------
# Scan cache and manifests
# ---------------------------------------------------------------------------


def test_scan_cache_reuses_unchanged_files(tmp_path, cache):
    d = tmp_path / "lib"
    d.mkdir()
    for k in range(4):
        sf.write(str(d / f"f{k}.wav"), noise(4.0 + k, SR, k), SR)
    first = scan_audio([d], cache_dir=cache, progress=False)
    assert first.scan_stats == {"probed": 4, "reused": 0, "trusted": 0}
    assert list((cache / "scans").glob("scan-*.tsv"))

    # Replace f0's bytes with garbage of the same size and restore its mtime: a
    # scan that opened it would now call it unreadable; the cached scan does not.
    f0 = d / "f0.wav"
    st = f0.stat()
    f0.write_bytes(b"\0" * st.st_size)
    os.utime(f0, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Change f1 (size and mtime), delete f2, add f9.
    sf.write(str(d / "f1.wav"), noise(9.0, SR, 11), SR)
    (d / "f2.wav").unlink()
    sf.write(str(d / "f9.wav"), noise(3.5, SR, 9), SR)

    second = scan_audio([d], cache_dir=cache, progress=False)
    assert second.scan_stats == {"probed": 2, "reused": 2, "trusted": 0}  # f1 and f9 opened
    by_name = {Path(f.path).name: f for f in second.files}
    assert sorted(by_name) == ["f0.wav", "f1.wav", "f3.wav", "f9.wav"]  # f0 not re-opened, f2 dropped
    assert by_name["f1.wav"].frames == 9 * SR and by_name["f9.wav"].frames == int(3.5 * SR)

    third = scan_audio([d], cache_dir=cache, progress=False)
    assert third.scan_stats["probed"] == 0 and third.files == second.files


def test_manifest_inputs_tsv_and_csv(tmp_path, cache):
    d = tmp_path / "data"
    (d / "clips").mkdir(parents=True)
    sf.write(str(d / "clips" / "a.wav"), noise(4.0, SR, 1), SR)
    sf.write(str(d / "clips" / "b.flac"), noise(5.0, 44100, 2), 44100)
    tsv = d / "train.tsv"
    tsv.write_text("path\tduration\nclips/a.wav\t4.0\nclips/missing.wav\t3.5\n")
    csv_ = d / "more.csv"
    csv_.write_text("path,label\nclips/b.flac,x\nclips/gone.wav,y\n")
    m = scan_audio([tsv, csv_], cache_dir=cache, progress=False)
    assert m.scan_stats == {"probed": 1, "reused": 0, "trusted": 2}  # durations given are trusted
    names = {Path(f.path).name: f for f in m.files}
    assert set(names) == {"a.wav", "b.flac", "missing.wav"}  # a missing listed file with a duration fails at read
    assert names["b.flac"].sample_rate == 44100 and names["b.flac"].frames == 5 * 44100
    assert names["a.wav"].path == str(d / "clips" / "a.wav")  # resolved against the manifest's folder
    assert [Path(p).name for p in m.skipped] == ["gone.wav"]

    saved = m.save(tmp_path / "manifest.tsv")
    assert Manifest.load(saved) == m
    again = scan_audio([saved], cache_dir=cache, progress=False)  # our own format is a valid input
    assert again.files == m.files and again.skipped == m.skipped


@pytest.mark.parametrize(
    "text, match",
    [
        ("file\tduration\nx.wav\t1\n", "lacks column.*path"),
        ("path\tduration\nx.wav\tlong\n", "line 2.*'duration'.*expected a number"),
        ("path\tduration\nx.wav\t1\textra\n", "line 2: 3 fields"),
        ("", "empty manifest"),
    ],
)
def test_malformed_manifest_errors(tmp_path, cache, text, match):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        scan_audio([path], cache_dir=cache)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------
# Deterministic batches
# ---------------------------------------------------------------------------


@pytest.fixture
def library(tmp_path, cache):
    d = tmp_path / "library"
    d.mkdir()
    for k in range(9):
        sr = (24000, 44100, 48000)[k % 3]
        sf.write(str(d / f"song{k}.flac"), noise(5.5 + k, sr, 100 + k), sr)
    sf.write(str(d / "short_but_ok.wav"), noise(3.5, SR, 99), SR)  # 3.5 s: used, zero-padded
    return scan_audio([d], cache_dir=cache, progress=False)


def test_batches_are_a_function_of_the_index(library):
    a = CropBatches(library, batch_size=3, seed=5)
    b = CropBatches(library, batch_size=3, seed=5)
    _ = [b[i] for i in (9, 2, 40)]  # a different history must not matter
    for i in (0, 7, 40):
        x, y = a[i], b[i]
        assert x["paths"] == y["paths"] and x["offsets"] == y["offsets"]
        assert torch.equal(x["wave"], y["wave"]) and torch.equal(x["lengths"], y["lengths"])
    other = CropBatches(library, batch_size=3, seed=6)
    assert [other[i]["paths"] for i in range(4)] != [a[i]["paths"] for i in range(4)]
    item = a[0]
    assert item["wave"].shape == (3, 5 * SR) and item["wave"].dtype == torch.float32
    assert item["lengths"].dtype == torch.int64


def test_epochs_visit_every_file_once(library):
    ds = CropBatches(library, batch_size=5, seed=1)  # 10 usable files: an epoch is 2 batches
    for epoch in range(3):
        paths = ds[2 * epoch]["paths"] + ds[2 * epoch + 1]["paths"]
        assert sorted(paths) == sorted(f.path for f in library.files)


def test_crops_match_the_resampled_file_and_pad_short_clips(library):
    ds = CropBatches(library, batch_size=4, seed=2)
    for i in range(3):
        item = ds[i]
        for b, (path, offset) in enumerate(zip(item["paths"], item["offsets"])):
            whole = load_audio(path, SR)
            n = int(item["lengths"][b])
            assert n == min(5 * SR, len(whole) - offset)
            np.testing.assert_allclose(item["wave"][b, :n].numpy(), whole[offset : offset + n], atol=2e-5)
            assert (item["wave"][b, n:] == 0).all()
    short = next(f for f in library.files if f.path.endswith("short_but_ok.wav"))
    f, offset = next(ds.candidate(j) for j in range(100) if ds.candidate(j)[0] == short)
    assert offset == 0


def test_align_crops_puts_offsets_on_the_grid(library):
    ds = CropBatches(library, batch_size=4, seed=0, align_crops=True, crop_seconds=2.0)
    crop = 2 * SR
    offsets = [o for i in range(10) for o in ds[i]["offsets"]]
    assert all(o % crop == 0 for o in offsets)
    assert len(set(offsets)) > 2  # not all at the start
    for i in range(3):  # whole windows only
        item = ds[i]
        assert (item["lengths"] == crop).all()


def test_ranks_read_disjoint_shards(library):
    world = 3
    shards = [CropBatches(library, batch_size=2, seed=0, rank=r, world_size=world) for r in range(world)]
    seen = [{p for i in range(8) for p in ds[i]["paths"]} for ds in shards]
    for r in range(world):
        assert seen[r] == {f.path for f in shards[r].files}
        for q in range(r + 1, world):
            assert not seen[r] & seen[q]
    assert set().union(*seen) == {f.path for f in library.files}


def test_loader_resumes_at_an_index(library):
    ds = CropBatches(library, batch_size=2, seed=4)
    loader = make_loader(ds, start_index=7, num_workers=0)
    got = [item for _, item in zip(range(3), loader)]
    for k, item in enumerate(got):
        ref = ds[7 + k]
        assert item["paths"] == ref["paths"] and torch.equal(item["wave"], ref["wave"])


def test_loader_with_worker_processes(library):
    ds = CropBatches(library, batch_size=2, seed=4)
    loader = make_loader(ds, start_index=3, num_workers=2)
    got = [item for _, item in zip(range(4), loader)]
    assert [g["paths"] for g in got] == [ds[i]["paths"] for i in range(3, 7)]
    assert all(torch.equal(g["wave"], ds[3 + k]["wave"]) for k, g in enumerate(got))


def test_dataset_from_config(library, tmp_path, cache):
    # what the trainer does with config.data: scan, then crop batches
    folder = Path(library.files[0].path).parent
    data = DataConfig(paths=[folder], batch_size=2, crop_seconds=1.0)
    manifest = scan_audio(data.paths, cache_dir=cache, progress=False)
    ds = CropBatches(manifest, data.batch_size, sample_rate=data.sample_rate, crop_seconds=data.crop_seconds,
                     min_seconds=data.min_seconds, seed=1)
    assert ds[0]["wave"].shape == (2, SR)
    assert ds.num_usable_files == 10


def test_manifest_trusted_duration_without_rate(tmp_path):
    f = AudioFile(path="x", duration_seconds=2.5, sample_rate=0, frames=0)
    assert f.num_samples(SR) == int(2.5 * SR)
    g = AudioFile(path="y", duration_seconds=1.0, sample_rate=44100, frames=44100)
    assert g.num_samples(SR) == SR
