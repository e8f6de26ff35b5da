"""Conformance checks for plugins, for a plugin package's own pytest suite.

Each ``check_*`` function builds a plugin, exercises every part of its
contract that the core relies on (shapes, dtypes, frame rate against the
student's geometry, generator determinism, the ``fit`` keywords, the step
hook, described options, the fitting contract) and fails the calling test with one message naming
what is wrong and what the contract asks::

    from mert_core.testing import check_teacher, write_test_audio

    def test_my_teacher_honours_the_contract(tmp_path):
        check_teacher(MyTeacher, audio=write_test_audio(tmp_path / "audio"))

The contracts themselves are documented in the README ("Writing a plugin")
and in :mod:`mert_core.teacher`, :mod:`mert_core.tasks` and
:mod:`mert_core.augment`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from mert_core.augment import Augmentation, AugmentOptions
from mert_core.fitting import FittedTeacherOptions
from mert_core.geometry import STUDENT_GEOMETRY, FrameGeometry
from mert_core.tasks import PROBLEMS, SPLITS, Example, Task, TaskOptions
from mert_core.teacher import IGNORE_LABEL, TargetSpec, Teacher, TeacherOptions

TeacherFactory = Callable[[FrameGeometry], Teacher]


def _fail(what: str, message: str) -> None:
    pytest.fail(f"{what}: {message}", pytrace=False)


def synthetic_wave(geometry: FrameGeometry, num_samples: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """``(batch, num_samples)`` float32 audio: decaying harmonic tones over a little noise (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples, dtype=torch.float64) / geometry.sample_rate
    rows = []
    for b in range(batch):
        f0 = 110.0 * 2 ** (float(torch.randint(0, 24, (1,), generator=g)) / 12)
        tone = sum(0.2 / h * torch.sin(2 * math.pi * h * f0 * t) for h in range(1, 5))
        rows.append(tone * torch.exp(-1.5 * (t % 0.5)) + 0.01 * torch.randn(num_samples, generator=g, dtype=torch.float64))
    return torch.stack(rows).float() if rows else torch.zeros(0, num_samples)


def write_test_audio(folder: str | Path, sample_rate: int = 24000, seconds: Sequence[float] = (4.0, 5.0, 6.0)) -> Path:
    """Write one wav file per entry of ``seconds`` into ``folder`` (made if missing) and return it."""
    import soundfile as sf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    geometry = FrameGeometry(sample_rate=sample_rate)
    for i, length in enumerate(seconds):
        wave = synthetic_wave(geometry, int(length * sample_rate), batch=1, seed=100 + i)[0]
        sf.write(folder / f"clip{i}.wav", (0.8 * wave / wave.abs().max()).numpy(), sample_rate)
    return folder


def check_options(plugin: type, base: type[BaseModel]) -> None:
    """The plugin has a name, a description, and ``Options`` subclassing ``base`` with every field described."""
    what = f"{plugin.__name__}"
    if not plugin.name:
        _fail(what, "set the class attribute `name` (how users select it)")
    if not plugin.description:
        _fail(what, "set the class attribute `description` (one line, shown by `mert plugins`)")
    options = plugin.Options
    if not (isinstance(options, type) and issubclass(options, base)):
        _fail(what, f"Options must subclass {base.__module__}.{base.__name__}, got {options!r}")
    bare = [name for name, field in options.model_fields.items() if not field.description]
    if bare:
        _fail(what, f"option(s) {', '.join(bare)} have no description; write Field(default, description=...)")
    try:
        options(no_such_option_for_the_check=1)
    except Exception:  # noqa: BLE001 - pydantic's ValidationError: unknown options are refused
        pass
    else:
        _fail(what, f"{options.__name__} accepts unknown options; keep the base's model_config (extra='forbid')")


def tiny_student_for(geometry: FrameGeometry) -> torch.nn.Module:
    """A small student (``tiny`` width, random weights) on the conv stack of the first preset
    with the frames ``geometry`` describes; ``tiny`` at ``geometry.sample_rate`` when none has them."""
    from mert_core.model import PRESETS, mert_student, student_args

    for preset in PRESETS:
        stack = student_args(preset)
        student = mert_student(**student_args("tiny", conv_kernels=stack["conv_kernels"], conv_strides=stack["conv_strides"],
                                              sample_rate=geometry.sample_rate))
        if student.geometry == geometry:
            return student
    return mert_student(**student_args("tiny", sample_rate=geometry.sample_rate))


