"""The trainer end to end on CPU: a smoke run, outputs, SIGKILL + resume,
torchrun with two processes, non-finite steps, augmentation order, bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mert_core import api
from mert_core.checkpoint import load_student
from mert_core.registry import load_registry
from mert_core.trainer import TargetLengthError, TrainingError

TINY = ["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0", "data.min_seconds=1.0", "log_every=1"]

# Test plugins, installed as real distributions through entry points (make_dist).
CHECK_PLUGINS = '''
import os, time
import torch
from pydantic import Field
from mert_core.hookspecs import hookimpl
from mert_core.teacher import Teacher, TeacherOptions, TargetSpec
from mert_core.augment import Augmentation, AugmentOptions

class CleanOpts(TeacherOptions):
    extra_frames: int = Field(0, description="frames to add (to provoke a length error)")
    nan_after_step: int = Field(-1, description="produce NaN targets from this call on (-1 never)")

class CleanCheck(Teacher):
    """Fails if it ever sees augmented audio (the DC offset added by add-dc)."""
    name = "clean-check"
    Options = CleanOpts
    calls = 0
    def target_spec(self):
        return TargetSpec(kind="continuous", dim=1, frame_rate_hz=self.frame_rate_hz)
    def targets(self, wave, generator=None):
        if wave.mean().abs() > 10:
            raise RuntimeError("teacher saw augmented audio")
        CleanCheck.calls += 1
        frames = (wave.shape[1] - 400) // self.hop_samples + 1 + self.options.extra_frames
        out = wave[:, : frames * self.hop_samples].reshape(wave.shape[0], -1, self.hop_samples)[:, :frames].std(-1, keepdim=True)
        if frames > out.shape[1]:
            out = torch.cat([out, out[:, -1:].expand(-1, frames - out.shape[1], -1)], 1)
        if 0 <= self.options.nan_after_step <= CleanCheck.calls:
            out = out * float("nan")
        return out

class AddDCOpts(AugmentOptions):
    sleep_seconds: float = Field(0.0, description="slow each step down (to kill a run mid-way)")

class AddDC(Augmentation):
    """Adds a large DC offset: harmless to learn from, impossible to miss."""
    name = "add-dc"
    Options = AddDCOpts
    def forward(self, wave, lengths, generator):
        time.sleep(self.options.sleep_seconds)
        return wave + 100.0

@hookimpl
def register_teachers(register):
    register(CleanCheck)

@hookimpl
def register_augmentations(register):
    register(AddDC)
'''


@pytest.fixture
def check_plugins(make_dist):
    return make_dist("mert-check-plugins", "0.0.1", {"check": "mert_check_plugins"}, {"mert_check_plugins": CHECK_PLUGINS})


def _config(out, data, *extra, teachers=("cqt",), augment=(), steps=4, registry=None):
    return api.make_train_config(
        teachers=list(teachers), augment=list(augment), preset="tiny", data=[data], out_dir=out,
        max_steps=steps, overrides=[*TINY, *extra], registry=registry,
    )


def test_smoke_run_writes_metrics_checkpoints_plots_and_summary(tmp_path, music_dir):
    out = tmp_path / "run"
    result = api.train(_config(out, music_dir, "checkpoint_every=2"), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "loss/cqt", "loss/features_penalty", "lr", "audio_seconds_per_second", "data_wait_fraction"} <= r.keys() for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in rows)
    for name in ("loss.png", "summary.json", "config.json", "last.pt", "student.safetensors"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["audio_hours_seen"] > 0 and 0 <= summary["data_wait_fraction"] <= 1
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["teachers"][0]["name"] == "cqt"
    assert "mert-toolkit" in state["plugin_versions"]
    weights = load_file(out / "student.safetensors")
    student, info = load_student(out)
    assert set(weights) == set(student.state_dict())
    for k, v in result.student.state_dict().items():
        assert torch.equal(v, student.state_dict()[k])  # saved and loaded: the same bytes
    # two numbered checkpoints kept (keep_checkpoints=2), last.pt is the newest
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]


def test_augmentations_run_after_the_teachers(tmp_path, music_dir, check_plugins):
    registry = load_registry()
    config = _config(tmp_path / "run", music_dir, teachers=("clean-check", "cqt"), augment=("add-dc",), steps=2, registry=registry)
    api.train(config, registry=registry, progress=False)  # CleanCheck raises if it sees augmented audio
    assert registry.get("teacher", "clean-check").obj.calls == 2


def test_misaligned_teacher_is_a_named_error(tmp_path, music_dir, check_plugins):
    registry = load_registry()
    config = _config(tmp_path / "run", music_dir, "teacher.clean-check.extra_frames=5", teachers=("clean-check",), steps=1, registry=registry)
    with pytest.raises(TargetLengthError, match=r"teacher 'clean-check' gave \d+ frames where the student has \d+ \(files: .*music"):
        api.train(config, registry=registry, progress=False)


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path, music_dir, check_plugins):
    registry = load_registry()
    out = tmp_path / "run"
    config = _config(out, music_dir, "teacher.clean-check.nan_after_step=3", "max_bad_steps=3", "checkpoint_every=100",
                     teachers=("clean-check",), steps=10, registry=registry)
    with pytest.raises(TrainingError, match="3 bad steps in a row at step 4.*the loss or the targets are at fault"):
        api.train(config, registry=registry, progress=False)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["counters"]["bad_steps"] == 3 and state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_a_run_whose_every_step_was_skipped_does_not_end_as_done(tmp_path, music_dir, check_plugins):
    registry = load_registry()
    out = tmp_path / "run"
    # a short run on targets that are all NaN: fewer bad steps than max_bad_steps, yet nothing learned
    config = _config(out, music_dir, "teacher.clean-check.nan_after_step=0", teachers=("clean-check",), steps=2, registry=registry)
    messages = []
    with pytest.raises(TrainingError, match=r"all 2 steps of this run were bad at step 1.*the loss or the targets are at fault"):
        api.train(config, registry=registry, progress=False, log=messages.append)
    assert not any(m.startswith("done") for m in messages) and not (out / "summary.json").exists(), messages


def test_bad_files_are_skipped_and_counted(tmp_path, music_dir):
    (music_dir / "empty.wav").write_bytes(b"")
    (music_dir / "notes.wav").write_text("this is not audio")
    good = (music_dir / "a.wav").read_bytes()
    (music_dir / "truncated.wav").write_bytes(good[: len(good) // 3 * 2][:44] + good[44:2000])
    out = tmp_path / "run"
    api.train(_config(out, music_dir, steps=3), progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["files_skipped"] >= 2


def _cli(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "mert_cli.main", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _train_args(out, data, steps):
    args = ["train", "--teacher", "cqt", "--teacher", "ema", "--augment", "add-dc", "--preset", "tiny", "--data", str(data),
            "--out", str(out), "--max-steps", str(steps), "--quiet", "--set", "checkpoint_every=2",
            "--set", "augment.add-dc.sleep_seconds=0.4"]
    for item in TINY:
        args += ["--set", item]
    return args


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, music_dir, check_plugins):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(check_plugins), os.environ.get("PYTHONPATH", "")])}
    steps = 8
    reference = _cli(*_train_args(tmp_path / "ref", music_dir, steps), env=env)
    killed = _cli(*_train_args(tmp_path / "run", music_dir, steps), env=env)
    target = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    deadline = time.time() + 300
    while not target.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] < steps
    resumed = _cli(*_train_args(tmp_path / "run", music_dir, steps), "--resume", env=env)
    assert resumed.wait() == 0, resumed.stdout.read()
    assert reference.wait() == 0, reference.stdout.read()
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    # bitwise: both runs are the same computation (same machine, environment, thread count and batches);
    # the checkpoint holds every state the rest of the run depends on, so the resume changes nothing
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k
    for k in a["heads"]:
        assert torch.equal(a["heads"][k], b["heads"][k]), k
    for k in a["teacher_states"]["ema"]:  # the EMA teacher's copy continues exactly too
        assert torch.equal(a["teacher_states"]["ema"][k], b["teacher_states"]["ema"][k]), k


DDP_SCRIPT = '''
import os, sys, torch
from mert_core import api
config = api.make_train_config(teachers=["cqt", "ema"], preset="tiny", data=[sys.argv[1]], out_dir=sys.argv[2], max_steps=3,
                               overrides=["data.batch_size=1", "data.num_workers=0", "data.crop_seconds=2.0", "data.min_seconds=1.0", "log_every=1"])
result = api.train(config, progress=False)
torch.save(result.student.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
'''


@pytest.mark.slow
def test_two_process_torchrun_keeps_replicas_identical(tmp_path, music_dir):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script), str(music_dir), str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    # bitwise: the all-reduce hands both ranks the same averaged gradient bytes, and the same optimizer
    # step from the same start gives the same weights
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    # both ranks read their own 5 s crop per step: 2 x 3 x 2 s of audio in all
    assert summary["audio_hours_seen"] * 3600 == pytest.approx(12.0, rel=0.01)


def test_reading_a_checkpoint_or_student_file_never_generates_the_demo_data(tmp_path, monkeypatch):
    """A saved config with `data.paths: []` names the demo folder; reading it writes nothing into the cache."""
    from mert_core.checkpoint import load_checkpoint, resume_config, save_checkpoint, save_student
    from mert_core.demo import demo_root
    from mert_core.model import tiny
    from mert_core.runconfig import with_named_data_paths

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MERT_CACHE", str(cache))
    old = api.make_train_config(teachers=["cqt"], preset="tiny", out_dir=tmp_path / "run", max_steps=4)
    assert old.data.paths == []
    save_checkpoint({"config": old.model_dump(mode="json")}, tmp_path / "last.pt")
    save_student(tiny(), tmp_path / "student.safetensors", config=old.model_dump(mode="json"))

    state = load_checkpoint(tmp_path / "last.pt")
    config, changed = resume_config(with_named_data_paths(old.model_copy(deep=True)), state, tmp_path / "run")
    _, student_config = load_student(tmp_path / "student.safetensors")
    assert changed == {} and [str(p) for p in config.data.paths] == [str(demo_root() / "pieces")] and student_config["config"]["data"]["paths"] == []
    assert list(cache.iterdir()) == []  # no demo-v1 (nor a half-written sibling) was made


def test_resume_accepts_a_run_saved_before_the_demo_paths_were_recorded(tmp_path):
    """Runs of the demo saved by earlier versions hold `data.paths: []`; the resumed config names the demo folder."""
    from mert_core.checkpoint import resume_config
    from mert_core.demo import DemoSize, ensure_demo_data
    from mert_core.runconfig import with_data_paths

    ensure_demo_data(size=DemoSize(pieces_per_key=1, piece_seconds=2.0, keys=("C major",), note_pitches=(60,),
                                   timbres=("flute",), note_seconds=0.5), progress=False)
    old = api.make_train_config(teachers=["cqt"], preset="tiny", out_dir=tmp_path / "run", max_steps=4)
    assert old.data.paths == []  # what an earlier version saved
    config, changed = resume_config(with_data_paths(old.model_copy(deep=True)), {"config": old.model_dump(mode="json")}, tmp_path / "run")
    assert changed == {} and [str(p) for p in config.data.paths] == [str(p) for p in with_data_paths(old.model_copy(deep=True)).data.paths]


def test_the_cpu_preset_trains_with_a_live_teacher_and_one_that_follows_the_student(tmp_path, music_dir):
    """The cpu student's 1840-sample frames: the CQT's targets are shifted onto them, the
    ema teacher's (made from the student's own frames) are not, and both losses are scored."""
    config = api.make_train_config(teachers=["cqt", "ema"], preset="cpu", data=[music_dir], out_dir=tmp_path / "run",
                                   max_steps=2, overrides=TINY)
    assert config.model.preset == "cpu"
    result = api.train(config, progress=False)
    assert result.student.geometry.receptive_field == 1840
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["loss/cqt"], r["loss/ema"]])).all() for r in rows)


def test_the_cpu_recipe_uses_the_cpu_student():
    config = api.make_train_config(recipe="cpu")
    assert config.model.preset == "cpu" and config.loss.feature_penalty == 0.0
    assert [t.name for t in config.teachers] == ["kmeans-logmel-chroma", "cqt"]
    assert config.teachers[0].options == {"combine": "separate"} and config.optim.max_steps == 2000


def test_the_resumable_fields_are_config_fields_and_a_resume_uses_the_value_the_table_says(tmp_path):
    from mert_core.checkpoint import RESUMABLE_FIELDS, resume_config
    from mert_core.errors import ConfigError

    def config(*overrides):
        return api.make_train_config(teachers=["cqt"], preset="tiny", data=[tmp_path], out_dir=tmp_path / "run", max_steps=4,
                                     overrides=list(overrides))

    saved = config("model.init_from_hash=abc")
    flat = saved.model_dump(mode="json")
    for key in RESUMABLE_FIELDS:  # a misspelled field would never be compared
        node = flat
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    given = config("optim.lr=0.0001", "data.num_workers=3", "log_every=7", "model.init_from_hash=def")
    resumed, changed = resume_config(given, {"config": saved.model_dump(mode="json")}, tmp_path / "run")
    assert (resumed.optim.lr, resumed.data.num_workers, resumed.log_every) == (1e-4, 3, 7)  # "new"
    assert resumed.model.init_from_hash == "abc" and RESUMABLE_FIELDS["model.init_from_hash"] == "saved"
    assert changed["optim.lr"] == [saved.optim.lr, 1e-4] and changed["model.init_from_hash"] == ["abc", "def"]
    assert resumed.model_dump(exclude={"optim", "data", "log_every"}) == saved.model_dump(exclude={"optim", "data", "log_every"})
    with pytest.raises(ConfigError, match="config field 'mask.prob'"):
        resume_config(config("mask.prob=0.5"), {"config": saved.model_dump(mode="json")}, tmp_path / "run")
