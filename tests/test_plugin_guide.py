"""A plugin written only from the README's "Writing a plugin" guide, installed with
pip and loaded through its entry point, passes mert_core.testing's conformance
checks and, in a real training run, gets everything the guide promises: the
student's geometry, the fit keywords, the per-micro-batch generator and the
step hook."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from mert_core import api
from mert_core.geometry import FrameGeometry
from mert_core.registry import load_registry
from mert_core.tasks import SPLITS, BeatTaskOptions, Task, TaskOptions
from mert_core.testing import check_task, check_teacher, write_test_audio
from mert_core.trainer import step_seed

SR = 24000

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "mert-guide-plugin"
version = "0.1.0"
dependencies = ["mert-toolkit", "torch"]

[project.entry-points.mert]
guide = "mert_guide"
"""

MODULE = '''\
"""A teacher and a task written from the README's plugin guide alone."""

import json
from pathlib import Path

import soundfile as sf
import torch
from pydantic import Field

from mert_core.hookspecs import hookimpl
from mert_core.tasks import Example, Task, TaskOptions, check_dir
from mert_core.fitting import FittedTeacherOptions
from mert_core.teacher import IGNORE_LABEL, TargetSpec, Teacher


class EnergyOptions(FittedTeacherOptions):
    teacher_file: Path | None = Field(None, description="Fitted energy bin edges (JSON) written by fit().")
    num_classes: int = Field(4, ge=2, description="Energy bins per frame.")
    record: Path | None = Field(None, description="Where to append what the core handed the teacher (JSON lines).")


class EnergyTeacher(Teacher):
    name = "guide-energy"
    description = "Frame energy quantised into fitted bins, one random codebook of two per batch"
    Options = EnergyOptions
    fittable = True

    def __init__(self, options, geometry):
        super().__init__(options, geometry)
        self.edges = None
        if options.teacher_file is not None:
            self.edges = torch.tensor(json.loads(Path(options.teacher_file).read_text())["edges"])

    def _log(self, **what):
        if self.options.record is not None:
            with open(self.options.record, "a") as f:
                f.write(json.dumps(what) + "\\n")

    def _energy(self, wave):
        g = self.grid  # the grid targets are made on (the student's frames are the core's business)
        if wave.shape[1] < g.receptive_field:
            return wave.new_zeros(wave.shape[0], 0)
        frames = wave.float().unfold(1, g.receptive_field, g.hop_samples)  # B, T, receptive field
        return frames.pow(2).mean(-1).add(1e-8).log10()  # B, T

    def target_spec(self):
        return TargetSpec(kind="discrete", frame_rate_hz=self.frame_rate_hz, num_codebooks=2, num_classes=self.options.num_classes)

    def needs_fit(self):
        return self.edges is None

    def fit(self, files, out_file, *, seed=0, device=None, progress=True):
        energies = []
        for given in map(Path, files):  # audio files or folders of them
            for path in sorted(given.glob("*.wav")) if given.is_dir() else [given]:
                wave, _ = sf.read(path, dtype="float32")
                energies.append(self._energy(torch.from_numpy(wave)[None])[0])
        quantiles = torch.linspace(0, 1, self.options.num_classes + 1)[1:-1]
        edges = torch.quantile(torch.cat(energies), quantiles).tolist()
        Path(out_file).write_text(json.dumps({"edges": edges, "seed": seed, "device": str(device), "progress": progress}))
        self.edges = torch.tensor(edges)
        self.options = self.options.model_copy(update={"teacher_file": Path(out_file)})
        return Path(out_file)

    @torch.no_grad()
    def store_targets(self, wave):
        bins = torch.bucketize(self._energy(wave), self.edges.to(wave.device))  # B, T
        return torch.stack([bins, self.options.num_classes - 1 - bins], -1)  # B, T, 2: both codebooks

    def targets_from_store(self, labels, generator=None):
        if generator is None:
            keep = 0
        else:
            keep = int(torch.randint(2, (1,), generator=generator, device=generator.device))
        self._log(kind="targets", generator_seed=None if generator is None else generator.initial_seed(), keep=keep)
        out = torch.full_like(labels, IGNORE_LABEL)
        out[..., keep] = labels[..., keep]
        return out

    @torch.no_grad()
    def targets(self, wave, generator=None):
        return self.targets_from_store(self.store_targets(wave), generator)

    def on_step(self, student, step):
        self._log(kind="step", step=step, weights=float(sum(p.detach().double().sum() for p in student.parameters())))


class LoudnessTaskOptions(TaskOptions):
    data_dir: Path | None = Field(None, description="Folder with train/valid/test subfolders of loud_*.wav and quiet_*.wav.")


class LoudnessTask(Task):
    name = "guide-loudness"
    description = "Loud or quiet clip (accuracy)"
    Options = LoudnessTaskOptions
    problem = "multiclass"
    metrics = ("accuracy",)

    def labels(self):
        return ["loud", "quiet"]

    def load_examples(self, split):
        root = check_dir(self.options.data_dir, "train/valid/test folders of loud_*.wav and quiet_*.wav", self.name)
        return [Example(path, self.labels().index(path.name.split("_")[0])) for path in sorted((root / split).glob("*.wav"))]


@hookimpl
def register_teachers(register):
    register(EnergyTeacher)


@hookimpl
def register_tasks(register):
    register(LoudnessTask)
'''


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    package = tmp_path_factory.mktemp("mert-guide-plugin")
    (package / "pyproject.toml").write_text(PYPROJECT)
    (package / "mert_guide").mkdir()
    (package / "mert_guide" / "__init__.py").write_text(MODULE)
    target = tmp_path_factory.mktemp("site")
    # --no-deps: mert and torch are already installed; --no-build-isolation --no-index: no network needed
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(package)], check=True, cwd=tmp_path_factory.mktemp("build"), capture_output=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(target))
        yield load_registry()
        sys.modules.pop("mert_guide", None)


