"""The offline label store: online == offline, compact format, refusals that name the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import soundfile as sf
import torch
from pydantic import Field

from conftest import assert_kmeans_labels_equal_up_to_ties, music
from mert_core.audio import read_crop
from mert_core.data import CropBatches, scan_audio
from mert_core.geometry import FrameGeometry
from mert_core.hookspecs import hookimpl
from mert_core.labels import (
    IGNORE_LABEL,
    LabelStore,
    LabelStoreError,
    LabelStoreMismatch,
    fit_teacher,
    label_data,
    merge_label_parts,
    shard_ranges,
    student_frames,
    write_label_store,
)
from mert_core.registry import load_registry
from mert_core.teacher import TargetSpec, Teacher, TeacherOptions

SR = 24000
W = 36000  # 1.5 s windows keep the tests small; the rule is the same for 120000


# -- a tiny discrete test teacher: quantised frame energy, any number of classes ------


class LoudnessOptions(TeacherOptions):
    num_classes: int = Field(16, ge=2, description="Classes (energy bins).")
    continuous: bool = Field(False, description="Declare continuous targets instead.")
    fail_on_rank: int = Field(-1, description="Raise when labelling on this torchrun rank (-1: never).")


class LoudnessTeacher(Teacher):
    name = "test-loudness"
    description = "frame energy in bins (tests only)"
    Options: ClassVar = LoudnessOptions

    def target_spec(self):
        if self.options.continuous:
            return TargetSpec(kind="continuous", frame_rate_hz=self.frame_rate_hz, dim=1)
        return TargetSpec(kind="discrete", frame_rate_hz=self.frame_rate_hz, num_codebooks=2, num_classes=self.options.num_classes)

    def targets(self, wave, generator=None):
        if self.options.fail_on_rank >= 0 and int(os.environ.get("RANK", -1)) == self.options.fail_on_rank:
            raise RuntimeError(f"test-loudness fails on rank {self.options.fail_on_rank}")
        T = student_frames(wave.shape[1])
        frames = wave[:, : (T - 1) * 320 + 400].unfold(1, 400, 320) if T else wave.new_zeros(wave.shape[0], 0, 400)
        energy = frames.pow(2).mean(-1)  # B, T
        k = self.options.num_classes
        a = (energy.sqrt() * 40 * k).long().clamp(0, k - 1)
        b = (k - 1 - a) if k > 2 else a
        return torch.stack([a, b], -1)


class _TestPlugins:
    @hookimpl
    def register_teachers(self, register):
        register(LoudnessTeacher)


TEST_PLUGINS = _TestPlugins()  # the entry point of the test teacher in torchrun subprocesses


@pytest.fixture(scope="module")
def registry():
    return load_registry(extra_plugins=[_TestPlugins()])


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("label-audio")
    sf.write(folder / "a.wav", music(4.0, SR, seed=1), SR)  # 2 full windows + a 1 s partial one
    sf.write(folder / "b.flac", music(3.0, SR, seed=2), SR)  # exactly 2 windows
    sf.write(folder / "c.wav", music(3.3, 44100, seed=3), 44100)  # resampled: 2 windows + 0.3 s
    sf.write(folder / "d.wav", np.stack([music(1.0, SR, seed=4), music(1.0, SR, seed=5)], 1), SR)  # stereo, one partial window
    return folder


@pytest.fixture(scope="module")
def mfcc_file(registry, audio_dir, tmp_path_factory):
    return fit_teacher("kmeans-mfcc", [audio_dir], tmp_path_factory.mktemp("fit") / "mfcc.safetensors", {"n_clusters": 10, "n_mels": 40}, registry=registry, device="cpu", progress=False)


@pytest.fixture(scope="module")
def lmc_file(registry, audio_dir, tmp_path_factory):
    opts = {"n_clusters_logmel": 6, "n_clusters_chroma": 4, "n_mels": 32}
    return fit_teacher("kmeans-logmel-chroma", [audio_dir], tmp_path_factory.mktemp("fit") / "lmc.safetensors", opts, registry=registry, device="cpu", progress=False)


@pytest.fixture(scope="module")
def hidden_file(registry, audio_dir, tmp_path_factory):
    from mert_core.checkpoint import save_student
    from mert_core.model import tiny

    folder = tmp_path_factory.mktemp("hidden")
    torch.manual_seed(0)
    save_student(tiny(), folder / "student.safetensors")
    opts = {"checkpoint": str(folder / "student.safetensors"), "n_clusters": 8}
    return fit_teacher("kmeans-hidden", [audio_dir], folder / "hidden.safetensors", opts, registry=registry, device="cpu", progress=False)


def teacher(registry, name, **options):
    return registry.build("teacher", name, options, geometry=FrameGeometry(SR, 320))


def assert_same_labels(t, wave, online, offline):
    """The store labelled ``wave`` in a batch of windows, ``online`` is ``t.targets(wave)`` alone.

    The loudness bins are bitwise equal (each frame's energy is the same elementwise
    square and one mean over its own 400 samples, whatever the batch); k-means labels
    run batched GEMMs and FFTs whose rounding can change with the batch shape, so
    they are equal up to near-ties.
    """
    if isinstance(t, LoudnessTeacher):
        assert torch.equal(offline, online)
    else:
        assert_kmeans_labels_equal_up_to_ties(t, wave, online, offline)


def assert_online_equals_offline(t, store, audio_dir):
    num_frames = student_frames(W)
    checked = 0
    for path in sorted(str(p) for p in audio_dir.iterdir()):
        entry = store.index["files"][[e["path"] for e in store.index["files"]].index(path)]
        for k in range(len(entry["windows"])):
            wave = torch.from_numpy(read_crop(path, SR, k * W, W))[None]
            online = t.targets(wave)[0]
            offline = store.targets([path], [k * W], num_frames)[0]
            n = online.shape[0]
            assert n <= num_frames
            assert_same_labels(t, wave, online[None], offline[None, :n])
            assert (offline[n:] == IGNORE_LABEL).all()
            checked += 1
    return checked


# -- online == offline ------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options", [("kmeans-mfcc", {}), ("kmeans-logmel-chroma", {}), ("kmeans-logmel-chroma", {"combine": "separate"}), ("kmeans-hidden", {})]
)
def test_offline_labels_equal_online_labels(registry, audio_dir, request, tmp_path, name, options):
    fitted = {"kmeans-mfcc": "mfcc_file", "kmeans-logmel-chroma": "lmc_file", "kmeans-hidden": "hidden_file"}[name]
    t = teacher(registry, name, teacher_file=str(request.getfixturevalue(fitted)), **options)
    summary = write_label_store(t, [audio_dir], tmp_path / "store", window_samples=W, batch_size=3, progress=False)
    store = LabelStore.open(tmp_path / "store")
    store.check(t, W, files=[str(p) for p in audio_dir.iterdir()])
    # a: 3 windows, b: 2, c: 2 full + 0.3 s, d: 1 partial
    assert summary.num_files == 4 and summary.num_windows == 3 + 2 + 3 + 1
    assert assert_online_equals_offline(t, store, audio_dir) == summary.num_windows
    assert summary.num_codebooks == t.target_spec().num_codebooks


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
def test_store_serves_the_trainers_aligned_crops(registry, audio_dir, mfcc_file, tmp_path, preset):
    """End to end with the data pipeline and the trainer's alignment (``student_targets``): each
    full crop's stored labels == the live teacher's, for the paper's 400-sample frames and for
    the ``cpu`` preset's 1840-sample ones (both drop the same 2 leading frames)."""
    from mert_core.model import mert_student, student_args
    from mert_core.trainer import student_targets

    geometry = mert_student(**student_args(preset)).geometry
    lead = geometry.lead_frames
    assert lead == {"tiny": 0, "cpu": 2}[preset]
    t = registry.build("teacher", "kmeans-mfcc", {"teacher_file": str(mfcc_file)}, geometry=geometry)
    label_data("kmeans-mfcc", [audio_dir], tmp_path / "store", teacher_file=mfcc_file, registry=registry, window_samples=W, device="cpu", progress=False)
    store = LabelStore.open(tmp_path / "store")
    batches = CropBatches(scan_audio([audio_dir], progress=False), 3, sample_rate=SR, crop_seconds=W / SR, min_seconds=0.0, align_crops=True)
    full = 0
    for i in range(6):
        batch = batches[i]
        num_frames = geometry.num_frames(batch["wave"].shape[1])
        offline = student_targets(t, batch["wave"], num_frames, geometry, store, batch["paths"], batch["offsets"])
        online = student_targets(t, batch["wave"], num_frames, geometry)[:, :num_frames]
        assert offline.shape[1] == num_frames
        for b in range(3):
            if batch["lengths"][b] == W:
                assert_same_labels(t, batch["wave"][b : b + 1, lead * 320 :], online[b : b + 1], offline[b : b + 1])
                full += 1
    assert full >= 10


