"""The fault suite: hostile audio files, two writers on one run folder, a
non-finite stop followed by a resume with a lower lr, a killed checkpoint
write, and audio hours after a resume off the logging cadence.

The broken-audio corpus is generated here (real files in ``tmp_path``) and
goes through every command that reads audio: ``mert train``, ``mert teacher
fit``, ``mert teacher label`` and ``mert extract``. None may crash; each must
name and count every unusable file and use every usable one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from safetensors import safe_open

from mert_cli.main import cli
from mert_core import api
from mert_core.audio import AudioError, load_audio, read_crop
from mert_core.checkpoint import LAST, STUDENT_FILE, RunFolderBusy, load_student, lock_run_folder, save_checkpoint, save_student
from mert_core.data import scan_audio
from mert_core.model import tiny
from mert_core.teacher import FitDiverged, FitQuality, write_teacher_file
from mert_core.trainer import TrainingError
from tests.conftest import music

SR = 24000


def _wav(payload: bytes, *, sample_rate: int = SR, channels: int = 1, bits: int = 16, tag: int = 1,
         data_size: int | None = None, fmt_size: int = 16) -> bytes:
    """A RIFF/WAVE file written by hand, so that its header can lie."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, sample_rate, sample_rate * block, block, bits)
    data_size = len(payload) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", fmt_size) + fmt + b"data" + struct.pack("<I", data_size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _float_wav(path: Path, wave: np.ndarray, subtype: str = "FLOAT") -> None:
    sf.write(path, wave, SR, subtype=subtype)


def _with(wave: np.ndarray, every: int, value: float) -> np.ndarray:
    """``wave`` with ``value`` at every ``every``-th sample: any crop holds one."""
    out = wave.astype(np.float64).copy()
    out[::every] = value
    return out


UNDECODABLE = "cannot read audio header|cannot decode audio"
# unusable file -> what the reason given for it must say
HOSTILE = {
    "empty.wav": UNDECODABLE,
    "random-bytes.wav": UNDECODABLE,
    "text-named.flac": UNDECODABLE,
    "truncated-header.wav": UNDECODABLE,
    "truncated-data.wav": "truncated",
    "lying-data-size.wav": "truncated",
    "lying-fmt-size.wav": UNDECODABLE,
    "zero-sample-rate.wav": UNDECODABLE,
    "one-hertz.wav": "sample rate 1 Hz",
    "header-only.wav": "no audio samples",
    "nan.wav": "NaN or infinite",
    "inf.wav": "NaN or infinite",
    "huge-1e30.wav": r"samples up to \d\.\d+e\+29",
    "huge-float64.wav": "NaN or infinite|samples up to",
    "int16-as-float.wav": "samples up to",
    "dangling-link.wav": "dangling",
    "fifo.wav": "not a regular file",
}
USABLE = (
    "good-1.wav", "good-2.flac", "good-3.wav", "pcm-u8.wav", "pcm-24.wav", "pcm-32.wav", "float64.wav", "ulaw.wav",
    "many-channels.wav", "44k1.wav", "wav-named.flac", "long.wav", "música ñ 日本語 🎵.wav", "one-sample.wav",
)
SHORT = {"one-sample.wav"}  # readable, but too short to train on or to label