def _records(path, kind):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def test_found_through_its_entry_point(registry):
    for kind, name in (("teacher", "guide-energy"), ("task", "guide-loudness")):
        assert registry.get(kind, name).distribution == "mert-guide-plugin"


def test_passes_the_conformance_checks(registry, tmp_path):
    record = tmp_path / "record.jsonl"
    audio = write_test_audio(tmp_path / "audio")
    teacher = check_teacher(lambda geometry: registry.build("teacher", "guide-energy", {"record": str(record)}, geometry=geometry), audio=audio)
    assert not teacher.needs_fit()
    # the check handed the teacher seeded generators, and the hook a student
    assert {r["generator_seed"] for r in _records(record, "targets")} >= {None, 7}
    assert [r["step"] for r in _records(record, "step")] == [0, 1]
    # built for another student's geometry, it frames by that one
    other = check_teacher(lambda geometry: registry.build("teacher", "guide-energy", {}, geometry=geometry), audio=audio,
                          geometry=FrameGeometry(16000, 160, 400))
    assert other.frame_rate_hz == 100.0 and other.target_spec().frame_rate_hz == 100.0

    data = tmp_path / "task-data"
    t = np.arange(SR) / SR
    for split in SPLITS:
        (data / split).mkdir(parents=True)
        for i in range(3):
            for label, amplitude in (("loud", 0.5), ("quiet", 0.01)):
                sf.write(data / split / f"{label}_{i}.wav", (amplitude * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), SR)
    task = check_task(registry.build("task", "guide-loudness", {"data_dir": str(data)}), splits=SPLITS)
    assert len(task.examples("test")) == 6


def test_a_training_run_hands_it_the_fit_keywords_the_generator_and_the_step_hook(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MERT_CACHE", str(tmp_path / "cache"))
    record = tmp_path / "record.jsonl"
    audio = write_test_audio(tmp_path / "audio")
    config = api.make_train_config(
        teachers=["guide-energy"], preset="tiny", data=[audio], out_dir=tmp_path / "run", max_steps=2, registry=registry,
        overrides=[f"teacher.guide-energy.record={record}", "data.batch_size=2", "data.num_workers=0", "data.crop_seconds=2.0",
                   "log_every=1", "seed=3", "device=cpu"],
    )
    api.train(config, registry=registry, progress=False, log=lambda message: None)

    fitted = json.loads((tmp_path / "run" / "teacher-guide-energy.safetensors").read_text())
    assert (fitted["seed"], fitted["device"], fitted["progress"]) == (3, "cpu", True)
    targets = _records(record, "targets")
    assert [r["generator_seed"] for r in targets] == [step_seed(3, step, 0, 0) for step in range(2)]
    steps = _records(record, "step")
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert steps[0]["weights"] != steps[-1]["weights"]  # the hook sees the student the optimizer updates
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and np.isfinite(last["loss/guide-energy"])


def test_a_beat_task_must_declare_the_beat_options():
    with pytest.raises(TypeError, match="BeatTaskOptions"):
        type("BadBeat", (Task,), {"name": "bad-beat", "problem": "beat", "level": "frame", "Options": TaskOptions})

    class Good(BeatTaskOptions):
        pass

    beat = type("GoodBeat", (Task,), {"name": "good-beat", "problem": "beat", "level": "frame", "Options": Good,
                                      "metrics": ("beat_f_measure",)})
    assert beat().options.tolerance_seconds == 0.07 and beat().options.postprocess == "dp"