# -- format ---------------------------------------------------------------------


def test_store_is_compact_and_self_describing(registry, audio_dir, mfcc_file, tmp_path):
    t = teacher(registry, "kmeans-mfcc", teacher_file=str(mfcc_file))
    s = write_label_store(t, [audio_dir], tmp_path / "store", window_samples=W, progress=False)
    assert s.dtype == "uint16" and s.bytes_per_frame_per_codebook == 2
    assert (tmp_path / "store" / "labels.bin").stat().st_size == s.num_frames * 2
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["teacher"] == "kmeans-mfcc" and index["config_hash"] == t.config_hash()
    assert index["window_samples"] == W and index["hop_samples"] == 320 and index["num_classes"] == 10
    for e in index["files"]:
        assert os.path.isabs(e["path"]) and e["size"] == os.stat(e["path"]).st_size
        offsets = [w[0] for w in e["windows"]]
        assert offsets == sorted(offsets)
    assert sum(w[1] for e in index["files"] for w in e["windows"]) == index["total_frames"] == s.num_frames
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".store")]  # no temp folder left


def test_more_than_65536_classes_use_uint32(registry, audio_dir, tmp_path):
    t = teacher(registry, "test-loudness", num_classes=70000)
    s = write_label_store(t, [audio_dir], tmp_path / "store", window_samples=W, progress=False)
    assert s.dtype == "uint32" and s.num_codebooks == 2
    store = LabelStore.open(tmp_path / "store")
    assert store.labels.dtype == np.uint32
    assert assert_online_equals_offline(t, store, audio_dir) == s.num_windows
    with pytest.raises(LabelStoreError, match="continuous"):
        write_label_store(teacher(registry, "test-loudness", continuous=True), [audio_dir], tmp_path / "c", progress=False)