def make_corpus(folder: Path) -> Path:
    """Write every file of :data:`HOSTILE` and :data:`USABLE` into ``folder``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    clip = music(3.0, SR, 7)
    pcm16 = (clip * 32767).astype("<i2").tobytes()

    sf.write(folder / "good-1.wav", music(4.0, SR, 1), SR)
    sf.write(folder / "good-2.flac", music(4.0, SR, 2), SR)
    sf.write(folder / "good-3.wav", music(3.5, SR, 3), SR)
    for name, subtype in (("pcm-u8.wav", "PCM_U8"), ("pcm-24.wav", "PCM_24"), ("pcm-32.wav", "PCM_32"),
                          ("float64.wav", "DOUBLE"), ("ulaw.wav", "ULAW")):
        sf.write(folder / name, clip, SR, subtype=subtype)
    sf.write(folder / "many-channels.wav", np.repeat(clip[:, None], 24, axis=1) / 2, SR)
    sf.write(folder / "44k1.wav", music(3.0, 44100, 8), 44100)
    sf.write(folder / "wav-named.flac", clip, SR, format="WAV")  # decoded by content, whatever the name
    sf.write(folder / "long.wav", music(40.0, 8000, 9), 8000)
    sf.write(folder / "música ñ 日本語 🎵.wav", clip, SR)
    sf.write(folder / "one-sample.wav", clip[:1], SR)

    (folder / "empty.wav").write_bytes(b"")
    (folder / "random-bytes.wav").write_bytes(rng.bytes(50_000))
    (folder / "text-named.flac").write_text("these are not the samples you are looking for\n" * 100)
    good = _wav(pcm16)
    (folder / "truncated-header.wav").write_bytes(good[:30])
    (folder / "truncated-data.wav").write_bytes(good[: len(good) // 2])
    (folder / "lying-data-size.wav").write_bytes(_wav(pcm16, data_size=len(pcm16) * 40))
    (folder / "lying-fmt-size.wav").write_bytes(_wav(pcm16, fmt_size=0x7FFFFFF0))
    (folder / "zero-sample-rate.wav").write_bytes(_wav(pcm16, sample_rate=0))
    (folder / "one-hertz.wav").write_bytes(_wav(pcm16, sample_rate=1))
    (folder / "header-only.wav").write_bytes(_wav(b""))
    _float_wav(folder / "nan.wav", _with(clip, 997, np.nan))
    _float_wav(folder / "inf.wav", _with(clip, 997, np.inf))
    _float_wav(folder / "huge-1e30.wav", clip * 1e30)
    _float_wav(folder / "huge-float64.wav", clip.astype(np.float64) * 1e300, subtype="DOUBLE")
    _float_wav(folder / "int16-as-float.wav", clip * 32767)
    os.symlink(folder / "gone.wav", folder / "dangling-link.wav")
    os.mkfifo(folder / "fifo.wav")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


def _names(paths) -> set[str]:
    return {Path(p).name for p in paths}


def _invoke(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 0, (result.output, result.exception)
    return result


HEADER_FAULTS = {"empty.wav", "random-bytes.wav", "text-named.flac", "truncated-header.wav", "truncated-data.wav",
                 "lying-data-size.wav", "lying-fmt-size.wav", "zero-sample-rate.wav", "one-hertz.wav", "header-only.wav",
                 "dangling-link.wav", "fifo.wav"}


def test_scan_counts_header_faults_dangling_links_and_fifos(corpus):
    manifest = scan_audio([corpus], progress=False)
    assert _names(manifest.skipped) == HEADER_FAULTS
    for path, reason in manifest.skipped.items():
        assert re.search(HOSTILE[Path(path).name], reason), (path, reason)
    assert _names(f.path for f in manifest.files) == set(USABLE) | (set(HOSTILE) - HEADER_FAULTS)


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - HEADER_FAULTS))
def test_bad_samples_are_refused_by_every_reader(corpus, name):
    # anywhere in a crop, and in a whole-file read
    with pytest.raises(AudioError, match=HOSTILE[name]):
        read_crop(corpus / name, SR, 5000, 2000)
    with pytest.raises(AudioError, match=HOSTILE[name]):
        load_audio(corpus / name, SR)


def test_train_names_and_counts_every_unusable_file(corpus, tmp_path):
    # every file of the shard is drawn: 5 steps x 4 clips >= the 18 files of >= 1 s
    out = tmp_path / "run"
    _invoke("train", "--teacher", "cqt", "--preset", "tiny", "--data", corpus, "--out", out, "--max-steps", 5, "--quiet",
            "--set", "data.batch_size=4", "--set", "data.crop_seconds=1.0", "--set", "data.min_seconds=1.0", "--set", "data.num_workers=0")
    summary = json.loads((out / "summary.json").read_text())
    assert _names(summary["skipped_files"]) == set(HOSTILE)
    for path, reason in summary["skipped_files"].items():
        assert re.search(HOSTILE[Path(path).name], reason), (path, reason)
    assert summary["files_skipped"] == len(HOSTILE) and summary["files_too_short"] == len(SHORT)
    assert _names(summary["too_short_files"]) == SHORT  # named, not only counted
    # used: long enough and never found unusable when read (the NaN files pass the scan, then fail every read)
    assert summary["files_used"] == len(USABLE) - len(SHORT)
    assert summary["bad_steps"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["loss"])


def test_teacher_fit_and_label_name_and_count_every_unusable_file(corpus, tmp_path):
    # mert teacher fit reads every chunk of every file (sample_fraction=1)
    fitted = tmp_path / "mfcc8.safetensors"
    _invoke("teacher", "fit", "kmeans-mfcc", "--data", corpus, "--out", fitted, "--set", "n_clusters=8", "--quiet")
    with safe_open(str(fitted), "pt") as f:
        meta = json.loads(f.metadata()["mert-kmeans-teacher"])
    assert _names(meta["sample"]["unusable_files"]) == set(HOSTILE)
    assert _names(meta["sample"]["spans_samples"]) == set(USABLE) - SHORT
    assert [q["end"] <= q["start"] for q in meta["fit_quality"]] == [True]  # the inertia measured from start to end

    # mert teacher label reads every window of every file
    store = tmp_path / "labels"
    result = _invoke("teacher", "label", "kmeans-mfcc", "--teacher-file", fitted, "--data", corpus, "--out", store, "--quiet")
    index = json.loads((store / "index.json").read_text())
    assert _names(index["skipped"]) == set(HOSTILE) | SHORT
    assert _names(e["path"] for e in index["files"]) == set(USABLE) - SHORT
    assert f"skipped {len(HOSTILE) + len(SHORT)} files" in result.output


def test_extract_names_and_counts_every_unusable_file(corpus, tmp_path):
    task_dir = tmp_path / "task"  # a demo-timbre task whose train split is the whole corpus
    task_dir.mkdir()
    with open(task_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, name in enumerate(sorted([*HOSTILE, *USABLE])):
            f.write(json.dumps({"path": str(corpus / name), "kind": "note", "split": "train", "timbre": "ab"[i % 2]}) + "\n")
        for split in ("valid", "test"):  # the task wants every split; only train is extracted
            f.write(json.dumps({"path": str(corpus / "good-1.wav"), "kind": "note", "split": split, "timbre": "a"}) + "\n")
    torch.manual_seed(0)
    save_student(tiny(), tmp_path / "student.safetensors")
    result = _invoke("extract", "--checkpoint", tmp_path / "student.safetensors", "--task", "demo-timbre",
                     "--task-set", f"data_dir={task_dir}", "--split", "train", "--cache-dir", tmp_path / "cache", "--quiet")
    meta = json.loads(next((tmp_path / "cache").glob("features/*/demo-timbre/train/*/meta.json")).read_text())
    assert _names(s["path"] for s in meta["skipped"]) == set(HOSTILE)
    for s in meta["skipped"]:
        assert re.search(HOSTILE[Path(s["path"]).name], s["error"]), s
    assert meta["num_kept"] == len(USABLE)
    assert f"{len(USABLE)} items" in result.output and f"{len(HOSTILE)} skipped" in result.output


# -- one run folder, one writer --------------------------------------------------------------------

TINY = ["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=1.0", "data.min_seconds=1.0"]


def _config(out, data, steps, *extra):
    return api.make_train_config(teachers=["cqt"], preset="tiny", data=[data], out_dir=out, max_steps=steps,
                                 overrides=[*TINY, "log_every=1", *extra])


def _train_cmd(out: Path, data: Path, steps: int, *extra: str) -> list[str]:
    sets = [a for s in [*TINY, *extra] for a in ("--set", s)]
    return [sys.executable, "-m", "mert_cli.main", "train", "--teacher", "cqt", "--preset", "tiny", "--data", str(data),
            "--out", str(out), "--max-steps", str(steps), "--quiet", *sets]


@pytest.mark.slow
def test_second_writer_is_refused_and_the_lock_dies_with_its_holder(tmp_path, music_dir):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_train_cmd(out, music_dir, 100_000, "checkpoint_every=1", "data.num_workers=1"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() is not None else "no lock"
            time.sleep(0.2)
        second = subprocess.run(_train_cmd(out, music_dir, 2), env=env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip().splitlines() == [f"Error: {out} is in use by another run (pid {first.pid}); wait for it to end or pass another --out"]
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL: no clean-up code runs; the OS drops the lock
        first.wait()
    assert _lock_is_free(out)  # at once: its loader worker, still alive for a few seconds, holds no copy
    third = subprocess.run([*_train_cmd(out, music_dir, 2), "--overwrite"], env=env, capture_output=True, text=True, timeout=240)
    assert third.returncode == 0, third.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


LOCK_IS_FREE = "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)"


def _lock_is_free(out: Path) -> bool:
    return subprocess.run([sys.executable, "-c", LOCK_IS_FREE, str(out / ".lock")], capture_output=True).returncode == 0


def test_the_run_lock_goes_with_its_process_not_with_forked_children(tmp_path):
    import multiprocessing

    out = tmp_path / "run"
    out.mkdir()
    with lock_run_folder(out):
        # a forked child that outlives the lock's holder, as a DataLoader worker outlives a SIGKILLed run
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
        child.start()
        assert not _lock_is_free(out)
    try:
        assert _lock_is_free(out)
    finally:
        child.kill()
        child.join()


def test_lock_is_exclusive_and_released_when_a_run_fails(tmp_path, music_dir):
    out = tmp_path / "run"
    out.mkdir()
    with lock_run_folder(out):
        with pytest.raises(RunFolderBusy, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            with lock_run_folder(out):
                pass
    api.train(_config(out, music_dir, 1), progress=False)
    with pytest.raises(ValueError, match="--resume: config field 'mask.prob'"):  # fails with the lock taken
        api.train(_config(out, music_dir, 2, "mask.prob=0.5"), resume=True, progress=False)
    assert api.train(_config(out, music_dir, 2), resume=True, progress=False).summary["steps"] == 2


# -- non-finite stop, then resume with a lower lr ----------------------------------------------------


@pytest.mark.parametrize("lr", [1e30, 10.0], ids=["outputs-not-finite", "outputs-finite-but-exploded"])
def test_non_finite_stop_keeps_weights_with_sane_outputs_and_resume_takes_a_lower_lr(lr, tmp_path, music_dir):
    out = tmp_path / "run"
    api.train(_config(out, music_dir, 2, "checkpoint_every=1", "optim.lr=1e-3"), progress=False)
    start = torch.load(out / LAST, weights_only=True)["counters"]["start_scales"]
    # an absurd lr: the update of step 2 leaves weights whose outputs are not finite (1e30), or finite but
    # blown up (10: conv std ~1e11, loss ~1e26, a non-finite gradient) -- weights that used to be kept as good
    with pytest.raises(TrainingError, match=r"2 bad steps in a row at step 4.*The weights diverged.*\(step 2\).*optim.lr="):
        api.train(_config(out, music_dir, 10, "checkpoint_every=1", "max_bad_steps=2", f"optim.lr={lr}"), resume=True, progress=False)
    state = torch.load(out / LAST, weights_only=True)
    assert state["step"] == 2 and state["counters"]["start_scales"] == start
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt"]  # step 3 held the broken weights
    student, _ = load_student(out / LAST)
    exported, _ = load_student(out / STUDENT_FILE)
    wave = torch.from_numpy(load_audio(music_dir / "a.wav", SR)[None, :SR])
    with torch.no_grad():
        out_student = student(wave, None)
        hidden = out_student.last_hidden
        assert torch.isfinite(hidden).all()
        assert torch.equal(hidden, exported(wave, None).last_hidden)
        assert out_student.features.std() < 10 * start["std/conv"]  # sane: of the scale of the run's start

    # the advice works: resume with a lower lr; the change is in the run's history
    result = api.train(_config(out, music_dir, 4, "checkpoint_every=1", "optim.lr=1e-4"), resume=True, progress=False)
    assert result.summary["steps"] == 4 and result.summary["bad_steps"] == 0
    state = torch.load(out / LAST, weights_only=True)
    assert state["config"]["optim"]["lr"] == 1e-4
    assert state["history"] == [{"resumed_at_step": 2, "changed": {"optim.lr": [1e-3, 1e-4], "optim.max_steps": [2, 4]}}]
    assert result.summary["history"] == state["history"]


def test_non_finite_stop_with_no_good_checkpoint_leaves_no_weights_to_load(tmp_path, music_dir):
    out = tmp_path / "fresh"
    with pytest.raises(TrainingError, match="No checkpoint holds weights that gave finite outputs within bounds"):
        api.train(_config(out, music_dir, 10, "checkpoint_every=1", "max_bad_steps=2", "optim.lr=1e30"), progress=False)
    # step 1's export held the weights that broke; nothing is left that `mert extract` could load
    assert not (out / STUDENT_FILE).exists() and not (out / LAST).exists()
    assert not list((out / "checkpoints").glob("step_*.pt"))


# -- killed checkpoint writes, audio hours after a resume -------------------------------------------

KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mert_core.checkpoint import atomic_write

    def write(tmp):
        tmp.write_bytes(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(Path(sys.argv[1]), write)
""")