def check_teacher(factory: type[Teacher] | TeacherFactory, *, audio: Sequence[str | Path] | str | Path | None = None,
                  geometry: FrameGeometry = STUDENT_GEOMETRY, student: torch.nn.Module | None = None) -> Teacher:
    """Check a teacher against the contract of :class:`mert_core.teacher.Teacher`.

    Targets are checked on the teacher's :attr:`~mert_core.teacher.Teacher.grid` (the
    paper's 400-sample target grid, or the student's frames for a teacher that follows
    the student), and must shift onto the student's frames the way the trainer does it.

    Args:
        factory: the Teacher subclass (built with default options), or a
            callable ``geometry -> Teacher`` (e.g. ``lambda g: registry.build("teacher", NAME, {...}, geometry=g)``).
        audio: audio files or folders to fit on, needed when the teacher
            ``needs_fit()`` (:func:`write_test_audio` makes some).
        geometry: the student's frames to build it for (``student.geometry``: a preset's,
            e.g. the ``cpu`` preset's receptive field of 1840 samples).
        student: the student it attaches to; None: :func:`tiny_student_for` ``geometry``.

    Returns:
        The teacher, fitted when it needed fitting.
    """
    teacher = factory(factory.Options(), geometry) if isinstance(factory, type) else factory(geometry)
    if not isinstance(teacher, Teacher):
        _fail(repr(factory), f"expected a mert_core.teacher.Teacher, got {type(teacher).__name__}")
    what = f"teacher {teacher.name!r}"
    check_options(type(teacher), TeacherOptions)
    if teacher.geometry != geometry:
        _fail(what, f"was built for {geometry} but reports {teacher.geometry}; pass `geometry` on to Teacher.__init__")

    if teacher.needs_fit() and not teacher.fittable:
        _fail(what, "needs_fit() is True but the class does not declare `fittable = True`; `mert teacher fit` fits only a teacher that declares it")
    if teacher.fittable and not issubclass(type(teacher).Options, FittedTeacherOptions):
        _fail(what, "declares fittable = True, so its Options must subclass mert_core.fitting.FittedTeacherOptions "
                    "(the `teacher_file` option a fitted file comes back through)")
    if teacher.needs_fit():
        if audio is None:
            _fail(what, "needs fitting: pass audio=[files or folders] (mert_core.testing.write_test_audio makes some)")
        files = [Path(a) for a in ([audio] if isinstance(audio, (str, Path)) else audio)]
        with tempfile.TemporaryDirectory(prefix="mert-check-") as tmp:
            out = teacher.fit(files, Path(tmp) / "fitted.safetensors", seed=0, device="cpu", progress=False)
            if not Path(out).exists():
                _fail(what, f"fit() returned {out}, which does not exist; write the artifact to out_file and return it")
            rebuilt = type(teacher)(teacher.options.model_copy(update={"teacher_file": Path(out)}), geometry)
            if rebuilt.needs_fit():
                _fail(what, f"built again with teacher_file={out} (what `mert train` does after a fit), it still needs_fit(); "
                            "load the fitted file through the `teacher_file` option")
        if teacher.needs_fit():
            _fail(what, "still needs_fit() after fit(); a fit must load what it wrote")

    # the trainer's order: attach(student), target_spec(), on_step(student, start), then targets per batch
    student = tiny_student_for(geometry) if student is None else student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    if teacher.attach(student) is not None:
        _fail(what, "attach(student) must return None")
    spec = teacher.target_spec()
    if teacher.on_step(student, 0) is not None:
        _fail(what, "on_step(student, step) must return None")
    if not isinstance(spec, TargetSpec):
        _fail(what, f"target_spec() must return a mert_core.teacher.TargetSpec, got {type(spec).__name__}")
    if abs(spec.frame_rate_hz - geometry.frame_rate_hz) > 1e-6:
        _fail(what, f"declares targets at {spec.frame_rate_hz:g} Hz, the student runs at {geometry.frame_rate_hz:g} Hz; use self.frame_rate_hz")

    for num_samples in (geometry.receptive_field, geometry.sample_rate + 123, 2 * geometry.sample_rate):
        wave = synthetic_wave(geometry, num_samples)
        _check_targets(what, spec, teacher.targets(wave), wave, teacher.grid, geometry)
        first = teacher.targets(wave, generator=torch.Generator().manual_seed(7))
        _check_targets(what, spec, first, wave, teacher.grid, geometry)
        if not torch.equal(first, teacher.targets(wave, generator=torch.Generator().manual_seed(7))):
            _fail(what, "targets(wave, generator=g) differ for two generators with the same seed; draw every random choice from `generator`")
        if spec.kind == "discrete":
            stored = teacher.targets_from_store(teacher.store_targets(wave), generator=torch.Generator().manual_seed(7))
            if not torch.equal(stored, first):
                _fail(what, "targets_from_store(store_targets(wave), generator=g) differs from targets(wave, generator=g); "
                            "online and offline labels must agree")

    if teacher.on_step(student, 1) is not None:  # after an optimizer step
        _fail(what, "on_step(student, step) must return None")
    if any(not torch.equal(before[k], v) for k, v in student.state_dict().items()):
        _fail(what, "on_step changed the student's weights; read the student, never modify it")
    state = teacher.training_state()
    if teacher.follows_student and not state:
        _fail(what, "follows_student is True but training_state() is empty; a resumed run could not continue it")
    teacher.load_training_state(state)
    return teacher