# -- refusals --------------------------------------------------------------------


@pytest.fixture
def mfcc_store(registry, audio_dir, mfcc_file, tmp_path):
    t = teacher(registry, "kmeans-mfcc", teacher_file=str(mfcc_file))
    write_label_store(t, [audio_dir], tmp_path / "store", window_samples=W, progress=False)
    return t, tmp_path / "store"


def test_store_refuses_another_teacher_configuration(registry, audio_dir, mfcc_store, lmc_file, tmp_path):
    t, path = mfcc_store
    store = LabelStore.open(path)
    store.check(t, W)
    with pytest.raises(LabelStoreMismatch, match="teacher 'kmeans-mfcc'.*'kmeans-logmel-chroma'"):
        store.check(teacher(registry, "kmeans-logmel-chroma", teacher_file=str(lmc_file)), W)
    other = fit_teacher("kmeans-mfcc", [audio_dir], tmp_path / "k8.safetensors", {"n_clusters": 8, "n_mels": 40}, registry=registry, device="cpu", progress=False)
    with pytest.raises(LabelStoreMismatch, match=r"configuration .*n_clusters: 10 -> 8"):
        store.check(teacher(registry, "kmeans-mfcc", teacher_file=str(other)), W)
    with pytest.raises(LabelStoreMismatch, match=f"windows are {W} samples, this run's crops are 120000"):
        store.check(t, 120000)
    with pytest.raises(LabelStoreMismatch, match="does not cover"):
        store.check(t, W, files=[str(tmp_path / "elsewhere.wav")])


def test_store_refuses_other_audio_and_off_grid_crops(audio_dir, mfcc_store, tmp_path):
    _, path = mfcc_store
    store = LabelStore.open(path)
    a = str(audio_dir / "a.wav")
    T = student_frames(W)
    with pytest.raises(LabelStoreError, match="other.wav: not in label store"):
        store.targets([str(tmp_path / "other.wav")], [0], T)
    with pytest.raises(LabelStoreError, match="a.wav: crop offset 1000 is not on the store's grid of 36000"):
        store.targets([a], [1000], T)
    with pytest.raises(LabelStoreError, match="past the 3 labelled windows"):
        store.targets([a], [3 * W], T)
    # the last, partial window: labels for its frames, IGNORE_LABEL after them
    last = store.targets([a], [2 * W], T)[0]
    n = student_frames(4 * SR - 2 * W)
    assert (last[:n] >= 0).all() and (last[n:] == IGNORE_LABEL).all()


