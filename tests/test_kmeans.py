"""The k-means teachers: features against librosa, k-means against scikit-learn,
fitting, artifacts, determinism, frame alignment, errors, the CLI."""

from __future__ import annotations

import json

import librosa
import numpy as np
import pytest
import scipy.fft
import soundfile as sf
import torch
from click.testing import CliRunner
from safetensors import safe_open
from sklearn.cluster import KMeans

from conftest import assert_kmeans_labels_equal_up_to_ties, music
from mert_core.audio import read_crop
from mert_core.checkpoint import load_student, save_student
from mert_core.geometry import FrameGeometry
from mert_core.labels import fit_teacher, student_frames
from mert_core.model import tiny
from mert_core.registry import PluginError, load_registry
from mert_plugins.teachers._features import ChromaFeatures, LogMelFeatures, MFCCFeatures, pad_for_frames
from mert_plugins.teachers._streaming_kmeans import FeatureCache, KMeansError, _chunk_rows, fit_kmeans, nearest
from mert_plugins.teachers.kmeans import DEFAULT_SAMPLE_HOURS, MFCCOptions, NotFittedError, TeacherFileError, plan_sample, read_teacher_file

SR = 24000


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kmeans-audio")
    for i, seconds in enumerate((6.0, 7.0, 5.5)):
        sf.write(folder / f"piece{i}.wav", music(seconds, SR, seed=10 + i), SR)
    sf.write(folder / "resampled.flac", music(4.0, 44100, seed=20), 44100)
    return folder


SMALL_MFCC = {"n_clusters": 12, "n_mels": 40}
SMALL_LMC = {"n_clusters_logmel": 6, "n_clusters_chroma": 5, "n_mels": 32}


@pytest.fixture(scope="module")
def mfcc_file(registry, audio_dir, tmp_path_factory):
    return fit_teacher("kmeans-mfcc", [audio_dir], tmp_path_factory.mktemp("fit") / "mfcc.safetensors", SMALL_MFCC, registry=registry, device="cpu", progress=False)


@pytest.fixture(scope="module")
def lmc_file(registry, audio_dir, tmp_path_factory):
    return fit_teacher("kmeans-logmel-chroma", [audio_dir], tmp_path_factory.mktemp("fit") / "lmc.safetensors", SMALL_LMC, registry=registry, device="cpu", progress=False)


def build(registry, name, **options):
    return registry.build("teacher", name, options, geometry=FrameGeometry(SR, 320))


# -- declared targets --------------------------------------------------------------


def test_registered_with_the_papers_defaults(registry):
    mfcc = build(registry, "kmeans-mfcc")
    assert mfcc.needs_fit()
    assert mfcc.target_spec().num_classes == 500 and mfcc.target_spec().frame_rate_hz == 75.0
    assert mfcc.extractors["mfcc"].dim == 39
    assert build(registry, "kmeans-mfcc", n_mfcc=20).extractors["mfcc"].dim == 60
    lmc = build(registry, "kmeans-logmel-chroma")
    assert (lmc.target_spec().num_codebooks, lmc.target_spec().num_classes) == (1, 60000)
    sep = build(registry, "kmeans-logmel-chroma", combine="separate").target_spec()
    assert (sep.num_codebooks, sep.num_classes) == (2, 300)
    assert "kmeans-hidden" in registry.names("teacher")
    with pytest.raises(PluginError, match="n_clusters"):
        build(registry, "kmeans-mfcc", n_clusters=1)


# -- features against librosa ------------------------------------------------------


