"""Integrity: damaged caches and label stores are noticed, hostile or
malformed files give one-line errors, a full disk is named, and metadata
cannot make us allocate a model its file does not hold."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import music_dir  # noqa: F401 - fixture reused
from mert_cli.main import cli
from mert_core.checkpoint import CheckpointError, load_checkpoint, load_student, save_checkpoint, save_student
from mert_core.evaluation.extract import ExtractOptions, extract
from mert_core.evaluation.upstreams import HandcraftedUpstream
from mert_core.labels import LabelStore, LabelStoreError
from mert_core.model import tiny
from mert_core.registry import load_registry
from test_eval_cli import checkpoint, demo_root  # noqa: F401 - fixtures reused
from test_eval_probe import _one_thread, tone_dir, tone_plugin  # noqa: F401 - fixtures reused
from test_labels import W, audio_dir, mfcc_file, mfcc_store, registry  # noqa: F401 - fixtures reused


def assert_one_line_error(result, *names, exit_code=2):
    """Exit ``exit_code``, one ``Error:`` line naming each of ``names``, no usage banner, no traceback."""
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == exit_code and len(errors) == 1, result.output
    assert all(n in errors[0] for n in names), result.output
    assert "Traceback" not in result.output and "Usage:" not in result.output, result.output


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


def _edit_meta(d, **changes):
    meta = json.loads((d / "meta.json").read_text())
    meta.update({k: change(meta[k]) for k, change in changes.items()})
    (d / "meta.json").write_text(json.dumps(meta))


def _reverse_layer_names(d):
    _edit_meta(d, layer_names=lambda names: names[::-1])


def _edit_layer_dims(d):
    _edit_meta(d, layer_dims=lambda dims: [dims[0] + 8, *dims[1:]])


def _edit_frame_rate(d):
    _edit_meta(d, frame_rate_hz=lambda rate: rate * 2)


def _edit_meta_and_its_hash(d):
    # an accident cannot recompute the hash; this checks that the fields are also held against the entry's place
    from mert_core.evaluation.extract import _meta_digest

    meta = json.loads((d / "meta.json").read_text())
    meta["split"] = "test"
    meta["meta_sha256"] = _meta_digest(meta)
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_overwrite_rows, _nans, _edit_header_shape, _permute_index, _truncate, _delete_index,
                                    _zero_bytes, _garbage_meta, _reverse_layer_names, _edit_layer_dims, _edit_frame_rate,
                                    _edit_meta_and_its_hash])
def test_a_damaged_feature_cache_is_re_extracted_not_reused(damage, tone_dir, tmp_path, caplog):  # noqa: F811
    task = load_registry(extra_plugins=[tone_plugin]).build("task", "tone-class", {"data_dir": tone_dir})
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


def test_swapped_split_folders_are_re_extracted_not_scored_as_each_other(tone_dir, tmp_path, caplog):  # noqa: F811
    task = load_registry(extra_plugins=[tone_plugin]).build("task", "tone-class", {"data_dir": tone_dir})
    opts = ExtractOptions(audio_workers=0, batch_windows=4)
    valid = extract(HandcraftedUpstream(), task, "valid", opts, cache_dir=tmp_path, progress=False)
    test = extract(HandcraftedUpstream(), task, "test", opts, cache_dir=tmp_path, progress=False)
    clean = {"valid": np.array(valid.features), "test": np.array(test.features)}
    aside = tmp_path / "aside"
    valid.directory.rename(aside)
    test.directory.rename(valid.directory)
    aside.rename(test.directory)
    with caplog.at_level(logging.WARNING, logger="mert.evaluation"):
        for split in ("valid", "test"):
            again = extract(HandcraftedUpstream(), task, split, opts, cache_dir=tmp_path, progress=False)
            assert not again.reused and again.meta["split"] == split
            np.testing.assert_allclose(np.asarray(again.features), clean[split], rtol=0, atol=1e-6)
    assert caplog.text.count("records split") == 2, caplog.text


# -- 2. label stores ------------------------------------------------------------------------


def _index(path):
    return json.loads((path / "index.json").read_text())


def _swap_window_starts(path):
    """Two full windows trade places in the index: every count still adds up."""
    index = _index(path)
    a, b = index["files"][0]["windows"][0], index["files"][1]["windows"][0]
    a[0], b[0] = b[0], a[0]
    (path / "index.json").write_text(json.dumps(index))


def _labels(path):
    index = _index(path)
    return np.memmap(path / "labels.bin", dtype=index["dtype"], mode="r+"), index["num_classes"]


def _in_range_byte_flip(path):
    labels, k = _labels(path)
    labels[5] = (labels[5] + 1) % k
    labels.flush()


def _out_of_range_label(path):
    labels, k = _labels(path)
    labels[7] = k + 100
    labels.flush()


def _other_in_range_labels(path):
    labels, k = _labels(path)
    labels[:] = np.random.default_rng(0).integers(0, k, size=labels.shape)
    labels.flush()


def _drop_last_window(path):
    index = _index(path)
    entry = next(e for e in index["files"] if len(e["windows"]) > 1)
    entry["windows"].pop()
    (path / "index.json").write_text(json.dumps(index))


def _unsigned_index_edit(path):
    index = _index(path)
    index["files"][0]["mtime_ns"] += 1  # the count checks pass; only the index hash sees it
    (path / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage, why", [
    (_swap_window_starts, "index.json was changed"),
    (_unsigned_index_edit, "index.json was changed"),
    (_in_range_byte_flip, "labels.bin differs from what was written"),
    (_other_in_range_labels, "labels.bin differs from what was written"),
    (_out_of_range_label, "outside the teacher's classes 0..9"),
    (_drop_last_window, "windows listed"),
])
def test_a_damaged_label_store_is_refused_when_opened(damage, why, mfcc_store):  # noqa: F811
    _, path = mfcc_store
    LabelStore.open(path)  # intact: opens
    damage(path)
    with pytest.raises(LabelStoreError, match=why) as caught:
        LabelStore.open(path)
    message = str(caught.value)
    assert str(path) in message and "re-run `mert teacher label`" in message and "\n" not in message


def test_training_on_a_damaged_store_stops_before_step_0_with_one_line(mfcc_store, mfcc_file, audio_dir, tmp_path):  # noqa: F811
    _, path = mfcc_store
    _out_of_range_label(path)
    out = tmp_path / "run"
    args = ["train", "--teacher", "kmeans-mfcc", "--preset", "tiny", "--data", str(audio_dir), "--out", str(out), "--max-steps", "1", "--quiet",
            "--set", f"teacher.kmeans-mfcc.teacher_file={mfcc_file}", "--set", f"teacher.kmeans-mfcc.label_store={path}",
            "--set", f"data.crop_seconds={W / 24000}", "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "data.min_seconds=0.5"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, "outside the teacher's classes", str(path))
    assert not (out / "last.pt").exists()


# -- 5. errors that used to escape the one-line handling -----------------------------------


def _safetensors_parts(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header, data):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _offsets_past_the_end(good):
    header, data = _safetensors_parts(good)
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] = 10**12
    return _with_header(header, data)


def _metadata(good, **changes):
    header, data = _safetensors_parts(good)
    header["__metadata__"].update(changes)
    return _with_header(header, data)


@pytest.mark.parametrize("make, cause", [
    (lambda good: np.random.default_rng(0).bytes(5000), "not a readable safetensors file"),
    (lambda good: good.read_bytes()[: good.stat().st_size // 2], "not a readable safetensors file"),
    (lambda good: (1 << 62).to_bytes(8, "little") + good.read_bytes()[8:], "not a readable safetensors file"),
    (lambda good: b"", "not a readable safetensors file"),
    (_offsets_past_the_end, "not a readable safetensors file"),
    (lambda good: _metadata(good, model_args="{'embed_dim': 128"), "metadata 'model_args' is not valid JSON"),
    (lambda good: _metadata(good, config="<config/>"), "metadata 'config' is not valid JSON"),
    (lambda good: _metadata(good, model_args='["tiny"]'), "expected a dict of builder arguments, got list"),
    (lambda good: _metadata(good, model_args=json.dumps({**tiny().args, "embed_dim": "wide"})), "do not build a student"),
    (lambda good: _metadata(good, model_args=json.dumps({**tiny().args, "num_layers": 2.5})), "num_layers asks for 2.5 layers"),
], ids=["garbage", "truncated", "absurd-header-length", "empty", "offsets-past-end", "non-json-args", "non-json-config",
        "args-not-a-dict", "arg-of-wrong-type", "float-layers"])
def test_a_malformed_student_file_is_one_line_naming_it(make, cause, checkpoint, demo_root, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(make(checkpoint))
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(bad), "--task", "demo-key", "--task-set", f"data_dir={demo_root}",
                                      "--quiet", "--out", str(tmp_path / "out")])
    assert_one_line_error(result, str(bad), cause)
    with pytest.raises(CheckpointError, match=cause):
        load_student(bad)


def test_a_teacher_file_with_non_json_metadata_is_one_line_naming_it(mfcc_file, audio_dir, tmp_path):  # noqa: F811
    bad = tmp_path / "mfcc.safetensors"
    bad.write_bytes(_metadata(mfcc_file, **{"mert-kmeans-teacher": "not json"}))
    result = CliRunner().invoke(cli, ["teacher", "label", "kmeans-mfcc", "--teacher-file", str(bad), "--data", str(audio_dir),
                                      "--out", str(tmp_path / "store"), "--quiet"])
    assert_one_line_error(result, str(bad), "metadata is not valid JSON")


def test_mert_debug_shows_the_traceback(demo_root, tmp_path, monkeypatch):  # noqa: F811
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    monkeypatch.setenv("MERT_DEBUG", "1")
    result = CliRunner().invoke(cli, ["extract", "--checkpoint", str(bad), "--task", "demo-key", "--task-set", f"data_dir={demo_root}"])
    assert isinstance(result.exception, CheckpointError) and str(bad) in str(result.exception)


def test_eval_usage_errors_are_one_line(demo_root, tmp_path):  # noqa: F811
    missing_task = CliRunner().invoke(cli, ["eval", "--baseline", "handcrafted"])
    assert_one_line_error(missing_task, "Missing option '--task'", "eval -h")
    unknown = CliRunner().invoke(cli, ["eval", "--baseline", "handcrafted", "--task", "no-such-task"])
    assert_one_line_error(unknown, "unknown task 'no-such-task'")


def test_a_data_folder_without_usable_audio_is_exit_2_and_leaves_no_run_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.wav").write_bytes(b"")
    (data / "notes.wav").write_text("not audio")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--teacher", "cqt", "--preset", "tiny", "--data", str(data), "--out", str(out), "--quiet"])
    assert_one_line_error(result, "no usable audio", str(data))
    assert not out.exists()


def _tmpfs(mount, size: str):
    """Mount a tmpfs of ``size`` at ``mount`` (root only; the test is skipped where it cannot be mounted)."""
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    return mount


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs, unmounted afterwards."""
    yield _tmpfs(tmp_path / "small-disk", "4m")
    subprocess.run(["umount", "--lazy", str(tmp_path / "small-disk")], check=True)  # lazy: a run stopped in-process may still hold a file open