def test_store_refuses_a_changed_file(audio_dir, mfcc_store, tmp_path):
    _, path = mfcc_store
    store = LabelStore.open(path)
    b = audio_dir / "b.flac"
    original, stat = b.read_bytes(), b.stat()
    try:
        sf.write(b, music(3.0, SR, seed=99), SR)
        with pytest.raises(LabelStoreError, match="b.flac: changed since it was labelled"):
            store.targets([str(b)], [0], student_frames(W))
    finally:
        b.write_bytes(original)
        os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    store.targets([str(b)], [0], student_frames(W))


def test_frame_counts_that_disagree_with_the_audio_name_the_file(audio_dir, mfcc_store):
    _, path = mfcc_store
    index = json.loads((path / "index.json").read_text())
    entry = next(e for e in index["files"] if e["path"].endswith("a.wav"))
    entry["windows"][1][1] -= 3  # as if labelled with another frame convention
    (path / "index.json").write_text(json.dumps(index))
    # refused when the store is opened, before any training step draws that window
    with pytest.raises(LabelStoreError, match=f"a.wav: window 1 .* holds {student_frames(W) - 3} frames, but its {W} samples give {student_frames(W)}"):
        LabelStore.open(path)


def test_damaged_or_existing_stores(registry, audio_dir, mfcc_store, tmp_path):
    t, path = mfcc_store
    with pytest.raises(LabelStoreError, match="already exists"):
        write_label_store(t, [audio_dir], path, window_samples=W, progress=False)
    write_label_store(t, [audio_dir], path, window_samples=W, progress=False, overwrite=True)
    labels = path / "labels.bin"
    labels.write_bytes(labels.read_bytes()[:-2])
    with pytest.raises(LabelStoreError, match="damaged or incomplete"):
        LabelStore.open(path)
    with pytest.raises(LabelStoreError, match="not a label store"):
        LabelStore.open(tmp_path)