def test_resume_cleans_killed_writes_and_counts_audio_off_the_logging_cadence(tmp_path, music_dir):
    out = tmp_path / "run"
    steps, batch, crop_seconds = 5, 2, 1.0
    api.train(_config(out, music_dir, steps, "log_every=3", "checkpoint_every=2", "keep_checkpoints=3"), progress=False)
    # as if killed after the checkpoint of step 4 (between two metric lines) while writing the next one
    (out / LAST).unlink()  # a hard link to step 5
    shutil.copyfile(out / "checkpoints" / "step_00000004.pt", out / LAST)
    (out / "checkpoints" / "step_00000005.pt").unlink()
    for target in (out / "checkpoints" / "step_00000005.pt", out / STUDENT_FILE):
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], capture_output=True, timeout=120)
        assert killed.returncode == -9
    left = sorted(p.name for p in [*out.glob(".*.tmp"), *(out / "checkpoints").glob(".*.tmp")])
    assert len(left) == 2
    messages = []
    result = api.train(_config(out, music_dir, steps, "log_every=3", "checkpoint_every=2", "keep_checkpoints=3"),
                       resume=True, progress=False, log=messages.append)
    assert not [*out.glob(".*.tmp"), *(out / "checkpoints").glob(".*.tmp")]
    assert sum("left by a write that was killed" in m for m in messages) == 2
    # every clip is a full crop (the files are longer than 1 s): steps x batch x crop seconds
    assert result.summary["audio_hours_seen"] * 3600 == pytest.approx(steps * batch * crop_seconds, rel=1e-9)