@pytest.fixture
def run_disk(tmp_path):
    """A 40 MB tmpfs: room for a tiny run, then filled up by the test."""
    yield _tmpfs(tmp_path / "run-disk", "40m")
    subprocess.run(["umount", "--lazy", str(tmp_path / "run-disk")], check=True)


def _fill(disk, leave_bytes: int) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave_bytes, 1))


def test_a_full_disk_names_the_file_and_keeps_the_earlier_one(small_disk):
    torch.manual_seed(0)
    first, second = tiny(), tiny()
    save_student(first, small_disk / "student.safetensors")  # 2.4 MB: fits once, not twice
    with pytest.raises(OSError, match="No space left on device") as caught:
        save_student(second, small_disk / "student.safetensors")
    assert caught.value.filename == str(small_disk / "student.safetensors")
    kept, _ = load_student(small_disk / "student.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), first.state_dict().values()))
    # torch.save's own message is "enforce fail ... unexpected pos": the disk is named all the same
    save_checkpoint({"step": 1}, small_disk / "last.pt")
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint({"step": 2, "student": second.state_dict()}, small_disk / "last.pt")
    assert load_checkpoint(small_disk / "last.pt")["step"] == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt", "student.safetensors"]  # no temp files left


def test_a_full_disk_during_training_is_one_line(small_disk, music_dir):
    out = small_disk / "run"
    args = ["train", "--teacher", "cqt", "--preset", "tiny", "--data", str(music_dir), "--out", str(out), "--max-steps", "1", "--quiet",
            "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "data.crop_seconds=2.0", "--set", "data.min_seconds=1.0"]
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, "no space left on device", str(out / "checkpoints" / "step_00000001.pt"), exit_code=1)


def _train_in_a_process(out, music_dir, steps, *extra):
    args = [sys.executable, "-m", "mert_cli.main", "train", "--teacher", "cqt", "--preset", "tiny", "--data", str(music_dir),
            "--out", str(out), "--max-steps", str(steps), "--quiet", "--set", "data.batch_size=2", "--set", "data.num_workers=0",
            "--set", "data.crop_seconds=1.0", "--set", "data.min_seconds=1.0", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def _one_error_line_on_stderr(done, out):
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert "no space left on device writing" in errors[0] and str(out) in errors[0], errors[0]
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr


@pytest.mark.parametrize("leave_bytes", [0, 1500], ids=["nothing-left", "room-for-a-little"])
def test_a_full_disk_is_one_line_for_a_fresh_run_and_a_resume_and_leaves_no_empty_files(leave_bytes, run_disk, music_dir):
    first = _train_in_a_process(run_disk / "run", music_dir, 1)
    assert first.returncode == 0, first.stderr
    _fill(run_disk, leave_bytes)
    resumed = _train_in_a_process(run_disk / "run", music_dir, 2, "--resume")
    _one_error_line_on_stderr(resumed, run_disk / "run")
    assert json.loads((run_disk / "run" / "summary.json").read_text())["steps"] == 1  # the earlier run is intact
    fresh = _train_in_a_process(run_disk / "fresh", music_dir, 1)
    _one_error_line_on_stderr(fresh, run_disk / "fresh")
    empty = [p for p in (run_disk / "fresh").rglob("*") if p.is_file() and p.stat().st_size == 0 and p.name != ".lock"]
    config = run_disk / "fresh" / "config.json"
    assert not empty and (not config.exists() or json.loads(config.read_text())["out_dir"])  # no config.json, or a whole one


# -- 6. untrusted sizes in metadata -----------------------------------------------------------

_PEAK_MEMORY = """
import json, sys
from mert_core.checkpoint import CheckpointError, load_student
def peak_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
before = peak_mb()
try:
    load_student(sys.argv[1])
    error = None
except (CheckpointError, ValueError) as exc:
    error = str(exc)
print(json.dumps({"grew_mb": peak_mb() - before, "error": error}))
"""


def _load_in_a_fresh_process(path):
    done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_small_file_asking_for_a_huge_model_is_refused_before_allocating(checkpoint, tmp_path):  # noqa: F811
    # the tiny student's tensors, with metadata asking for 4-million-unit feed-forward layers (8 GB of weights)
    big = tmp_path / "student.safetensors"
    big.write_bytes(_metadata(checkpoint, model_args=json.dumps({**tiny().args, "ffn_dim": 4_000_000})))
    got = _load_in_a_fresh_process(big)
    assert "model_args do not match" in got["error"] and "the model arguments imply (4000000" in got["error"]
    assert got["grew_mb"] < 200, got  # the model asked for is 8000 MB
    # a billion layers: refused by counting, before even a meta-device build
    many = tmp_path / "many.safetensors"
    many.write_bytes(_metadata(checkpoint, model_args=json.dumps({**tiny().args, "num_layers": 10**9})))
    with pytest.raises(CheckpointError, match="num_layers asks for 1000000000 layers, the file holds 2"):
        load_student(many)


def test_a_checkpoint_asking_for_a_huge_model_is_refused(checkpoint, tmp_path):  # noqa: F811
    student, _ = load_student(checkpoint)
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 3, "config": {}, "model_args": {**student.args, "embed_dim": 1_000_000}, "student": student.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"model_args do not match .*implies|model arguments imply"):
        load_student(path)


def test_a_hugging_face_config_asking_for_a_huge_model_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mert_core.convert import HFConversionError, hf_config_from_args, load_hf_hubert

    torch.manual_seed(0)
    folder = tmp_path / "hf"
    transformers.HubertModel(transformers.HubertConfig(**hf_config_from_args(tiny().args))).save_pretrained(folder)
    load_hf_hubert(folder)  # intact: loads
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 4_000_000}))
    got = _load_in_a_fresh_process(folder)
    assert "config.json" in got["error"] and "model arguments imply" in got["error"], got
    assert got["grew_mb"] < 200, got
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    with pytest.raises(HFConversionError, match="config.json: a size or rate has the wrong type"):
        load_hf_hubert(folder)
