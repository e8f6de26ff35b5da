"""The teacher contract: what a plugin implements to make training targets.

A teacher turns a batch of clean 24 kHz waveforms into per-frame targets at the
student's frame rate, on its :attr:`Teacher.grid`: the paper's 400-sample
frames (the target grid, :attr:`FrameGeometry.target_grid`) for every teacher
but one that follows the student, which frames audio with the student itself.
The core shifts them onto the student's frames
(:meth:`FrameGeometry.shift_from`). It declares those targets with a
:class:`TargetSpec`; the core builds the prediction head and the loss from that
declaration.

Everything the core hands a teacher, and everything it calls, is a method or
argument of :class:`Teacher` below, with a default where it is optional; the
core never probes a teacher with ``hasattr`` or by reading its signature. The
README's "Writing a plugin" section lists the contract, and
:mod:`mert_core.testing` checks a plugin against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from mert_core.errors import CheckpointError, FitDiverged  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.geometry import STUDENT_GEOMETRY, FrameGeometry

IGNORE_LABEL = -1
"""Discrete label value meaning "no target here" (e.g. codebooks not drawn this batch)."""


class TeacherOptions(BaseModel):
    """Base class of a teacher's options. Subclasses describe every field."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TargetSpec:
    """What a teacher produces, per student frame.

    Attributes:
        kind: ``"discrete"`` (class labels, cross-entropy) or ``"continuous"``
            (a vector, mean squared error).
        num_codebooks: discrete only: how many label streams (8 for EnCodec).
        num_classes: discrete only: classes per codebook (K).
        dim: continuous only: size of the target vector (336 for the CQT).
        frame_rate_hz: rate of the targets; must equal the student's.
        default_weight: weight of this teacher's loss in the total when the
            config gives none (the MERT paper weighs the acoustic and the
            musical teacher's losses alike: alpha = 1).
    """

    kind: Literal["discrete", "continuous"]
    frame_rate_hz: float
    num_codebooks: int = 1
    num_classes: int = 0
    dim: int = 0
    default_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind == "discrete" and (self.num_codebooks < 1 or self.num_classes < 2):
            raise ValueError(
                f"discrete TargetSpec needs num_codebooks >= 1 and num_classes >= 2, "
                f"got {self.num_codebooks} and {self.num_classes}"
            )
        if self.kind == "continuous" and self.dim < 1:
            raise ValueError(f"continuous TargetSpec needs dim >= 1, got {self.dim}")


