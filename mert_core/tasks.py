"""The downstream-task contract: what a task plugin implements.

A task says where its audio and labels are (:meth:`Task.examples`), whether
features are pooled per clip or kept per frame (``level``), what kind of
problem the probe solves (``problem``), and how probe outputs are scored
(:meth:`Task.score`, the first of ``metrics`` being the one that selects the
learning rate and the layer). The extract/probe engine in
:mod:`mert_core.evaluation` does everything else, identically for built-in
and third-party tasks::

    from mert_core.hookspecs import hookimpl
    from mert_core.tasks import Example, Task, TaskOptions

    class MyTask(Task):
        name = "my-genre"
        description = "Genre of my clips (10 classes, accuracy)."
        problem = "multiclass"
        metrics = ("accuracy",)
        ...

    @hookimpl
    def register_tasks(register):
        register(MyTask)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mert_core.errors import TaskDataError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.scoring import score_beats, score_clips

Level = Literal["clip", "frame"]
Problem = Literal["multiclass", "multilabel", "regression", "beat"]

PROBLEM_LEVELS: dict[str, Level] = {"multiclass": "clip", "multilabel": "clip", "regression": "clip", "beat": "frame"}
"""Each problem type and the level a task of that type is probed at (features pooled per clip, or
kept per frame): the one place the pairing is decided (``check_task`` and the probe read it)."""
SPLITS = ("train", "valid", "test")


class TaskOptions(BaseModel):
    """Base class of a task's options. Subclasses describe every field."""

    model_config = ConfigDict(extra="forbid")


class BeatTaskOptions(TaskOptions):
    """Base class of the options of a beat-tracking task (``problem = "beat"``).

    The default :meth:`Task.score` of a beat task reads these two fields; a
    beat task's ``Options`` subclass this one (``class MyOptions(BeatTaskOptions)``,
    listed first when it also extends another options class).
    """

    tolerance_seconds: float = Field(0.07, gt=0, description="Hit window of the beat F-measure (mir_eval default 0.07 s; the MERT thesis quotes 0.02 s).")
    postprocess: Literal["dp", "peaks"] = Field("dp", description="Beat post-processing: librosa dynamic programming (dp) or peak picking.")


@dataclass(frozen=True)
class Example:
    """One labelled item of a split.

    Attributes:
        path: audio file.
        label: multiclass: class index (int); multilabel: tuple of class
            indices; regression: tuple of floats (one per output); beat:
            tuple of beat times in seconds (relative to ``start_seconds``).
        start_seconds: where the item starts in the file (None: at 0).
        end_seconds: where it ends (None: at the end of the file).
    """

    path: Path
    label: Any
    start_seconds: float | None = None
    end_seconds: float | None = None

    @property
    def duration_seconds(self) -> float | None:
        if self.end_seconds is None:
            return None
        return self.end_seconds - (self.start_seconds or 0.0)