def test_features_equal_librosa_on_the_same_frames():
    wave = torch.from_numpy(music(2.0, SR, seed=3))[None]
    T = student_frames(wave.shape[1])

    mfcc = MFCCFeatures(SR, 320, n_mfcc=13, n_mels=40, n_fft=1024)
    ours = mfcc(wave)[0].double().numpy()  # T, 39
    assert ours.shape == (T, 39)
    y = pad_for_frames(wave, 1024)[0].double().numpy()
    mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=1024, hop_length=320, center=False, n_mels=40, power=2.0)
    ref = scipy.fft.dct(np.log(mel + 1e-6), type=2, axis=0, norm="ortho")[:13]  # 13, T
    np.testing.assert_allclose(ours[:, :13], ref.T, rtol=1e-3, atol=2e-3)
    d1 = librosa.feature.delta(ref, width=5, order=1)
    d2 = librosa.feature.delta(d1, width=5, order=1)
    np.testing.assert_allclose(ours[2:-2, 13:26], d1.T[2:-2], rtol=1e-3, atol=2e-3)  # edges: replicate vs interp padding
    np.testing.assert_allclose(ours[4:-4, 26:], d2.T[4:-4], rtol=1e-3, atol=2e-3)

    logmel = LogMelFeatures(SR, 320, n_mels=64, n_fft=1024)(wave)[0].double().numpy()
    mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=1024, hop_length=320, center=False, n_mels=64, power=2.0)
    np.testing.assert_allclose(logmel, np.log(mel + 1e-6).T, rtol=1e-4, atol=1e-3)

    chroma = ChromaFeatures(SR, 320, n_fft=2048)(wave)[0].double().numpy()
    y2 = pad_for_frames(wave, 2048)[0].double().numpy()
    ref = librosa.feature.chroma_stft(y=y2, sr=SR, n_fft=2048, hop_length=320, center=False, tuning=0.0)
    assert chroma.shape == (T, 12)
    np.testing.assert_allclose(chroma, ref.T, rtol=1e-4, atol=1e-5)


def test_features_have_the_students_frame_count_and_do_not_depend_on_the_batch():
    ext = MFCCFeatures(SR, 320)
    for S in (0, 399, 400, 719, 720, 24000, 120000, 122880):
        assert ext(torch.zeros(2, S)).shape == (2, student_frames(S), 39)
    waves = torch.from_numpy(np.stack([music(3.0, SR, seed=s) for s in range(3)]))
    batched = ext(waves)
    # another batch shape may take other kernels (chroma's differ by ~1e-6 with 2 threads): float rounding only
    for other in (ext, LogMelFeatures(SR, 320), ChromaFeatures(SR, 320)):
        together = other(waves)
        for b in range(3):
            torch.testing.assert_close(together[b], other(waves[b : b + 1])[0], rtol=1e-5, atol=1e-5)
    # a frame sees only its own window: changing audio far away leaves it alone (bitwise: the same
    # (1, S) computation, and no output element reads the changed samples)
    changed = waves[:1].clone()
    changed[0, 40000:] = 0
    assert torch.equal(ext(changed)[0, :100], ext(waves[:1])[0, :100])


# -- k-means against scikit-learn -----------------------------------------------


def _cache(tmp_path, x: np.ndarray) -> FeatureCache:
    cache = FeatureCache(tmp_path / "x.f32", x.shape[1])
    for part in np.array_split(x, 7):
        cache.append(torch.from_numpy(part))
    cache.finish()
    return cache


def test_streamed_kmeans_matches_full_batch_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 5)) * 4
    x = (centers[rng.integers(0, 12, 6000)] + rng.normal(size=(6000, 5))).astype(np.float32)
    cache = _cache(tmp_path, x)
    ours = fit_kmeans(cache, 12, seed=0, init_frames=500, progress=False)  # subsample, then streamed passes
    assert ours.passes >= 1 and ours.init_frames == 500 and ours.num_frames == 6000
    # the reported inertia is the exact inertia of the returned centroids
    c = ours.centroids.double().numpy()
    exact = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1).min(1).sum()
    assert ours.inertia == pytest.approx(exact, rel=1e-5)
    ref = KMeans(12, n_init=1, random_state=0).fit(x)
    assert ours.inertia <= ref.inertia_ * 1.01
    again = fit_kmeans(cache, 12, seed=0, init_frames=500, progress=False)
    assert torch.equal(again.centroids, ours.centroids)  # bitwise: the same computation on the same cache
    with pytest.raises(KMeansError, match="n_clusters"):
        fit_kmeans(cache, 7000, seed=0, progress=False)
    cache.close()
    assert not (tmp_path / "x.f32").exists()


