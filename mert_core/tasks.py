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
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mert_core.errors import TaskDataError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.scoring import score_beats, score_multiclass, score_multilabel, score_regression

Level = Literal["clip", "frame"]
Problem = Literal["multiclass", "multilabel", "regression", "beat"]

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
class ProblemType:
    """What a problem type decides, for the task contract, its checks and the probe.

    Attributes:
        level: ``clip`` (features pooled per clip) or ``frame`` (kept per frame).
        options: the class a task's ``Options`` must subclass (checked when the class is
            defined), or None when any :class:`TaskOptions` do.
        one_output: the probe has one output whatever the labels (a beat activation);
            otherwise one per label.
        clip_targets: ``(labels, num_outputs) -> array``, the clip-level probe targets
            (None: frame targets, :meth:`Task.frame_targets`).
        score_clips: ``(targets, outputs, label_names) -> {metric: value}`` (None: frame level).
        loss: the probe's loss on its raw outputs: ``cross_entropy`` (class indices),
            ``binary_cross_entropy`` (targets in [0, 1]) or ``squared_error``.
        sigmoid_outputs: the probe's outputs go through a sigmoid before scoring.
        standardise_targets: the probe fits standardised targets (every lr sees the same scale).
    """

    level: Level
    options: type[TaskOptions] | None
    one_output: bool
    clip_targets: Callable[[Sequence[Any], int], np.ndarray] | None
    score_clips: Callable[[np.ndarray, np.ndarray, Sequence[str]], dict[str, float]] | None
    loss: Literal["cross_entropy", "binary_cross_entropy", "squared_error"]
    sigmoid_outputs: bool = False
    standardise_targets: bool = False


def _class_indices(labels: Sequence[Any], num_outputs: int) -> np.ndarray:
    return np.asarray([int(label) for label in labels], dtype=np.int64)


def _multi_hot(labels: Sequence[Any], num_outputs: int) -> np.ndarray:
    y = np.zeros((len(labels), num_outputs), dtype=np.float32)
    for i, label in enumerate(labels):
        y[i, list(label)] = 1.0
    return y


def _values(labels: Sequence[Any], num_outputs: int) -> np.ndarray:
    return np.asarray([list(label) for label in labels], dtype=np.float32).reshape(len(labels), num_outputs)


PROBLEMS: dict[str, ProblemType] = {
    "multiclass": ProblemType("clip", None, False, _class_indices, score_multiclass, "cross_entropy"),
    "multilabel": ProblemType("clip", None, False, _multi_hot, score_multilabel, "binary_cross_entropy"),
    "regression": ProblemType("clip", None, False, _values, score_regression, "squared_error", standardise_targets=True),
    "beat": ProblemType("frame", BeatTaskOptions, True, None, None, "binary_cross_entropy", sigmoid_outputs=True),
}
"""Every problem type (the keys of :data:`Problem`) and what it decides: the one table that
``Task``, ``check_task`` and the probe read. A new problem type is a new row."""


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
        base = PROBLEMS[cls.problem].options if cls.problem in PROBLEMS else None
        if base is not None and not issubclass(cls.Options, base):
            raise TypeError(
                f"task {cls.__name__} has problem {cls.problem!r}, so its Options must subclass mert_core.tasks.{base.__name__} "
                f"({', '.join(base.model_fields)}); {cls.Options.__name__} does not"
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
    def problem_type(self) -> ProblemType:
        """This task's row of :data:`PROBLEMS`.

        Raises:
            ValueError: ``problem`` is not a known problem type.
        """
        if self.problem not in PROBLEMS:
            raise ValueError(f"task {self.name!r}: unknown problem type {self.problem!r}; expected one of {', '.join(PROBLEMS)}")
        return PROBLEMS[self.problem]

    @property
    def num_outputs(self) -> int:
        return 1 if self.problem_type.one_output else len(self.labels())

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
        clip_targets = self.problem_type.clip_targets
        if clip_targets is None:
            raise ValueError(f"task {self.name!r}: problem {self.problem!r} has frame targets, not clip targets")
        return clip_targets([ex.label for ex in examples], self.num_outputs)

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
        score_clips = self.problem_type.score_clips
        if score_clips is not None:
            return score_clips(self.targets(examples), outputs, self.labels())
        options: BeatTaskOptions = self.options  # type: ignore[assignment]  # declared by __init_subclass__
        return score_beats(outputs, [ex.label for ex in examples], frame_rate_hz, options.tolerance_seconds, options.postprocess)

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
