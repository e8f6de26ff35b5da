"""Adapters for the MARBLE datasets, read from their official layouts on disk.

Nothing is downloaded: each task takes the folder a user already has (see
``docs/evaluation.md`` for what each folder must hold) and raises a
:class:`~mert_core.tasks.TaskDataError` naming what is missing. Splits follow
MARBLE (Yuan et al. 2023) and the JukeMIR code it adapted:

- GTZAN genre: the fault-filtered split (Kereliuk et al. 2015) from the split
  lists ``train_filtered.txt``, ``valid_filtered.txt``, ``test_filtered.txt``
  that the user supplies (they are not shipped here; see the docs).
- GiantSteps key: train/valid from GiantSteps-MTG-keys (confidence-2,
  single-key tracks) split by a hash of the artist names, collaborators of a
  valid artist moved to valid; test is the GiantSteps key dataset.
- Emomusic: test = the MediaEval 2013 evaluation set; the rest split 8:2 into
  train/valid by a hash of the artist name.
- NSynth: the official train/valid/test folders.
- VocalSet: technique: test singers f2, f8, m3, m5, m10 and the rest split
  60/40 into train/valid by recording; singer: 20 % of recordings test, 40 %
  of the rest valid; both in 3 s segments. MARBLE drew these with an unseeded
  group shuffle after VAD, so the lists here are drawn the same way with a
  fixed seed: same protocol, not byte-identical file lists.
- MagnaTagATune: the 50 most frequent tags; folders 0-b train, c valid, d-f test.
- MTG-Jamendo: the dataset's own ``split-0`` files for each subset.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from pydantic import Field

from mert_core import metrics as M
from mert_core.hookspecs import hookimpl
from mert_core.tasks import Example, Task, TaskDataError, TaskOptions, check_dir, check_file

log = logging.getLogger("mert.evaluation")


def _sha1_int(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


# -- GTZAN ---------------------------------------------------------------------------------

GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")


class GTZANOptions(TaskOptions):
    data_dir: Path | None = Field(None, description="GTZAN root: holds genres/<genre>/<genre>.000NN.wav|.au (or genres_original/, or the genre folders directly).")
    split_dir: Path | None = Field(
        None, description="Folder with train_filtered.txt, valid_filtered.txt, test_filtered.txt (fault-filtered split); default: data_dir.")


class GTZANGenreTask(Task):
    name = "gtzan-genre"
    description = "GTZAN genre (10 classes, fault-filtered split), accuracy."
    Options = GTZANOptions
    problem = "multiclass"
    metrics = ("accuracy",)

    def labels(self):
        return list(GTZAN_GENRES)

    def _audio_root(self, root: Path) -> Path:
        for cand in (root / "genres", root / "genres_original", root / "Data" / "genres_original", root):
            if all((cand / g).is_dir() for g in GTZAN_GENRES):
                return cand
        raise TaskDataError(f"task {self.name!r}: {root} has no genre folders; expected {root}/genres/<genre>/<genre>.000NN.wav "
                            f"for the genres {', '.join(GTZAN_GENRES)}")

    def load_examples(self, split):
        root = check_dir(self.options.data_dir, "the GTZAN folder (genres/<genre>/<genre>.000NN.wav)", self.name)
        audio = self._audio_root(root)
        split_dir = Path(self.options.split_dir).expanduser() if self.options.split_dir else root
        lst = check_file(split_dir / f"{split}_filtered.txt", f"the fault-filtered split list of {split} (one 'genre/genre.000NN.wav' per line)",
                         self.name, hint="get the lists from MARBLE's data/GTZAN folder or jongpillee/music_dataset_split and pass --task-set gtzan-genre.split_dir=FOLDER")
        out = []
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            stem = Path(line).name.rsplit(".", 1)[0] if line.endswith((".wav", ".au")) else Path(line).name
            genre = stem.split(".")[0]
            if genre not in GTZAN_GENRES:
                raise TaskDataError(f"{lst}:{n}: {line!r} does not name a GTZAN file like 'blues/blues.00000.wav'")
            path = next((audio / genre / f"{stem}{ext}" for ext in (".wav", ".au") if (audio / genre / f"{stem}{ext}").exists()),
                        audio / genre / f"{stem}.wav")  # a missing file is skipped and counted at extraction
            out.append(Example(path, GTZAN_GENRES.index(genre)))
        return out


# -- GiantSteps key --------------------------------------------------------------------------

class GiantStepsOptions(TaskOptions):
    data_dir: Path | None = Field(None, description="GiantSteps key dataset (test): audio/<ID>.LOFI.mp3 and annotations/key/<ID>.LOFI.key.")
    mtg_data_dir: Path | None = Field(
        None, description="GiantSteps-MTG-keys dataset (train/valid): audio/<ID>.LOFI.mp3, annotations/annotations.txt and annotations/beatport_metadata.txt.")


class GiantStepsKeyTask(Task):
    name = "giantsteps-key"
    description = "Key detection: train GiantSteps-MTG-keys, test GiantSteps (24 keys), mir_eval weighted score."
    Options = GiantStepsOptions
    problem = "multiclass"
    metrics = ("key_weighted_score", "accuracy")

    def labels(self):
        return list(M.KEY_NAMES)

    def score(self, outputs, examples, frame_rate_hz=None):
        return M.key_scores(outputs, self.targets(examples))

    def load_examples(self, split):
        if split == "test":
            return self._test()
        return [ex for ex, s in self._train_valid() if s == split]

    def _test(self):
        root = check_dir(self.options.data_dir, "the GiantSteps key dataset (audio/, annotations/key/)", self.name)
        keys = check_dir(root / "annotations" / "key", "annotations/key/<ID>.LOFI.key files", self.name, option="data_dir")
        out = []
        for f in sorted(keys.glob("*.LOFI.key"), key=lambda p: int(p.name.split(".")[0])):
            text = f.read_text().strip()
            try:
                label = M.key_index(text)
            except ValueError:
                raise TaskDataError(f"{f}: key {text!r} is not '<tonic> major|minor'") from None
            out.append(Example(root / "audio" / f"{f.name.split('.')[0]}.LOFI.mp3", label))
        return out

    def _train_valid(self):
        root = check_dir(self.options.mtg_data_dir, "the GiantSteps-MTG-keys dataset (audio/, annotations/)", self.name, option="mtg_data_dir")
        ann = check_file(root / "annotations" / "annotations.txt", "a tab-separated file with columns ID, MANUAL KEY, C, ...", self.name)
        meta = check_file(root / "annotations" / "beatport_metadata.txt", "a tab-separated file with columns ID, ARTIST, ...", self.name)
        artists_of = {}
        with open(meta, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if "ID" not in row or "ARTIST" not in row:
                    raise TaskDataError(f"{meta}: expected columns ID and ARTIST, found {list(row)}")
                artists_of[int(row["ID"])] = [a.strip() for a in row["ARTIST"].strip().split(",")]
        # MARBLE/JukeMIR: artist -> split by sha1 of the lower-cased name (100:16),
        # then every collaborator of a valid artist is valid too (two hops).
        ratios = ["train"] * 100 + ["valid"] * 16
        split_of = {a: ratios[_sha1_int(a.lower()) % len(ratios)] for artists in artists_of.values() for a in artists}
        for _ in range(2):
            for artists in artists_of.values():
                if any(split_of[a] == "valid" for a in artists):
                    for a in artists:
                        split_of[a] = "valid"
        out = []
        with open(ann, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if "ID" not in row or "MANUAL KEY" not in row or "C" not in row:
                    raise TaskDataError(f"{ann}: expected columns ID, MANUAL KEY and C, found {list(row)}")
                did = int(row["ID"])
                # Korzeniowski & Widmer 2018 (as MARBLE): confident, single-key tracks only.
                if int(row["C"]) != 2 or "/" in row["MANUAL KEY"] or did not in artists_of:
                    continue
                try:
                    label = M.key_index(row["MANUAL KEY"])
                except ValueError:
                    continue
                split = split_of[artists_of[did][0]]
                out.append((Example(root / "audio" / f"{did}.LOFI.mp3", label), split))
        out.sort(key=lambda e: e[0].path.name)
        return out


# -- NSynth ---------------------------------------------------------------------------------

NSYNTH_FAMILIES = ("bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "synth_lead", "vocal")


class NSynthOptions(TaskOptions):
    data_dir: Path | None = Field(None, description="NSynth root holding nsynth-train/, nsynth-valid/, nsynth-test/ (each examples.json + audio/<note>.wav).")
    max_train_examples: int | None = Field(None, ge=1, description="Use a seeded random subset of this many training notes (None: all 289k).")
    seed: int = Field(0, description="Seed of the training subset.")


class _NSynthTask(Task):
    Options = NSynthOptions
    problem = "multiclass"
    metrics = ("accuracy",)

    def load_examples(self, split):
        root = check_dir(self.options.data_dir, "the NSynth folder (nsynth-train/, nsynth-valid/, nsynth-test/)", self.name)
        meta = check_file(root / f"nsynth-{split}" / "examples.json", f"nsynth-{split}/examples.json from the official nsynth-{split}.jsonwav.tar.gz", self.name)
        try:
            notes = json.loads(meta.read_text())
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{meta}: not valid JSON ({exc}); re-extract the official archive") from None
        names = sorted(notes)
        if split == "train" and self.options.max_train_examples and len(names) > self.options.max_train_examples:
            rng = np.random.default_rng(self.options.seed)
            names = sorted(rng.choice(names, self.options.max_train_examples, replace=False).tolist())
        out = []
        for name in names:
            try:
                label = self.label_of(notes[name])
            except (KeyError, ValueError, TypeError):
                raise TaskDataError(f"{meta}: note {name!r} lacks a valid {self.field!r} field") from None
            out.append(Example(root / f"nsynth-{split}" / "audio" / f"{name}.wav", label))
        return out


class NSynthPitchTask(_NSynthTask):
    name = "nsynth-pitch"
    description = "NSynth pitch (128 MIDI classes), accuracy."
    field = "pitch"

    def labels(self):
        return [f"midi-{m}" for m in range(128)]

    def label_of(self, note):
        p = int(note["pitch"])
        if not 0 <= p < 128:
            raise ValueError(p)
        return p


class NSynthInstrumentTask(_NSynthTask):
    name = "nsynth-instrument"
    description = "NSynth instrument family (11 classes), accuracy."
    field = "instrument_family_str"

    def labels(self):
        return list(NSYNTH_FAMILIES)

    def label_of(self, note):
        return NSYNTH_FAMILIES.index(note["instrument_family_str"])


# -- Emomusic -------------------------------------------------------------------------------

class EmomusicOptions(TaskOptions):
    data_dir: Path | None = Field(
        None, description="Emomusic (MediaEval 2013, 744 songs): clips_45seconds/<song_id>.mp3, songs_info.csv and static_annotations.csv (in data_dir or data_dir/annotations).")


class EmomusicTask(Task):
    name = "emomusic"
    description = "Emomusic arousal and valence regression, r2 (mean of the two; each reported)."
    Options = EmomusicOptions
    problem = "regression"
    metrics = ("r2", "r2_arousal", "r2_valence")

    def labels(self):
        return ["arousal", "valence"]

    def _csv(self, root: Path, stem: str) -> list[dict]:
        for cand in (root / f"{stem}.csv", root / "annotations" / f"{stem}.csv"):
            if cand.is_file():
                with open(cand, newline="", encoding="utf-8-sig") as f:
                    return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
        raise TaskDataError(f"task {self.name!r}: missing {stem}.csv in {root} or {root / 'annotations'}; expected the Emomusic annotation files")

    def load_examples(self, split):
        root = check_dir(self.options.data_dir, "the Emomusic folder (clips_45seconds/, songs_info.csv, static_annotations.csv)", self.name)
        info = self._csv(root, "songs_info")
        static = {int(r["song_id"]): r for r in self._csv(root, "static_annotations")}
        ratios = ["train"] * 8 + ["valid"] * 2
        out = []
        for row in info:
            try:
                sid = int(row["song_id"])
                artist, official = row["Artist"], row["Mediaeval 2013 set"]
            except KeyError as exc:
                raise TaskDataError(f"task {self.name!r}: songs_info.csv lacks column {exc}; expected song_id, Artist, Mediaeval 2013 set") from None
            if sid not in static:
                continue
            if official == "evaluation":
                s = "test"
            else:  # JukeMIR/MARBLE: split by a hash of the normalised artist name
                clean = " ".join("".join(c for c in artist.lower() if ord(c) < 128 and (c.isalpha() or c.isspace())).split())
                s = ratios[_sha1_int(clean) % len(ratios)]
            if s != split:
                continue
            a = static[sid]
            out.append(Example(root / "clips_45seconds" / f"{sid}.mp3", (float(a["mean_arousal"]), float(a["mean_valence"]))))
        return out


# -- VocalSet --------------------------------------------------------------------------------

VOCALSET_TECHNIQUES = ("belt", "breathy", "inhaled", "lip_trill", "spoken", "straight", "trill", "trillo", "vibrato", "vocal_fry")
_VOCALSET_ALL_TECHNIQUES = VOCALSET_TECHNIQUES + ("fast_forte", "fast_piano", "forte", "messa", "pp", "slow_forte", "slow_piano")
VOCALSET_SINGERS = tuple(f"f{i}" for i in range(1, 10)) + tuple(f"m{i}" for i in range(1, 12))
_VOCALSET_TEST_SINGERS = ("f2", "f8", "m3", "m5", "m10")
# Duplicates and files outside the VocalSet paper's Table 2, dropped by MARBLE.
_VOCALSET_DROP = ("f2_scales_vibrato_a(1).wav", "caro_vibrato.wav", "dona_vibrato.wav", "row_vibrato.wav", "slow_vibrato_arps.wav")


class VocalSetOptions(TaskOptions):
    data_dir: Path | None = Field(None, description="VocalSet root holding FULL/<singer>/<context>/<technique>/<file>.wav (e.g. FULL/female1/arpeggios/belt/...).")
    segment_seconds: float = Field(3.0, gt=0, description="Files are cut into segments this long; a shorter remainder is dropped (MARBLE: 3 s).")
    seed: int = Field(0, description="Seed of the group-shuffle split by recording.")


class _VocalSetTask(Task):
    Options = VocalSetOptions
    problem = "multiclass"
    metrics = ("accuracy",)

    def _recordings(self, techniques) -> list[tuple[Path, str, str]]:
        root = check_dir(self.options.data_dir, "the VocalSet folder (FULL/<singer>/<context>/<technique>/*.wav)", self.name)
        full = root / "FULL" if (root / "FULL").is_dir() else root
        recs = []
        for f in sorted(full.glob("*/*/*/*.wav")):
            singer_dir, technique = f.parts[-4], f.parts[-2]
            singer = singer_dir.replace("female", "f").replace("male", "m")
            if technique in techniques and singer in VOCALSET_SINGERS and f.name not in _VOCALSET_DROP:
                recs.append((f, singer, technique))
        if not recs:
            raise TaskDataError(f"task {self.name!r}: no recordings under {full}; expected FULL/<singer>/<context>/<technique>/<file>.wav "
                                f"with singers female1..female9, male1..male11")
        return recs

    def _segments(self, path: Path, label: int) -> list[Example]:
        import soundfile as sf

        try:
            seconds = sf.info(str(path)).duration
        except Exception as exc:  # noqa: BLE001 - an unreadable file is skipped, not fatal
            log.warning("%s: cannot read (%s); skipped", path, exc)
            return []
        seg = self.options.segment_seconds
        return [Example(path, label, k * seg, (k + 1) * seg) for k in range(int(seconds // seg))]

    @staticmethod
    def _group_split(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
        """Boolean mask choosing round(fraction * n) of ``n`` recordings."""
        chosen = np.zeros(n, dtype=bool)
        chosen[rng.permutation(n)[: int(round(fraction * n))]] = True
        return chosen


class VocalSetTechniqueTask(_VocalSetTask):
    name = "vocalset-technique"
    description = "VocalSet singing technique (10 classes; test singers f2, f8, m3, m5, m10), accuracy."

    def labels(self):
        return list(VOCALSET_TECHNIQUES)

    def load_examples(self, split):
        recs = self._recordings(VOCALSET_TECHNIQUES)
        test = np.array([s in _VOCALSET_TEST_SINGERS for _, s, _ in recs])
        rest = np.flatnonzero(~test)
        valid = np.zeros(len(recs), dtype=bool)
        valid[rest] = self._group_split(len(rest), 0.4, np.random.default_rng(self.options.seed))
        want = {"test": test, "valid": valid, "train": ~test & ~valid}[split]
        return [ex for i, (f, _, t) in enumerate(recs) if want[i] for ex in self._segments(f, VOCALSET_TECHNIQUES.index(t))]


class VocalSetSingerTask(_VocalSetTask):
    name = "vocalset-singer"
    description = "VocalSet singer identification (20 singers), accuracy."

    def labels(self):
        return list(VOCALSET_SINGERS)

    def load_examples(self, split):
        recs = self._recordings(_VOCALSET_ALL_TECHNIQUES)
        rng = np.random.default_rng(self.options.seed)
        test = self._group_split(len(recs), 0.2, rng)
        rest = np.flatnonzero(~test)
        valid = np.zeros(len(recs), dtype=bool)
        valid[rest] = self._group_split(len(rest), 0.4, rng)
        want = {"test": test, "valid": valid, "train": ~test & ~valid}[split]
        return [ex for i, (f, s, _) in enumerate(recs) if want[i] for ex in self._segments(f, VOCALSET_SINGERS.index(s))]


# -- MagnaTagATune ----------------------------------------------------------------------------

class MTTOptions(TaskOptions):
    data_dir: Path | None = Field(None, description="MagnaTagATune root: annotations_final.csv and the mp3 folders 0..f (directly or under mp3/).")
    num_tags: int = Field(50, ge=1, le=188, description="Use the most frequent tags (MARBLE: 50).")


class MTTTask(Task):
    name = "mtt-tagging"
    description = "MagnaTagATune top-50 tags (folders 0-b train, c valid, d-f test), ROC-AUC and average precision."
    Options = MTTOptions
    problem = "multilabel"
    metrics = ("roc_auc", "average_precision")

    def _table(self):
        if not hasattr(self, "_cache"):
            root = check_dir(self.options.data_dir, "the MagnaTagATune folder (annotations_final.csv, mp3 folders 0..f)", self.name)
            ann = check_file(root / "annotations_final.csv", "the tab-separated annotations_final.csv (clip_id, 188 tags, mp3_path)", self.name)
            with open(ann, newline="") as f:
                rows = list(csv.reader(f, delimiter="\t"))
            header = [h.strip().strip('"') for h in rows[0]]
            if len(header) < 3 or header[0] != "clip_id" or header[-1] != "mp3_path":
                raise TaskDataError(f"{ann}: expected a tab-separated header 'clip_id <tags...> mp3_path', got {header[:3]}...")
            try:
                body = [(r[-1].strip().strip('"'), np.array([int(v.strip().strip('"')) for v in r[1:-1]])) for r in rows[1:] if r]
            except ValueError as exc:
                raise TaskDataError(f"{ann}: tag columns must be 0/1 ({exc})") from None
            counts = np.sum([b for _, b in body], axis=0)
            top = np.argsort(-counts, kind="stable")[: self.options.num_tags]
            audio = root / "mp3" if (root / "mp3").is_dir() else root
            self._cache = ([header[1:-1][i] for i in top], [(audio / p, tuple(int(j) for j in np.flatnonzero(b[top]))) for p, b in body])
        return self._cache

    def labels(self):
        return self._table()[0]

    def load_examples(self, split):
        out = []
        for path, tags in self._table()[1]:
            folder = int(path.parent.name, 16) if len(path.parent.name) == 1 else -1
            s = "train" if 0 <= folder < 12 else "valid" if folder == 12 else "test" if folder > 12 else None
            if s == split:
                out.append(Example(path, tags))
        return out


# -- MTG-Jamendo ------------------------------------------------------------------------------

class MTGOptions(TaskOptions):
    data_dir: Path | None = Field(None, description="mtg-jamendo-dataset checkout: data/splits/split-<N>/autotagging_<subset>-{train,validation,test}.tsv.")
    audio_dir: Path | None = Field(None, description="Audio folder with <NN>/<track>.mp3 (or .low.mp3); default: data_dir/audio.")
    split: int = Field(0, ge=0, le=4, description="Official split number (MARBLE: 0).")
    low_quality: bool = Field(True, description="Read the .low.mp3 files (the low-quality release MARBLE used).")


class _MTGTask(Task):
    Options = MTGOptions
    problem = "multilabel"
    metrics = ("roc_auc", "average_precision")
    subset = ""

    def _split_file(self, split: str) -> Path:
        root = check_dir(self.options.data_dir, "the mtg-jamendo-dataset checkout (data/splits/...)", self.name)
        official = {"train": "train", "valid": "validation", "test": "test"}[split]
        return check_file(root / "data" / "splits" / f"split-{self.options.split}" / f"autotagging_{self.subset}-{official}.tsv",
                          f"the official MTG-Jamendo split file of {self.subset!r}", self.name,
                          hint="clone the mtg-jamendo-dataset repository and pass its root as data_dir")

    def _rows(self, split: str) -> list[tuple[str, list[str]]]:
        f = self._split_file(split)
        lines = f.read_text().splitlines()
        if not lines or not lines[0].startswith("TRACK_ID"):
            raise TaskDataError(f"{f}: expected a header 'TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION TAGS'")
        out = []
        for n, line in enumerate(lines[1:], 2):
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 6:
                raise TaskDataError(f"{f}:{n}: expected 6+ tab-separated columns, got {len(cols)}")
            out.append((cols[3], [t.strip() for t in cols[5:] if t.strip()]))
        return out

    def labels(self):
        if not hasattr(self, "_labels"):
            self._labels = sorted({t for s in ("train", "valid", "test") for _, tags in self._rows(s) for t in tags})
        return self._labels

    def load_examples(self, split):
        index = {t: i for i, t in enumerate(self.labels())}
        audio = Path(self.options.audio_dir).expanduser() if self.options.audio_dir else Path(self.options.data_dir).expanduser() / "audio"
        out = []
        for rel, tags in self._rows(split):
            if self.options.low_quality:
                rel = rel.replace(".mp3", ".low.mp3")
            out.append(Example(audio / rel, tuple(sorted(index[t] for t in tags))))
        return out


class MTGTop50Task(_MTGTask):
    name = "mtg-top50"
    description = "MTG-Jamendo top-50 tags, ROC-AUC and average precision."
    subset = "top50tags"


class MTGGenreTask(_MTGTask):
    name = "mtg-genre"
    description = "MTG-Jamendo genre tags, ROC-AUC and average precision."
    subset = "genre"


class MTGInstrumentTask(_MTGTask):
    name = "mtg-instrument"
    description = "MTG-Jamendo instrument tags, ROC-AUC and average precision."
    subset = "instrument"


class MTGMoodThemeTask(_MTGTask):
    name = "mtg-moodtheme"
    description = "MTG-Jamendo mood/theme tags, ROC-AUC and average precision."
    subset = "moodtheme"


TASKS = (GTZANGenreTask, GiantStepsKeyTask, NSynthPitchTask, NSynthInstrumentTask, EmomusicTask, VocalSetTechniqueTask,
         VocalSetSingerTask, MTTTask, MTGTop50Task, MTGGenreTask, MTGInstrumentTask, MTGMoodThemeTask)


@hookimpl
def register_tasks(register):
    for task in TASKS:
        register(task)