def test_nearest_is_the_argmin_across_score_blocks():
    # K = 600 puts the search in blocks of a few thousand rows: rows on both sides of
    # every block edge must get the same answer as one brute-force argmin
    rng = np.random.default_rng(4)
    c = rng.normal(size=(600, 39)).astype(np.float32)
    x = rng.normal(size=(5000, 39)).astype(np.float32)
    assert _chunk_rows(640, torch.device("cpu")) < len(x)  # several blocks
    labels, dist = nearest(torch.from_numpy(x), torch.from_numpy(c))
    d = ((x[:, None].astype(np.float64) - c[None]) ** 2).sum(-1)
    ref = d.argmin(1)
    picked = d[np.arange(len(x)), labels.numpy()]
    # the same centroid, or one whose distance ties the best to float32 rounding
    assert np.all((labels.numpy() == ref) | (picked - d.min(1) <= 1e-5 * d.min(1)))
    assert (labels.numpy() == ref).mean() > 0.999
    np.testing.assert_allclose(dist.numpy(), d.min(1), rtol=1e-4)


def test_passes_bar_grows_past_its_first_total_and_ends_full(tmp_path):
    import io

    from tqdm import tqdm

    from mert_plugins.teachers import _streaming_kmeans as sk

    rng = np.random.default_rng(1)
    centers = rng.normal(size=(40, 8)) * 1.5
    x = torch.from_numpy((centers[rng.integers(0, 40, 20000)] + rng.normal(size=(20000, 8))).astype(np.float32))
    rows = sk._Rows(lambda a, b: x[a:b], len(x), torch.zeros(8), np.zeros(len(x), np.int32), np.zeros((len(x), 4), np.float32))
    start = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:40]].clone()
    class Bar(tqdm):
        overrun = 0

        def update(self, n=1):
            super().update(n)
            Bar.overrun = max(Bar.overrun, self.n - self.total)  # a bar past 100 %: an ETA of nothing

    with Bar(total=2, file=io.StringIO()) as bar:  # fewer than the passes Lloyd needs here
        result = sk.lloyd(rows, start, 200, 0.0, bar, inertia_tol=1e-4)
        assert result.iterations > 2 and bar.total == bar.n == result.iterations
    assert Bar.overrun == 0


def test_default_fit_stops_early_within_one_percent_of_exact_lloyd(tmp_path):
    # overlapping clusters: Lloyd's tail is long, so the early stop on inertia really cuts passes
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(40, 8)) * 1.5
    x = (centers[rng.integers(0, 40, 40000)] + rng.normal(size=(40000, 8))).astype(np.float32)
    cache = _cache(tmp_path, x)
    o = MFCCOptions()
    fast = fit_kmeans(cache, 40, seed=0, n_init=o.n_init, max_iter=o.max_iter, max_passes=o.max_passes, tol=o.tol,
                      inertia_tol=o.inertia_tol, progress=False)
    exact = fit_kmeans(cache, 40, seed=0, max_iter=o.max_iter, max_passes=1000, tol=0.0, progress=False)  # Lloyd to a fixed point
    assert fast.init_frames < fast.num_frames and fast.passes >= 1  # the default fit streams passes over the sample
    assert fast.inertia <= exact.inertia * 1.01  # the bound: within 1 % of exact Lloyd
    cache.close()


def test_default_sample_is_bounded_whatever_the_corpus(tmp_path):
    assert MFCCOptions().sample_hours == DEFAULT_SAMPLE_HOURS <= 10
    # a 200-hour manifest: rows with trusted durations, pointing at one real file through links
    real = tmp_path / "real.wav"
    sf.write(real, music(6.0, SR, seed=3), SR)
    rows = ["path\tduration"]
    for i in range(200):
        (tmp_path / f"song{i}.wav").symlink_to(real)
        rows.append(f"song{i}.wav\t3600")
    (tmp_path / "corpus.tsv").write_text("\n".join(rows) + "\n")
    plan = plan_sample([tmp_path / "corpus.tsv"], SR, 5.0, MFCCOptions().sample_fraction, MFCCOptions().sample_hours, seed=0, progress=False)
    assert plan.total_hours == pytest.approx(200)
    assert DEFAULT_SAMPLE_HOURS <= plan.sample_hours <= DEFAULT_SAMPLE_HOURS + 5 / 3600  # whole 5 s chunks


def test_fit_plan_states_the_sample_and_a_time(registry, audio_dir):
    line = build(registry, "kmeans-mfcc", **SMALL_MFCC).fit_plan([audio_dir], seed=0, device="cpu")
    assert "h of" in line and "about" in line and "k-means" in line