class Teacher(torch.nn.Module):
    """Base class of all teachers.

    Subclasses set ``name``, ``description`` and ``Options`` and implement
    :meth:`target_spec` and :meth:`targets`; every other method has a default.
    Teachers are ``nn.Module`` s so that ``.to(device)`` moves their buffers
    (filters, centroids, codecs); they are never trained by the student's
    optimizer.

    What the core calls, in the order of a run:

    1. ``Teacher(options, geometry)``: ``geometry`` is the student's frames
       (``student.geometry``); the teacher makes its targets on :attr:`grid`,
       which the core shifts onto those frames.
    2. :meth:`needs_fit` (a ``fittable`` teacher); if True, :meth:`fit_plan` and
       ``fit(files, out_file, seed=, device=, progress=)``, then the teacher is
       built again with ``teacher_file=out_file``. A fit writes through
       :func:`mert_core.fitting.write_teacher_file`, which refuses a fit that
       made its teacher worse.
    3. :meth:`target_spec`, once.
    4. Each micro-batch: ``targets(wave, generator=)`` (or
       ``targets_from_store(labels, generator=)`` with a label store), under
       ``torch.no_grad()``, before augmentation.
    5. After each optimizer step: ``on_step(student, step)``.

    Args:
        options: a validated instance of ``self.Options``.
        geometry: the student's frames (24 kHz, hop 320; receptive field 400
            for the paper's conv stack, 1840 for the ``cpu`` presets). Targets are
            made on :attr:`grid`, not on these frames.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[TeacherOptions]] = TeacherOptions

    def __init__(self, options: TeacherOptions, geometry: FrameGeometry = STUDENT_GEOMETRY) -> None:
        super().__init__()
        self.options = options
        self.geometry = geometry

    @property
    def grid(self) -> FrameGeometry:
        """The grid this teacher makes its targets on: the paper's 400-sample frames
        (``geometry.target_grid``, the same for every student), or the student's own
        frames for a teacher that ``follows_student``."""
        return self.geometry if self.follows_student else self.geometry.target_grid

    @property
    def sample_rate(self) -> int:
        """Sample rate of the waveforms handed to :meth:`targets` (the student's)."""
        return self.geometry.sample_rate

    @property
    def hop_samples(self) -> int:
        """The student's hop (320 at 24 kHz = 75 Hz)."""
        return self.geometry.hop_samples

    @property
    def frame_rate_hz(self) -> float:
        """The student's frame rate, which targets must match (75 Hz)."""
        return self.geometry.frame_rate_hz

    def target_spec(self) -> TargetSpec:
        """Declare the targets (kind, size, frame rate)."""
        raise NotImplementedError

    @torch.no_grad()
    def targets(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Make targets from clean audio.

        Args:
            wave: ``(B, S)`` float waveforms at ``sample_rate``.
            generator: the trainer's seeded generator of this micro-batch (on
                ``wave.device``): draw every random choice from it (e.g. which
                codebook to train on), and a resumed run makes the same
                targets. None outside training: use a fixed seed of your own.

        Returns:
            discrete: ``(B, T, num_codebooks)`` int64 labels (``IGNORE_LABEL``
            where there is no target); continuous: ``(B, T, dim)`` float32.
            ``T`` is within one frame of ``self.grid.num_frames(S)`` (the
            target grid's frames, not the student's).
        """
        raise NotImplementedError

    # -- optional: offline label stores ----------------------------------------

    @torch.no_grad()
    def store_targets(self, wave: torch.Tensor) -> torch.Tensor:
        """What an offline label store saves for ``wave``: by default the
        targets themselves. A teacher whose targets vary per batch (one random
        codebook) stores the full labels and selects in :meth:`targets_from_store`."""
        return self.targets(wave)

    def targets_from_store(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Turn stored labels ``(B, T, C)`` into this batch's targets (default: as stored).

        ``generator`` is the same per-micro-batch generator :meth:`targets` gets.
        """
        return labels

    # -- optional: teachers that must be fitted before use (k-means) ----------

    fittable: ClassVar[bool] = False
    """True for a teacher that implements :meth:`fit`. Its ``Options`` subclass
    :class:`mert_core.fitting.FittedTeacherOptions`: the fitted file comes back
    through the option ``teacher_file``, which ``mert train`` writes into the run
    config after a fit (checkpoints are self-contained, a resumed run loads the
    file instead of refitting). :mod:`mert_core.fitting` holds the rest of the
    service: sampling a corpus, writing and reading the file, the fit errors."""

    def needs_fit(self) -> bool:
        """True when the teacher cannot make targets until :meth:`fit` has run (only a ``fittable`` one)."""
        return False

    def fit(self, files: list[Path], out_file: Path, *, seed: int = 0, device: str | torch.device | None = None,
            progress: bool = True) -> Path:
        """Fit the teacher on audio ``files``, save it to ``out_file`` and use it.

        Write the file with :func:`mert_core.fitting.write_teacher_file`, passing
        every quality the fit measured (:class:`~mert_core.fitting.FitQuality`): a
        fit that ends worse than it started, or non-finite, then fails with
        :class:`FitDiverged` and writes nothing.

        Args:
            files: audio files, folders or manifests; or shard sources (URLs,
                index.json, brace patterns, as strings), which
                :func:`mert_core.shards.local_sample` turns into local files
                holding a bounded sample (:func:`mert_core.fitting.plan_sample`
                calls it; a fit reading audio itself calls it first).
            out_file: the artifact to write (atomically); the teacher later
                loads it through its ``teacher_file`` option.
            seed: seed of every random choice of the fit.
            device: where to compute (the teacher is already on it); None: the CPU.
            progress: show progress bars.

        Returns:
            ``out_file``.
        """
        raise NotImplementedError(f"teacher {self.name!r} has nothing to fit")

    def fit_plan(self, files: list[Path], *, seed: int = 0, device: str | torch.device | None = None) -> str:
        """One line saying what :meth:`fit` will read and about how long it will take ("" when unknown)."""
        return ""

    # -- optional: teachers that follow the student (EMA, data2vec style) ------

    follows_student: ClassVar[bool] = False
    """True for a teacher whose targets change as the student trains (EMA): it
    cannot have an offline label store, and the trainer keeps its
    :meth:`training_state` in every checkpoint."""

    def attach(self, student: torch.nn.Module) -> None:
        """Called once with the student that was built, after the teacher is
        built (and fitted) and before :meth:`target_spec` (default: nothing).

        The student's weights are not final yet (a resumed or ``init_from`` run
        loads them later): read its shape here (a teacher that follows the
        student declares ``dim=student.embed_dim``), take its weights in
        :meth:`on_step`.
        """

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors that change during training and must survive a resume (default:
        none). Saved in every checkpoint; a resumed run hands them to
        :meth:`load_training_state` before the first :meth:`on_step` call."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` returned (default: nothing to restore)."""
        if state:
            raise CheckpointError(f"teacher {self.name!r} keeps no training state, but the checkpoint holds {sorted(state)[:3]}")

    def on_step(self, student: torch.nn.Module, step: int) -> None:
        """Called by the trainer once before the first batch and after every
        optimizer step (default: nothing).

        A teacher whose targets come from the student itself (an exponential
        moving average of its weights, as in data2vec) makes its copy on the
        first call and updates it on the others. Read ``student``, never
        modify it; it is the bare student (not wrapped by
        DistributedDataParallel or ``torch.compile``), on the training device.
        Not called after a step skipped for a non-finite gradient (the
        weights did not change).

        Args:
            student: the student being trained (a ``MertStudent``).
            step: optimizer steps taken so far: the starting step on the first
                call (0, or where a resumed run continues), then 1, 2, ...
        """

    def advice(self) -> list[str]:
        """Settings to try when the student does not learn this teacher's targets
        (explained variance <= 0, a collapsed head), as ``--set`` values, e.g.
        ``["teacher.cqt.compression=log"]``; the trainer's collapse warning
        shows them. Read your own options: suggest only what is not already set
        (default: none)."""
        return []

    def config_hash(self) -> str:
        """A short hash identifying everything that determines the targets
        (options, fitted state). Offline label stores are keyed by it."""
        import hashlib

        payload = f"{self.name}|{self.sample_rate}|{self.hop_samples}|{self.options.model_dump_json()}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


_FITTING_NAMES = ("FitQuality", "FIT_QUALITY_TOLERANCE", "write_teacher_file")


def __getattr__(name: str):
    """What moved to :mod:`mert_core.fitting` stays importable from here (imported on first use:
    ``fitting`` builds on this module)."""
    if name in _FITTING_NAMES:
        from mert_core import fitting

        return getattr(fitting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