class Task:
    """Base class of downstream tasks.

    Subclasses set the class attributes and implement :meth:`labels` and
    :meth:`load_examples`; the defaults of :meth:`targets`, :meth:`frame_targets`
    and :meth:`score` cover the four problem types, and a task overrides
    :meth:`score` when its metric needs more than class indices (key
    detection maps them to key names for the mir_eval weighted score). A
    task with ``problem = "beat"`` declares ``Options`` that subclass
    :class:`BeatTaskOptions` (checked when the class is defined).

    Args:
        options: a validated instance of ``self.Options``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    level: ClassVar[Level] = "clip"
    problem: ClassVar[Problem] = "multiclass"
    metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    """Metric names this task reports; the first selects lr and layer."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.problem == "beat" and not issubclass(cls.Options, BeatTaskOptions):
            raise TypeError(
                f"task {cls.__name__} has problem 'beat', so its Options must subclass mert_core.tasks.BeatTaskOptions "
                f"(tolerance_seconds, postprocess); {cls.Options.__name__} does not"
            )

    def __init__(self, options: TaskOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()
        self._examples: dict[str, list[Example]] = {}

    # -- what a plugin implements ----------------------------------------------

    def labels(self) -> list[str]:
        """Class names (multiclass/multilabel), output names (regression) or ``["beat"]``."""
        raise NotImplementedError

    def load_examples(self, split: str) -> list[Example]:
        """Read the examples of ``split`` (one of :data:`SPLITS`) from disk.

        Raises:
            TaskDataError: the data folder is missing or malformed.
        """
        raise NotImplementedError

    # -- provided --------------------------------------------------------------

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def num_outputs(self) -> int:
        return 1 if self.problem == "beat" else len(self.labels())

    def examples(self, split: str) -> list[Example]:
        """The examples of ``split``, read once and cached on the task."""
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if split not in self._examples:
            items = list(self.load_examples(split))
            if not items:
                raise TaskDataError(f"task {self.name!r}: split {split!r} has no examples; check the task's data folder ({self.data_summary()})")
            self._examples[split] = items
        return self._examples[split]

    def data_summary(self) -> str:
        """A short text naming where the data comes from (for messages)."""
        return ", ".join(f"{k}={v}" for k, v in self.options.model_dump().items()) or "no options"

    def fingerprint(self, split: str) -> str:
        """Hash of everything that decides the *audio* of ``split``'s examples
        (task name, files, segments, order). Feature caches are keyed by it;
        labels are not part of it because features do not depend on them."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{split}|{self.level}".encode())
        for ex in self.examples(split):
            h.update(f"\n{ex.path}|{ex.start_seconds}|{ex.end_seconds}".encode())
        return h.hexdigest()[:16]

    def targets(self, examples: Sequence[Example]) -> np.ndarray:
        """Clip-level probe targets.

        Returns:
            multiclass: ``(N,)`` int64 class indices; multilabel: ``(N, C)``
            float32 multi-hot; regression: ``(N, C)`` float32.
        """
        if self.problem == "multiclass":
            return np.asarray([int(ex.label) for ex in examples], dtype=np.int64)
        if self.problem == "multilabel":
            y = np.zeros((len(examples), self.num_outputs), dtype=np.float32)
            for i, ex in enumerate(examples):
                y[i, list(ex.label)] = 1.0
            return y
        if self.problem == "regression":
            return np.asarray([list(ex.label) for ex in examples], dtype=np.float32).reshape(len(examples), self.num_outputs)
        raise ValueError(f"task {self.name!r}: problem {self.problem!r} has frame targets, not clip targets")

    def frame_targets(self, example: Example, num_frames: int, frame_rate_hz: float, train: bool = False) -> np.ndarray:
        """Frame-level probe targets of one example (beat tracking).

        Beat frames are 1; on the training split the two frames either side
        get 0.95 and 0.5 (MARBLE's widened beat targets), which keeps the
        positives from being a 2 % minority the probe learns to ignore.

        Returns:
            ``(num_frames,)`` float32 in [0, 1].
        """
        y = np.zeros(num_frames, dtype=np.float32)
        idx = np.round(np.asarray(example.label, dtype=np.float64) * frame_rate_hz).astype(np.int64)
        idx = idx[(idx >= 0) & (idx < num_frames)]
        if train:
            for offset, value in ((2, 0.5), (1, 0.95)):
                for side in (-offset, offset):
                    j = idx + side
                    j = j[(j >= 0) & (j < num_frames)]
                    y[j] = np.maximum(y[j], value)
        y[idx] = 1.0
        return y

    def score(self, outputs: np.ndarray | Sequence[np.ndarray], examples: Sequence[Example], frame_rate_hz: float | None = None) -> dict[str, float]:
        """Score probe outputs against the examples' labels.

        Args:
            outputs: clip level: ``(N, C)`` raw probe outputs (logits for
                classification, values for regression); beat: a list of
                ``(T_i,)`` beat activations in [0, 1], one per example.
            examples: the examples the outputs belong to, in order.
            frame_rate_hz: frame rate of frame-level outputs.

        Returns:
            ``{metric name: value}`` holding at least every name in ``metrics``.
        """
        if self.problem in ("multiclass", "multilabel", "regression"):
            names = self.labels() if self.problem == "regression" else ()  # r2 per named output
            return score_clips(self.problem, self.targets(examples), outputs, names)
        if self.problem == "beat":
            options: BeatTaskOptions = self.options  # type: ignore[assignment]  # declared by __init_subclass__
            return score_beats(outputs, [ex.label for ex in examples], frame_rate_hz, options.tolerance_seconds, options.postprocess)
        raise ValueError(f"task {self.name!r}: unknown problem type {self.problem!r}")

    def describe(self) -> dict[str, Any]:
        """Plain data describing the task (saved with results)."""
        return {
            "name": self.name,
            "level": self.level,
            "problem": self.problem,
            "metrics": list(self.metrics),
            "num_outputs": self.num_outputs,
            "options": json.loads(self.options.model_dump_json()),
        }


def check_dir(path: Path | None, what: str, task: str, option: str = "data_dir", hint: str = "") -> Path:
    """Return ``path`` if it is an existing folder, else raise a TaskDataError
    naming the option, the path and what was expected there."""
    if path is None:
        raise TaskDataError(f"task {task!r}: option {option!r} is required ({what}); pass it with --task-set {task}.{option}=PATH")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise TaskDataError(f"task {task!r}: {option}={path} is not a folder; expected {what}{'. ' + hint if hint else ''}")
    return path


def check_file(path: Path, what: str, task: str, hint: str = "") -> Path:
    """Return ``path`` if it is an existing file, else raise a TaskDataError."""
    if not Path(path).is_file():
        raise TaskDataError(f"task {task!r}: missing {path}; expected {what}{'. ' + hint if hint else ''}")
    return Path(path)