# -- fitting a teacher --------------------------------------------------------------


def _sample_features(teacher, meta) -> np.ndarray:
    """Recompute the features of the sample the artifact says it saw (chunk by chunk)."""
    rows = []
    chunk = round(meta["fit"]["chunk_seconds"] * SR)
    for path, spans in meta["sample"]["spans_samples"].items():
        for start, stop in spans:
            for a in range(start, stop, chunk):
                wave = torch.from_numpy(read_crop(path, SR, a, min(chunk, stop - a)))[None]
                rows.append(teacher.extractors["mfcc"](wave)[0].double().numpy())
    return np.concatenate(rows)


def test_fit_writes_a_self_describing_artifact(registry, mfcc_file, audio_dir):
    with safe_open(str(mfcc_file), framework="pt") as f:
        assert set(f.keys()) == {"centroids.mfcc"}
    meta, tensors = read_teacher_file(mfcc_file)
    assert tensors["centroids.mfcc"].shape == (12, 39)
    assert meta["teacher"] == "kmeans-mfcc" and meta["sample_rate"] == SR and meta["frame_rate_hz"] == 75.0
    assert meta["features"]["n_mfcc"] == 13 and meta["features"]["n_mels"] == 40
    assert {"torch", "torchaudio", "numpy", "librosa"} <= set(meta["versions"])
    assert set(meta["sample"]["spans_samples"]) == {str(p) for p in audio_dir.iterdir()}
    assert meta["sample"]["sample_hours"] == pytest.approx(22.5 / 3600, rel=1e-3)
    json.dumps(meta)  # plain JSON, no pickle anywhere

    teacher = build(registry, "kmeans-mfcc", teacher_file=str(mfcc_file))
    x = _sample_features(teacher, meta)
    c = tensors["centroids.mfcc"].double().numpy()
    d = ((x[:, None] - c[None]) ** 2).sum(-1)
    stream = meta["streams"]["mfcc"]
    assert stream["num_frames"] == len(x)
    assert stream["inertia"] == pytest.approx(d.min(1).sum(), rel=1e-4)
    ref = KMeans(12, n_init=1, random_state=0).fit(x)
    assert stream["inertia"] <= ref.inertia_ * 1.02


def test_labels_are_the_nearest_centroid(registry, mfcc_file):
    teacher = build(registry, "kmeans-mfcc", teacher_file=str(mfcc_file))
    wave = torch.from_numpy(np.stack([music(3.0, SR, seed=s) for s in (31, 32)]))
    labels = teacher.targets(wave)
    assert labels.dtype == torch.int64 and labels.shape == (2, student_frames(wave.shape[1]), 1)
    x = teacher.extractors["mfcc"](wave).double().numpy().reshape(-1, 39)
    c = teacher.codebooks["mfcc"].centroids.double().numpy()
    ref = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert (labels.flatten().numpy() == ref).mean() > 0.999
    alone = torch.cat([teacher.targets(wave[b : b + 1]) for b in range(2)])
    assert_kmeans_labels_equal_up_to_ties(teacher, wave, alone, labels)  # another batch shape: up to near-ties
    for S in (0, 399, 400, 720, 24000):
        assert teacher.targets(torch.zeros(1, S)).shape == (1, student_frames(S), 1)