# -- poisoned weights and features: an error before anything is cached -----------------------------


def _timbre_task(folder: Path, files: list[Path]) -> Path:
    """A demo-timbre task whose every split holds ``files``."""
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for split in ("train", "valid", "test"):
            for i, path in enumerate(files):
                f.write(json.dumps({"path": str(path), "kind": "note", "split": split, "timbre": "ab"[i % 2]}) + "\n")
    return folder


def _extract_cli(tmp_path: Path, *upstream: str, extra: tuple[str, ...] = ()):
    """``mert extract`` of the valid split of a task over two files of ``music_dir`` (``tmp_path / "music"``)."""
    task = tmp_path / "task"
    if not task.exists():
        _timbre_task(task, [tmp_path / "music" / "a.wav", tmp_path / "music" / "b.flac"])
    return CliRunner().invoke(cli, ["extract", *upstream, "--task", "demo-timbre", "--task-set", f"data_dir={task}", "--split", "valid",
                                    "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra])


def _one_error_line(result, exit_code: int) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == exit_code and len(errors) == 1, result.output
    assert "Traceback" not in result.output, result.output
    return errors[0]


def _cached_entries(cache: Path) -> list[Path]:
    return list(cache.glob("features/*/*/*/*/meta.json")) + list(cache.glob("features/*/*/*/.*"))


def _poisoned_student(name: str, value: float) -> torch.nn.Module:
    torch.manual_seed(0)
    student = tiny()
    with torch.no_grad():
        student.state_dict()[name].view(-1)[3] = value
    return student


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_a_checkpoint_with_one_nan_weight_is_refused_naming_the_file_and_tensor(kind, music_dir, tmp_path):
    student = _poisoned_student("transformer.layers.0.feed_forward.output.weight", float("nan"))
    if kind == "safetensors":
        path = tmp_path / "student.safetensors"
        save_student(student, path)
    else:
        path = tmp_path / "step.pt"
        save_checkpoint({"step": 1, "model_args": student.args, "student": student.state_dict()}, path)
    result = _extract_cli(tmp_path, "--checkpoint", str(path))
    line = _one_error_line(result, exit_code=2)
    assert str(path) in line and "transformer.layers.0.feed_forward.output.weight" in line and "NaN" in line
    assert not _cached_entries(tmp_path / "cache")


@pytest.mark.parametrize("gain, dtype, hint", [(3e38, "float32", "diverged"), (1e6, "float16", "feature_dtype=float32")])
def test_non_finite_features_are_an_error_naming_the_upstream_and_layer_and_nothing_is_cached(gain, dtype, hint, music_dir, tmp_path):
    # finite weights whose last layer overflows: in float32 (gain 3e38), or only in the float16 the cache would store
    torch.manual_seed(0)
    student = tiny()
    with torch.no_grad():
        student.transformer.layers[1].ffn_norm.weight.fill_(gain)
    save_student(student, tmp_path / "student.safetensors")
    result = _extract_cli(tmp_path, "--checkpoint", str(tmp_path / "student.safetensors"), extra=("--set", f"feature_dtype={dtype}"))
    line = _one_error_line(result, exit_code=1)
    assert "layer2" in line and "layer1" not in line  # layer 2 alone overflows
    assert f"{tmp_path.name}/student" in line and "a.wav" in line and hint in line and "nothing was cached" in line
    assert not _cached_entries(tmp_path / "cache")


# -- a Hugging Face upstream's cache key covers everything that changes its features --------------


def _edit_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_eps"] = 0.5  # same shapes, other features
    (folder / "config.json").write_text(json.dumps(config))


def _edit_a_shard(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    tensors = load_file(str(shard))
    name = next(k for k in sorted(tensors) if k.endswith("weight") and tensors[k].ndim == 2)
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize("edit", [_edit_config, _edit_a_shard], ids=["config.json", "one-shard-of-several"])
def test_an_edited_hf_folder_is_extracted_again_not_served_stale_features(edit, music_dir, tmp_path):
    import transformers

    from mert_core.convert import hf_config_from_args

    torch.manual_seed(0)
    folder = tmp_path / "hf"
    model = transformers.HubertModel(transformers.HubertConfig(**hf_config_from_args(tiny().args)))
    model.save_pretrained(folder, max_shard_size="1MB")  # several shards behind an index
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    first = _extract_cli(tmp_path, "--hf-model", str(folder))
    assert first.exit_code == 0 and "(reused)" not in first.output, first.output
    assert "(reused)" in _extract_cli(tmp_path, "--hf-model", str(folder)).output
    before = np.load(next((tmp_path / "cache").glob("features/hf-*/*/valid/*/features.npy")))
    edit(folder)
    second = _extract_cli(tmp_path, "--hf-model", str(folder))
    assert second.exit_code == 0 and "(reused)" not in second.output, second.output
    entries = sorted((tmp_path / "cache").glob("features/hf-*/*/valid/*/features.npy"), key=lambda p: p.stat().st_mtime)
    assert len(entries) == 2 and not np.allclose(np.load(entries[-1]), before, atol=1e-6)


# -- a new run never mixes with an old one in the same folder ------------------------------------


def _run_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_new_run_into_a_run_folder_is_refused_and_overwrite_starts_afresh(music_dir, tmp_path):
    out = tmp_path / "run"
    api.train(_config(out, music_dir, 3, "checkpoint_every=1"), progress=False)
    before = _run_files(out)
    args = ["train", "--teacher", "cqt", "--preset", "tiny", "--data", music_dir, "--out", out, "--max-steps", 2, "--quiet",
            *[a for s in TINY for a in ("--set", s)], "--set", "checkpoint_every=1", "--set", "log_every=1"]
    refused = CliRunner().invoke(cli, [str(a) for a in args])
    line = _one_error_line(refused, exit_code=2)
    assert str(out) in line and "--resume" in line and "--out" in line and "--overwrite" in line
    assert _run_files(out) == before  # nothing of the old run touched

    started = CliRunner().invoke(cli, [str(a) for a in [*args, "--overwrite"]])
    assert started.exit_code == 0, started.output
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_resume_without_a_checkpoint_starts_a_new_run_without_the_old_metrics(music_dir, tmp_path):
    out = tmp_path / "run"
    api.train(_config(out, music_dir, 3), progress=False)
    (out / LAST).unlink()  # as if killed before its first checkpoint
    shutil.rmtree(out / "checkpoints")
    messages = []
    api.train(_config(out, music_dir, 2), resume=True, progress=False, log=messages.append)
    assert any("no last.pt" in m and "metrics.jsonl" in m for m in messages), messages
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# -- a fit that makes its teacher worse writes nothing ---------------------------------------------

SMALL_MEL_RVQ = ["n_mels=16", "n_fft=1024", "stack_frames=2", "num_codebooks=2", "codebook_size=16", "codebook_dim=4",
                 "batch_frames=256", "init_frames=400", "eval_frames=400", "steps=30", "checkpoint_every=10", "log_every=10"]


def test_a_teacher_fit_that_ends_worse_than_it_started_fails_and_writes_no_file(music_dir, tmp_path):
    out = tmp_path / "rvq.safetensors"
    out.write_bytes(b"an earlier fit, kept")
    # an absurd learning rate provokes what real music did to the default one: the error grows instead of falling
    args = ["teacher", "fit", "mel-rvq", "--data", str(music_dir), "--out", str(out), "--device", "cpu", "--quiet",
            *[a for s in [*SMALL_MEL_RVQ, "lr=1000"] for a in ("--set", s)]]
    result = CliRunner().invoke(cli, args)
    line = _one_error_line(result, exit_code=1)
    numbers = [float(x) for x in re.findall(r"\d\.\d+e[+-]\d+", line)]
    assert "mel-rvq" in line and "reconstruction error" in line and str(out) in line and len(numbers) == 2, line
    assert numbers[1] > numbers[0] or not np.isfinite(numbers[1]), line
    assert out.read_bytes() == b"an earlier fit, kept"

    # the same fit at the documented lr lowers the error and writes the file, recording what it measured
    CliRunner().invoke(cli, [*args[:-2], "--set", "lr=3e-3"], catch_exceptions=False)
    with safe_open(str(out), "pt") as f:
        quality = json.loads(f.metadata()["mert-mel-rvq-teacher"])["fit_quality"]
    assert quality[0]["end"] < quality[0]["start"], quality


@pytest.mark.parametrize("start, end", [(1.0, float("nan")), (1.0, 1.01), (float("inf"), 1.0), (None, float("inf"))])
def test_the_one_gate_of_fitted_teacher_files_refuses_a_worse_or_non_finite_quality(start, end, tmp_path):
    out = tmp_path / "teacher.safetensors"
    tensors = {"centroids": torch.zeros(4, 2)}
    with pytest.raises(FitDiverged, match=r"teacher 'k': the fit's inertia per frame (ended worse than it started|is not finite).*not written"):
        write_teacher_file(out, tensors, "fmt", {}, [FitQuality("inertia per frame", 0.5, 0.5), FitQuality("inertia per frame", start, end)], "k")
    assert not out.exists() and not list(tmp_path.iterdir())
    write_teacher_file(out, tensors, "fmt", {}, [FitQuality("inertia per frame", 0.5, 0.5), FitQuality("inertia per frame", None, 0.7)], "k")
    assert out.exists()  # unchanged (a fit of 0 steps) or not measured at the start: written


# -- bad input is one line, exit 2, and leaves no run folder ----------------------------------------


@pytest.mark.parametrize("extra, named", [
    (["--set", "data.crop_seconds=0.001"], "data.crop_seconds"),
    (["--teacher", "cqt"], "teacher 'cqt' is listed twice"),
    (["--set", "data.sample_rate=1"], "data.sample_rate"),
    (["--out", "{file}"], "{file}"),
], ids=["crop-shorter-than-a-frame", "same-teacher-twice", "sample-rate-1", "out-is-a-file"])
def test_bad_training_input_is_one_line_exit_2_without_a_run_folder(extra, named, music_dir, tmp_path):
    afile = tmp_path / "not-a-folder"
    afile.write_text("")
    out = tmp_path / "run"
    extra = [a.format(file=afile) for a in extra]
    args = ["train", "--teacher", "cqt", "--preset", "tiny", "--data", str(music_dir), "--out", str(out), "--max-steps", "1", "--quiet",
            *[a for s in TINY for a in ("--set", s)], *extra]
    line = _one_error_line(CliRunner().invoke(cli, args), exit_code=2)
    assert named.format(file=afile) in line, line
    assert not out.exists() and afile.read_text() == ""


def test_an_extraction_window_too_short_to_be_useful_is_refused(music_dir, tmp_path):
    torch.manual_seed(0)
    save_student(tiny(), tmp_path / "student.safetensors")
    result = _extract_cli(tmp_path, "--checkpoint", str(tmp_path / "student.safetensors"), extra=("--set", "window_seconds=0.0001"))
    assert "window_seconds" in _one_error_line(result, exit_code=2)
    assert not (tmp_path / "cache").exists()


def test_a_folder_whose_only_readable_audio_is_nan_is_one_line_without_a_run_folder(corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("nan.wav", "inf.wav", "empty.wav"):  # headers that read, samples that do not; one unreadable header
        shutil.copyfile(corpus / name, data / name)
    out = tmp_path / "run"
    args = ["train", "--teacher", "cqt", "--preset", "tiny", "--data", str(data), "--out", str(out), "--max-steps", "1", "--quiet",
            "--set", "data.min_seconds=1.0", "--set", "data.crop_seconds=1.0", "--set", "data.num_workers=1"]  # read in a worker
    line = _one_error_line(CliRunner().invoke(cli, args), exit_code=2)
    assert "could be read" in line and "NaN or infinite" in line, line
    assert not out.exists()


# -- checkpoints carry a content hash, checked on load ---------------------------------------------


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor of a torch.save zip file (its CRC is not checked on load)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _flip_a_safetensors_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + (len(raw) - 8 - header) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_bit_flipped_checkpoint_is_refused_on_resume_and_on_load(music_dir, tmp_path):
    out = tmp_path / "run"
    api.train(_config(out, music_dir, 2, "checkpoint_every=1"), progress=False)
    load_student(out / LAST)  # intact: loads
    _flip_a_tensor_byte(out / LAST)
    assert torch.load(out / LAST, weights_only=True)["step"] == 2  # torch reads it without a word
    args = ["train", "--teacher", "cqt", "--preset", "tiny", "--data", str(music_dir), "--out", str(out), "--max-steps", "3", "--quiet",
            "--resume", *[a for s in [*TINY, "checkpoint_every=1", "log_every=1"] for a in ("--set", s)]]
    line = _one_error_line(CliRunner().invoke(cli, args), exit_code=2)
    assert str(out / LAST) in line and "content hash" in line and "checkpoints" in line, line
    line = _one_error_line(_extract_cli(tmp_path, "--checkpoint", str(out / LAST)), exit_code=2)
    assert str(out / LAST) in line and "content hash" in line

    _flip_a_safetensors_byte(out / STUDENT_FILE)
    line = _one_error_line(_extract_cli(tmp_path, "--checkpoint", str(out / STUDENT_FILE)), exit_code=2)
    assert str(out / STUDENT_FILE) in line and "content hash" in line
    assert not _cached_entries(tmp_path / "cache")
    start_from = ["train", "--teacher", "cqt", "--preset", "tiny", "--data", str(music_dir), "--out", str(tmp_path / "cont"),
                  "--max-steps", "1", "--quiet", "--init-from", str(out / STUDENT_FILE), *[a for s in TINY for a in ("--set", s)]]
    line = _one_error_line(CliRunner().invoke(cli, start_from), exit_code=2)
    assert "model.init_from" in line and "content hash" in line, line


# -- hostile pickles: one line, and no advice to load them unsafely --------------------------------

HOSTILE_PICKLE = textwrap.dedent("""
    import os, sys, torch
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sys.argv[2]}",))
    torch.save({"format": "mert-checkpoint-v1", "student": Payload()}, sys.argv[1])
""")


def _hostile_pickle(path: Path, marker: Path) -> Path:
    subprocess.run([sys.executable, "-c", HOSTILE_PICKLE, str(path), str(marker)], check=True, timeout=120)
    return path


def _refused_without_unsafe_advice(line: str, path: Path) -> None:
    assert str(path) in line and "system" in line and "runs code" in line, line
    assert "weights_only" not in line and "trusted source" not in line, line


def test_a_hostile_pickle_is_one_line_that_does_not_advise_loading_it_unsafely(music_dir, tmp_path):
    marker = tmp_path / "ran"
    evil = _hostile_pickle(tmp_path / "evil.pt", marker)
    result = _extract_cli(tmp_path, "--checkpoint", str(evil))
    _refused_without_unsafe_advice(_one_error_line(result, exit_code=2), evil)

    hf = tmp_path / "hf"
    hf.mkdir()
    from mert_core.convert import hf_config_from_args

    (hf / "config.json").write_text(json.dumps(hf_config_from_args(tiny().args)))
    _hostile_pickle(hf / "pytorch_model.bin", marker)
    _refused_without_unsafe_advice(_one_error_line(_extract_cli(tmp_path, "--hf-model", str(hf)), exit_code=2), hf / "pytorch_model.bin")

    from mert_core.registry import default_registry

    with pytest.raises(ValueError) as caught:
        default_registry().build("teacher", "rvq-vae", {"weights_path": str(evil)})
    _refused_without_unsafe_advice(str(caught.value), evil)
    assert "\n" not in str(caught.value) and not marker.exists()


def test_a_copied_run_folder_resumes_like_the_original(music_dir, tmp_path):
    def config(out, steps):
        return api.make_train_config(teachers=["cqt"], preset="tiny", data=[music_dir], out_dir=out, max_steps=steps,
                                     overrides=[*TINY, "log_every=1", "checkpoint_every=1", "teacher.cqt.normalize=per-bin"])

    original, copy = tmp_path / "run", tmp_path / "moved" / "run"
    api.train(config(original, 2), progress=False)  # fits its CQT statistics into the run folder
    shutil.copytree(original, copy)
    want = api.train(config(original, 3), resume=True, progress=False).student.state_dict()
    shutil.rmtree(original)  # nothing may still point at the first folder
    got = api.train(config(copy, 3), resume=True, progress=False)
    assert all(torch.equal(want[k], v) for k, v in got.student.state_dict().items())  # the same computation, bit for bit
    state = torch.load(copy / LAST, weights_only=True)
    assert state["config"]["out_dir"] == str(copy)
    assert state["config"]["teachers"][0]["options"]["teacher_file"] == str(copy / "teacher-cqt.safetensors")
    assert state["history"][-1]["changed"]["out_dir"] == [str(original), str(copy)]
