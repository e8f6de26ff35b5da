"""Demo tasks on the built-in synthetic data (``mert_core.demo``).

``demo-key`` (24 keys, mir_eval weighted score), ``demo-pitch`` (MIDI pitch,
accuracy), ``demo-timbre`` (timbre family, accuracy) and ``demo-beat``
(frame-wise beat activation + beat tracking, mir_eval F-measure). They are
written exactly like a third-party task plugin would be.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from mert_core import metrics as M
from mert_core.hookspecs import hookimpl
from mert_core.tasks import BeatTaskOptions, Example, Task, TaskDataError, TaskOptions


class DemoOptions(TaskOptions):
    data_dir: Path | None = Field(
        None, description="Folder with metadata.jsonl in the demo schema; None generates/reuses the built-in demo set ($MERT_CACHE/demo-v1).")


class _DemoTask(Task):
    Options = DemoOptions
    kind = "piece"

    def root(self) -> Path:
        from mert_core.demo import ensure_demo_data

        if self.options.data_dir is None:
            return ensure_demo_data()
        root = Path(self.options.data_dir).expanduser()
        if not (root / "metadata.jsonl").is_file():
            raise TaskDataError(f"task {self.name!r}: data_dir={root} has no metadata.jsonl; expected a folder made by "
                                f"mert_core.demo.ensure_demo_data() (or the same schema, see docs/data.md)")
        return root

    def records(self, split: str | None = None) -> list[dict]:
        from mert_core.demo import load_demo_metadata

        if not hasattr(self, "_records"):
            self._root = self.root()
            self._records = load_demo_metadata(self._root, kind=self.kind)
        return [r for r in self._records if split is None or r["split"] == split]

    def load_examples(self, split):
        return [Example(self._root / r["path"], self.label_of(r)) for r in self.records(split)]

    def label_of(self, record: dict):
        raise NotImplementedError


class DemoKeyTask(_DemoTask):
    name = "demo-key"
    description = "Key of the demo pieces: 24 major/minor keys, mir_eval weighted score."
    problem = "multiclass"
    metrics = ("key_weighted_score", "accuracy")

    def labels(self):
        return list(M.KEY_NAMES)

    def label_of(self, record):
        return M.key_index(record["key"])

    def score(self, outputs, examples, frame_rate_hz=None):
        return M.key_scores(outputs, self.targets(examples))


class DemoPitchTask(_DemoTask):
    name = "demo-pitch"
    description = "MIDI pitch of the demo notes: 128 classes as NSynth, accuracy."
    kind = "note"

    def labels(self):
        return [f"midi-{m}" for m in range(128)]

    def label_of(self, record):
        return int(record["pitch"])


class DemoTimbreTask(_DemoTask):
    name = "demo-timbre"
    description = "Timbre family of the demo notes (flute, string, reed, pluck, bell, organ), accuracy."
    kind = "note"

    def labels(self):
        return sorted({r["timbre"] for r in self.records()})

    def label_of(self, record):
        return self.labels().index(record["timbre"])


class DemoBeatOptions(BeatTaskOptions, DemoOptions):
    """The demo's data folder and the beat scoring options (in this order)."""


class DemoBeatTask(_DemoTask):
    name = "demo-beat"
    description = "Beats of the demo pieces: frame-wise probe at 75 Hz + beat tracking, mir_eval F-measure."
    Options = DemoBeatOptions
    level = "frame"
    problem = "beat"
    metrics = ("beat_f_measure",)

    def labels(self):
        return ["beat"]

    def label_of(self, record):
        return tuple(float(t) for t in record["beats"])


@hookimpl
def register_tasks(register):
    for task in (DemoKeyTask, DemoPitchTask, DemoTimbreTask, DemoBeatTask):
        register(task)