def test_sklearn_backend_fits_labels_and_trains(registry, audio_dir, mfcc_file, tmp_path, monkeypatch):
    """backend='sklearn': MiniBatchKMeans fits the codebook; labels are still the
    nearest centroid; the fitted file labels a store and trains a student."""
    from mert_core import api
    from mert_core.labels import LabelStore, label_data

    monkeypatch.setenv("MERT_CACHE", str(tmp_path / "cache"))
    fitted = fit_teacher("kmeans-mfcc", [audio_dir], tmp_path / "sk.safetensors", {**SMALL_MFCC, "backend": "sklearn"},
                         registry=registry, device="cpu", progress=False)
    meta, tensors = read_teacher_file(fitted)
    native_meta, _ = read_teacher_file(mfcc_file)
    assert meta["fit"]["backend"] == "sklearn" and native_meta["fit"]["backend"] == "native"
    stream = meta["streams"]["mfcc"]
    assert tensors["centroids.mfcc"].shape == (12, 39) and stream["num_frames"] == native_meta["streams"]["mfcc"]["num_frames"]
    assert stream["inertia"] <= 1.25 * native_meta["streams"]["mfcc"]["inertia"]  # a k-means fit, if a mini-batch one

    teacher = build(registry, "kmeans-mfcc", teacher_file=str(fitted))
    wave = torch.from_numpy(np.stack([music(3.0, SR, seed=s) for s in (41, 42)]))
    labels = teacher.targets(wave)
    x = teacher.extractors["mfcc"](wave).double().numpy().reshape(-1, 39)
    c = tensors["centroids.mfcc"].double().numpy()
    assert (labels.flatten().numpy() == ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)).mean() > 0.999
    assert len(labels.unique()) >= 4

    store = label_data("kmeans-mfcc", [audio_dir], tmp_path / "store", teacher_file=fitted, window_samples=2 * SR, device="cpu", progress=False)
    assert store.num_files == 4 and LabelStore.open(tmp_path / "store").labels.shape[1] == 1
    config = api.make_train_config(
        teachers=["kmeans-mfcc"], preset="tiny", data=[audio_dir], out_dir=tmp_path / "run", max_steps=2, registry=registry,
        overrides=[f"teacher.kmeans-mfcc.teacher_file={fitted}", "data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0",
                   "log_every=1", f"teacher.kmeans-mfcc.label_store={tmp_path / 'store'}"],
    )
    api.train(config, registry=registry, progress=False, log=lambda message: None)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and np.isfinite(last["loss/kmeans-mfcc"])


def test_tie_check_refuses_labels_that_are_no_tie(registry, mfcc_file, lmc_file):
    """The tie-aware comparison fails on a label changed away from a tie, in a plain or a product codebook."""
    wave = torch.from_numpy(np.stack([music(2.0, SR, seed=s) for s in (33, 34)]))
    cases = (
        ("kmeans-mfcc", mfcc_file, "mfcc", lambda label: (label + 1) % 12),
        ("kmeans-logmel-chroma", lmc_file, "chroma", lambda label: label - label % 5 + (label + 1) % 5),  # logmel * 5 + chroma
    )
    for name, fitted, stream, other_label in cases:
        t = build(registry, name, teacher_file=str(fitted))
        want = t.targets(wave)
        got = want.clone()
        got[1, 20] = other_label(got[1, 20])
        with pytest.raises(AssertionError, match=f"{stream} clip 1 frame 20: .* from a tie"):
            assert_kmeans_labels_equal_up_to_ties(t, wave, want, got)
        got[0, :10] = other_label(got[0, :10])
        with pytest.raises(AssertionError, match="frames differ"):
            assert_kmeans_labels_equal_up_to_ties(t, wave, want, got)


def test_fitting_is_deterministic_for_a_seed(registry, audio_dir, mfcc_file, tmp_path):
    again = fit_teacher("kmeans-mfcc", [audio_dir], tmp_path / "again.safetensors", SMALL_MFCC, registry=registry, device="cpu", progress=False)
    a, b = build(registry, "kmeans-mfcc", teacher_file=str(mfcc_file)), build(registry, "kmeans-mfcc", teacher_file=str(again))
    assert torch.equal(a.codebooks["mfcc"].centroids, b.codebooks["mfcc"].centroids)  # bitwise: the same computation
    assert a.config_hash() == b.config_hash()
    half = {**SMALL_MFCC, "sample_fraction": 0.5}
    s1 = fit_teacher("kmeans-mfcc", [audio_dir], tmp_path / "s1.safetensors", half, registry=registry, seed=1, device="cpu", progress=False)
    s2 = fit_teacher("kmeans-mfcc", [audio_dir], tmp_path / "s2.safetensors", half, registry=registry, seed=2, device="cpu", progress=False)
    m1, m2 = read_teacher_file(s1)[0], read_teacher_file(s2)[0]
    assert m1["sample"]["spans_samples"] != m2["sample"]["spans_samples"]
    assert m1["sample"]["sample_hours"] < m1["sample"]["total_hours"] and m1["fit"]["seed"] == 1
    assert build(registry, "kmeans-mfcc", teacher_file=str(s1)).config_hash() != a.config_hash()