def _check_targets(what: str, spec: TargetSpec, targets: Any, wave: torch.Tensor, grid: FrameGeometry,
                   geometry: FrameGeometry) -> None:
    """``targets`` of ``wave`` are on ``grid`` and shift onto the student's frames (``geometry``) as the trainer does."""
    S = wave.shape[1]
    want_frames = grid.num_frames(S)
    per_frame = spec.num_codebooks if spec.kind == "discrete" else spec.dim
    if not isinstance(targets, torch.Tensor) or targets.dim() != 3:
        _fail(what, f"targets of a {tuple(wave.shape)} wave must be a (B, T, {per_frame}) tensor, got {getattr(targets, 'shape', type(targets))}")
    B, T, C = targets.shape
    if B != wave.shape[0] or C != per_frame or abs(T - want_frames) > 1:
        _fail(what, f"targets of a {tuple(wave.shape)} wave have shape {tuple(targets.shape)}; expected "
                    f"({wave.shape[0]}, {want_frames} +/- 1, {per_frame}) (T = self.grid.num_frames(S), C from the TargetSpec)")
    shift = geometry.shift_from(grid)
    student_frames = geometry.num_frames(S)
    if not -1 <= (T - shift.lead_frames) - student_frames <= 1 + shift.trailing_frames:
        _fail(what, f"{T} targets on {grid} do not line up with the student's {student_frames} frames of {geometry} "
                    f"after dropping {shift.lead_frames} leading ones; make targets on self.grid")
    if spec.kind == "discrete":
        if targets.dtype != torch.int64:
            _fail(what, f"discrete targets must be int64, got {targets.dtype}")
        bad = (targets != IGNORE_LABEL) & ((targets < 0) | (targets >= spec.num_classes))
        if bool(bad.any()):
            _fail(what, f"labels outside [0, {spec.num_classes}) that are not IGNORE_LABEL ({IGNORE_LABEL})")
    else:
        if targets.dtype != torch.float32:
            _fail(what, f"continuous targets must be float32, got {targets.dtype}")
        if not bool(torch.isfinite(targets).all()):
            _fail(what, "continuous targets hold NaN or infinity")