def test_bad_files_are_skipped_and_counted(registry, audio_dir, mfcc_file, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.wav").write_bytes((audio_dir / "a.wav").read_bytes())
    (data / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    sf.write(data / "tiny.wav", music(0.01, SR), SR)
    t = teacher(registry, "kmeans-mfcc", teacher_file=str(mfcc_file))
    s = write_label_store(t, [data], tmp_path / "store", window_samples=W, progress=False)
    assert s.num_files == 1 and set(s.skipped) == {str(data / "broken.wav"), str(data / "tiny.wav")}
    assert json.loads((tmp_path / "store" / "index.json").read_text())["skipped"].keys() == s.skipped.keys()


# -- sharded labelling (torchrun) -------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_are_balanced_deterministic_and_cover_every_file_once(world_size):
    rng = np.random.default_rng(world_size)
    for counts in ([], [5], [1] * 7, list(rng.integers(1, 40, size=101)), [100, 1, 1, 1, 1, 1]):
        shares = shard_ranges(counts, world_size)
        assert shares == shard_ranges(list(counts), world_size)  # a function of the plan only: every rank agrees
        assert len(shares) == world_size
        assert [i for s in shares for i in s] == list(range(len(counts)))  # consecutive, in order, each file once
        if counts:
            fair, biggest = sum(counts) / world_size, max(counts)
            assert all(abs(sum(counts[i] for i in s) - fair) <= biggest for s in shares), (counts, shares)
    assert [len(s) for s in shard_ranges([3] * 10, 2)] == [5, 5]
    assert [len(s) for s in shard_ranges([3] * 10, 3)] == [3, 4, 3]


def assert_same_store(a, b):
    """Two store folders hold the same labels, files, windows and skipped files.

    Only ``created`` (when it was written) and ``index_sha256`` (which hashes it) may differ.
    """
    assert (a / "labels.bin").read_bytes() == (b / "labels.bin").read_bytes()
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    for volatile in ("created", "index_sha256"):
        ia.pop(volatile), ib.pop(volatile)
    assert list(ia["skipped"].items()) == list(ib["skipped"].items())
    assert ia == ib


@pytest.fixture
def mixed_data(audio_dir, tmp_path):
    """The test audio and three files to skip: undecodable, too short, NaN samples."""
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(audio_dir.iterdir()):
        (data / p.name).write_bytes(p.read_bytes())
    (data / "b-broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    sf.write(data / "e-tiny.wav", music(0.01, SR), SR)
    sf.write(data / "f.wav", music(2.0, SR, seed=6), SR)
    damaged = music(2.0, SR, seed=7).astype(np.float32)
    damaged[40000:40010] = np.nan  # in the second window: the scan accepts it, labelling finds it
    sf.write(data / "c-nan.wav", damaged, SR, subtype="FLOAT")
    return data


@pytest.mark.parametrize("world_size", [2, 3, 8])  # 8: more ranks than files, some parts empty
def test_merged_parts_equal_the_single_process_store(registry, mixed_data, tmp_path, world_size):
    """What each rank of a torchrun launch does, one after another in this process."""
    from mert_core.geometry import TARGET_GRID
    from mert_core.labels import _plan_source, _publish_store

    t = teacher(registry, "test-loudness")
    labelling = dict(sample_rate=SR, window_samples=W, batch_size=3, num_workers=0)
    single = write_label_store(t, [mixed_data], tmp_path / "single", progress=False, **labelling)

    labelling["min_samples"] = TARGET_GRID.receptive_field
    source = _plan_source([mixed_data], labelling, progress=False)
    tmp = tmp_path / "merged"
    tmp.mkdir()
    parts = []
    for rank, share in enumerate(shard_ranges(source.weights, world_size)):
        parts.append(tmp / f"part-{rank}")
        source.label(t, source.units[share.start : share.stop], parts[-1], progress=False, **labelling).save(parts[-1])
    part = merge_label_parts(parts, tmp)
    merged = _publish_store(t, part, source, tmp, tmp_path / "store", labelling, started=0.0)

    assert not any(p.exists() for p in parts)
    assert_same_store(tmp_path / "single", tmp_path / "store")
    assert (merged.num_files, merged.num_windows) == (single.num_files, single.num_windows) == (5, 11)
    assert merged.num_frames == single.num_frames
    assert set(merged.skipped) == {str(mixed_data / n) for n in ("b-broken.wav", "e-tiny.wav", "c-nan.wav")}
    assert part.skipped.keys() == {str(mixed_data / "c-nan.wav")}  # found unreadable by the rank that labelled it
    LabelStore.open(tmp_path / "store").check(t, W)


def _torchrun_label(out, data, env, *extra, nproc=2, port=29531):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)] if nproc > 1 else [sys.executable]
    cmd += ["-m", "mert_cli.main", "teacher", "label", "test-loudness", "--data", str(data), "--out", str(out),
            "--window-seconds", str(W / SR), "--batch-size", "3", "--device", "cpu", "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture
def loudness_plugin_env(make_dist):
    """Environment of a subprocess that sees the test teacher as an installed plugin."""
    site = make_dist("mert-test-loudness", "0.0.1", {"loudness": "test_labels:TEST_PLUGINS"}, {})
    tests = os.path.dirname(__file__)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(site), tests, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_two_process_torchrun_store_equals_the_one_process_store(mixed_data, tmp_path, loudness_plugin_env):
    stores = tmp_path / "stores"
    one = _torchrun_label(stores / "one", mixed_data, loudness_plugin_env, nproc=1)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = _torchrun_label(stores / "two", mixed_data, loudness_plugin_env)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert_same_store(stores / "one", stores / "two")
    assert two.stdout.count("labelled 5 files") == 1 and "skipped 3 files" in two.stdout  # rank 0 reports, for every rank
    assert sorted(p.name for p in stores.iterdir()) == ["one", "two"]  # no part or temporary folder left


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch_and_writes_no_store(mixed_data, tmp_path, loudness_plugin_env):
    stores = tmp_path / "stores"
    stores.mkdir()
    run = _torchrun_label(stores / "store", mixed_data, loudness_plugin_env, "--set", "fail_on_rank=1", port=29532)
    assert run.returncode != 0
    assert "failed on 1 of 2 ranks, first rank 1: RuntimeError: test-loudness fails on rank 1" in run.stdout + run.stderr
    assert list(stores.iterdir()) == []  # no store, no part or temporary folder