def test_fit_streams_through_a_bounded_cache_and_skips_bad_files(registry, audio_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in audio_dir.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    sf.write(data / "tiny.wav", music(0.01, SR, seed=1), SR)  # 240 samples: not one frame
    cache_dir = tmp_path / "cache"
    opts = {**SMALL_MFCC, "init_frames": 300, "cache_dir": str(cache_dir), "sample_hours": 15 / 3600}
    out = fit_teacher("kmeans-mfcc", [data], tmp_path / "t.safetensors", opts, registry=registry, device="cpu", progress=False)
    meta = read_teacher_file(out)[0]
    assert str(data / "broken.wav") in meta["sample"]["unusable_files"]
    assert meta["streams"]["mfcc"]["init_frames"] == 300 and meta["streams"]["mfcc"]["streamed_passes"] >= 1
    assert meta["sample"]["sample_hours"] == pytest.approx(15 / 3600, abs=5.0 / 3600)  # whole 5 s chunks
    assert list(cache_dir.iterdir()) == []  # the feature cache is gone


def test_logmel_chroma_product_is_logmel_times_kchroma_plus_chroma(registry, lmc_file, audio_dir, tmp_path):
    product = build(registry, "kmeans-logmel-chroma", teacher_file=str(lmc_file))
    separate = build(registry, "kmeans-logmel-chroma", teacher_file=str(lmc_file), combine="separate")
    assert product.target_spec().num_classes == 30 and separate.target_spec().num_codebooks == 2
    wave = torch.from_numpy(music(4.0, SR, seed=40))[None]
    p, s = product.targets(wave), separate.targets(wave)
    assert p.shape == (1, student_frames(wave.shape[1]), 1) and s.shape[-1] == 2
    assert torch.equal(p[..., 0], s[..., 0] * 5 + s[..., 1])  # bitwise: the same features and centroids, combined
    assert s[..., 0].max() < 6 and s[..., 1].max() < 5
    assert product.config_hash() != separate.config_hash()
    # the chroma codebook alone: nearest centroid of librosa-equal chroma frames
    chroma = separate.extractors["chroma"](wave)[0].double().numpy()
    c = separate.codebooks["chroma"].centroids.double().numpy()
    ref = ((chroma[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert (s[0, :, 1].numpy() == ref).mean() > 0.999
    # fitting is deterministic for both codebooks
    again = fit_teacher("kmeans-logmel-chroma", [audio_dir], tmp_path / "again.safetensors", SMALL_LMC, registry=registry, device="cpu", progress=False)
    assert build(registry, "kmeans-logmel-chroma", teacher_file=str(again)).config_hash() == product.config_hash()


def test_teacher_file_errors_name_the_problem(registry, mfcc_file, lmc_file, tmp_path):
    with pytest.raises(TeacherFileError, match="no such file"):
        build(registry, "kmeans-mfcc", teacher_file=str(tmp_path / "missing.safetensors"))
    with pytest.raises(TeacherFileError, match="kmeans-logmel-chroma"):
        build(registry, "kmeans-mfcc", teacher_file=str(lmc_file))
    with pytest.raises(TeacherFileError, match="n_mfcc=20.*n_mfcc=13"):
        build(registry, "kmeans-mfcc", teacher_file=str(mfcc_file), n_mfcc=20)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TeacherFileError, match="cannot read"):
        build(registry, "kmeans-mfcc", teacher_file=str(tmp_path / "junk.safetensors"))
    # settings not given are taken from the file
    adopted = build(registry, "kmeans-mfcc", teacher_file=str(mfcc_file))
    assert adopted.options.n_clusters == 12 and adopted.options.n_mels == 40
    assert adopted.target_spec().num_classes == 12
    # a moved copy is the same teacher
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(mfcc_file.read_bytes())
    assert build(registry, "kmeans-mfcc", teacher_file=str(copy)).config_hash() == adopted.config_hash()


def test_an_unfitted_teacher_says_how_to_fit_it(registry):
    teacher = build(registry, "kmeans-mfcc")
    with pytest.raises(NotFittedError, match="teacher_file"):
        teacher.targets(torch.zeros(1, 24000))
    with pytest.raises(NotFittedError):
        teacher.config_hash()
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_teacher("cqt", ["."], "x.safetensors", registry=registry, progress=False)


# -- kmeans-hidden: HuBERT's second iteration ----------------------------------------


@pytest.fixture(scope="module")
def student_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    save_student(tiny(), path)
    return path


def test_hidden_teacher_clusters_a_students_layer(registry, audio_dir, student_file, tmp_path):
    opts = {"checkpoint": str(student_file), "layer": 1, "n_clusters": 6, "sample_fraction": 0.5}
    out = fit_teacher("kmeans-hidden", [audio_dir], tmp_path / "h.safetensors", opts, registry=registry, device="cpu", progress=False)
    again = fit_teacher("kmeans-hidden", [audio_dir], tmp_path / "h2.safetensors", opts, registry=registry, device="cpu", progress=False)
    meta, tensors = read_teacher_file(out)
    assert tensors["centroids.hidden"].shape == (6, 128) and meta["features"]["layer"] == 1
    assert torch.equal(tensors["centroids.hidden"], read_teacher_file(again)[1]["centroids.hidden"])  # the same computation
    teacher = build(registry, "kmeans-hidden", teacher_file=str(out))  # the checkpoint comes from the file
    assert teacher.target_spec().num_classes == 6
    wave = torch.from_numpy(np.stack([music(2.0, SR, seed=s) for s in (51, 52)]))
    labels = teacher.targets(wave)
    assert labels.shape == (2, student_frames(wave.shape[1]), 1)
    # reference: the student's own hidden states, nearest centroid in float64
    student, info = load_student(student_file)
    assert meta["identity"]["checkpoint_id"] == info["checkpoint_id"]
    with torch.no_grad():
        hidden = student(wave, output_hidden_states=True).hidden_states[1].double().reshape(-1, 128).numpy()
    c = tensors["centroids.hidden"].double().numpy()
    ref = ((hidden[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert (labels.flatten().numpy() == ref).mean() > 0.999
    alone = torch.cat([teacher.targets(wave[b : b + 1]) for b in range(2)])
    assert_kmeans_labels_equal_up_to_ties(teacher, wave, alone, labels)  # another batch shape: up to near-ties

    assert build(registry, "kmeans-hidden", checkpoint=str(student_file)).options.layer == 1  # middle of 2 layers
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_student(tiny(), other)
    with pytest.raises(TeacherFileError, match="checkpoint id"):
        build(registry, "kmeans-hidden", teacher_file=str(out), checkpoint=str(other))
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(student_file.read_bytes())
    assert build(registry, "kmeans-hidden", teacher_file=str(out), checkpoint=str(copy)).config_hash() == teacher.config_hash()
    with pytest.raises(TeacherFileError, match="layer=5"):
        build(registry, "kmeans-hidden", checkpoint=str(student_file), layer=5)
    with pytest.raises(TeacherFileError, match="'checkpoint' is required"):
        build(registry, "kmeans-hidden")


# -- the CLI --------------------------------------------------------------------------


def test_cli_fit_and_label(audio_dir, tmp_path):
    from mert_cli.teacher import teacher_group

    runner = CliRunner()
    out = tmp_path / "cli.safetensors"
    res = runner.invoke(teacher_group, ["fit", "kmeans-mfcc", "--data", str(audio_dir), "--out", str(out), "--set", "n_clusters=6", "--set", "n_mels=40", "--quiet"])
    assert res.exit_code == 0, res.output
    assert read_teacher_file(out)[1]["centroids.mfcc"].shape == (6, 39)
    res = runner.invoke(teacher_group, ["label", "kmeans-mfcc", "--teacher-file", str(out), "--data", str(audio_dir), "--out", str(tmp_path / "store"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "labelled 4 files" in res.output and (tmp_path / "store" / "labels.bin").exists()

    res = runner.invoke(teacher_group, ["fit", "kmeans-mfcc", "--data", str(audio_dir), "--out", str(out), "--set", "n_clustrs=6"])
    assert res.exit_code == 2 and "n_clustrs" in res.output and "Traceback" not in res.output
    res = runner.invoke(teacher_group, ["fit", "kmeans-mfcc", "--data", str(audio_dir), "--out", str(out), "--set", "n_clusters"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = runner.invoke(teacher_group, ["label", "kmeans-mfcc", "--data", str(audio_dir), "--out", str(tmp_path / "s2")])
    assert res.exit_code == 2 and "--teacher-file" in res.output