def check_task(task: Task | type[Task], *, splits: Sequence[str] = ("train",), frame_rate_hz: float = STUDENT_GEOMETRY.frame_rate_hz) -> Task:
    """Check a task against the contract of :class:`mert_core.tasks.Task`.

    Reads the examples of ``splits`` (so point the task at test data through
    its options), makes probe targets, and scores random probe outputs.

    Args:
        task: a Task instance, or a Task subclass (built with default options).
        splits: the splits to read.
        frame_rate_hz: the rate of frame-level outputs (the student's).

    Returns:
        The task.
    """
    task = task() if isinstance(task, type) else task
    if not isinstance(task, Task):
        _fail(repr(task), f"expected a mert_core.tasks.Task, got {type(task).__name__}")
    what = f"task {task.name!r}"
    check_options(type(task), (PROBLEMS[task.problem].options if task.problem in PROBLEMS else None) or TaskOptions)
    if task.level not in ("clip", "frame") or task.problem not in PROBLEMS:
        _fail(what, f"level {task.level!r} / problem {task.problem!r}: expected clip|frame and {'|'.join(PROBLEMS)}")
    if task.level != PROBLEMS[task.problem].level:
        _fail(what, f"level {task.level!r} with problem {task.problem!r}: frame level goes with beat tracking, clip level with the rest")
    if not task.metrics:
        _fail(what, "declare at least one metric (the first selects the learning rate and the layer)")
    labels = task.labels()
    if not labels or not all(isinstance(name, str) for name in labels):
        _fail(what, f"labels() must return a non-empty list of names, got {labels!r}")
    rng = np.random.default_rng(0)
    for split in splits:
        if split not in SPLITS:
            _fail(what, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        examples = task.examples(split)
        if not all(isinstance(ex, Example) for ex in examples):
            _fail(what, f"load_examples({split!r}) must return mert_core.tasks.Example items")
        if task.level == "frame":
            outputs = [rng.random(int(frame_rate_hz * (ex.duration_seconds or 5.0))) for ex in examples]
            for ex in examples[:3]:
                y = task.frame_targets(ex, 200, frame_rate_hz, train=True)
                if y.shape != (200,) or y.dtype != np.float32:
                    _fail(what, f"frame_targets must be (num_frames,) float32, got {y.shape} {y.dtype}")
        else:
            targets = task.targets(examples)
            if len(targets) != len(examples):
                _fail(what, f"targets() gave {len(targets)} rows for {len(examples)} examples")
            outputs = rng.standard_normal((len(examples), task.num_outputs))
        scores = task.score(outputs, examples, frame_rate_hz=frame_rate_hz)
        missing = [m for m in task.metrics if m not in scores]
        if missing:
            _fail(what, f"score() lacks the declared metric(s) {', '.join(missing)}; it returned {sorted(scores)}")
        if not all(isinstance(v, float) for v in scores.values()):
            _fail(what, f"score() must return plain floats, got {scores!r}")
    return task


def check_augment(factory: type[Augmentation] | Callable[[int], Augmentation], *, sample_rate: int = 24000) -> Augmentation:
    """Check an augmentation against the contract of :class:`mert_core.augment.Augmentation`.

    Args:
        factory: the Augmentation subclass (built with default options), or a
            callable ``sample_rate -> Augmentation``.
        sample_rate: of the test waveforms.

    Returns:
        The augmentation.
    """
    augment = factory(factory.Options(), sample_rate) if isinstance(factory, type) else factory(sample_rate)
    if not isinstance(augment, Augmentation):
        _fail(repr(factory), f"expected a mert_core.augment.Augmentation, got {type(augment).__name__}")
    what = f"augmentation {augment.name!r}"
    check_options(type(augment), AugmentOptions)
    geometry = FrameGeometry(sample_rate=sample_rate)
    wave = synthetic_wave(geometry, 2 * sample_rate, batch=4)
    lengths = torch.tensor([2 * sample_rate, sample_rate, sample_rate + 321, sample_rate // 2])
    wave = wave * (torch.arange(wave.shape[1]) < lengths[:, None])  # zero padding past each length
    clean = wave.clone()
    out = augment(wave, lengths, torch.Generator().manual_seed(3))
    if not torch.equal(wave, clean):
        _fail(what, "changed its input in place; return a new tensor (the teachers' clean audio is shared)")
    if not isinstance(out, torch.Tensor) or out.shape != wave.shape or out.dtype != wave.dtype:
        _fail(what, f"must return a {tuple(wave.shape)} {wave.dtype} tensor, got {getattr(out, 'shape', type(out))}")
    if not torch.equal(out, augment(wave, lengths, torch.Generator().manual_seed(3))):
        _fail(what, "gives other output for the same generator seed; draw every random choice from `generator`")
    padding = torch.arange(wave.shape[1]) >= lengths[:, None]
    if bool(out[padding].abs().gt(0).any()):
        _fail(what, "wrote into the padding past `lengths`; padding must stay zero")
    return augment
