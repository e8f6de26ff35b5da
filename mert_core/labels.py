"""Offline teacher labels: fit a teacher once, label a dataset once, train many times.

The label store is generic over discrete teachers (k-means, EnCodec, ...).

**The rule that makes offline labels equal online ones.** Labels are made per
*window* of ``window_samples`` (the training crop: 120000 = 5 s at 24 kHz) on a
grid starting at sample 0 of the file at the student's rate: window ``k``
covers samples ``[k * W, (k + 1) * W)``, read with
:func:`mert_core.audio.read_crop` exactly as the trainer reads a crop. The
last, partial window is labelled from what remains if it holds at least
``min_samples``. A trainer that uses a store takes crops on that grid
(``CropBatches(align_crops=True)``), so each crop is one window and the store
returns ``teacher.targets(crop)``, frame for frame.

Layout of a store folder::

    labels.bin   uint16 (uint32 if a codebook has > 65536 classes), shape
                 (total_frames, num_codebooks), row-major, memory-mapped;
                 files in index order, each file's windows in order
    index.json   teacher name, options and config hash, window/sample/hop
                 sizes, and per file: absolute path, size, mtime_ns,
                 num_samples and per window [frame_offset, num_frames];
                 the content hash of labels.bin and a hash of the index itself

:meth:`LabelStore.open` verifies a store before any training step: the window
counts and frame offsets of every file against its length, both hashes (one
streamed read of ``labels.bin``), and that every label is a class of the
teacher. An edited, truncated or swapped file is refused naming the store.

The Python API behind ``mert teacher fit`` and ``mert teacher label`` lives here
too: :func:`fit_teacher` and :func:`label_data`. Under torchrun, labelling is
sharded: each rank labels a consecutive run of the files (:func:`shard_ranges`)
and rank 0 concatenates the parts (:func:`merge_label_parts`) into the store one
process would write.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from mert_core import distributed, library_versions
from mert_core.audio import AudioError, read_crop
from mert_core.checkpoint import file_digest
from mert_core.distributed import DistInfo
from mert_core.errors import LabelStoreError, LabelStoreMismatch, MissingTeacherFile  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.fitting import fit_teacher, with_teacher_file  # noqa: F401 - fit_teacher: re-exported, it lived here
from mert_core.geometry import TARGET_GRID, FrameGeometry, frames_for
from mert_core.files import atomic_write, publish_folder
from mert_core.paths import resolve_device
from mert_core.registry import Registry
from mert_core.teacher import IGNORE_LABEL, Teacher

log = logging.getLogger("mert.labels")

FORMAT = "mert-label-store"
FORMAT_VERSION = 2  # 2: index.json holds labels_sha256 and index_sha256
LABELS_FILE = "labels.bin"
INDEX_FILE = "index.json"
DEFAULT_WINDOW_SAMPLES = 120000  # the MERT paper's 5 s crops at 24 kHz
LABEL_WAIT_TIMEOUT = timedelta(hours=6)  # longest a rank waits for the others under torchrun


def student_frames(num_samples: int) -> int:
    """Frames of the target grid (:data:`~mert_core.geometry.TARGET_GRID`) in ``num_samples`` samples: the grid of every stored label."""
    return TARGET_GRID.num_frames(num_samples)


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned type that holds every class: uint16 up to 65536 classes, else uint32."""
    return np.dtype(np.uint16) if num_classes <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class LabelStoreSummary:
    """What :func:`write_label_store` wrote."""

    out_dir: Path
    num_files: int
    num_windows: int
    num_frames: int
    num_codebooks: int
    dtype: str
    labels_bytes: int
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def bytes_per_frame_per_codebook(self) -> float:
        return self.labels_bytes / max(self.num_frames * self.num_codebooks, 1)

# -- writing ----------------------------------------------------------------------


def _windows_of(num_samples: int, window_samples: int, min_samples: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of every labelled window of a file."""
    out = []
    for start in range(0, num_samples, window_samples):
        length = min(window_samples, num_samples - start)
        if length >= min_samples:
            out.append((start, length))
    return out


class _FileWindows(torch.utils.data.Dataset):
    """Item ``i``: every window of file ``i`` as float32 arrays, or why it failed."""

    def __init__(self, files: list[tuple[str, list[tuple[int, int]]]], sample_rate: int):
        self.files = files
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, list[np.ndarray] | None, str | None]:
        path, windows = self.files[i]
        out = []
        try:
            for start, length in windows:
                wave = read_crop(path, self.sample_rate, start, length)
                if len(wave) != length:
                    raise AudioError(f"{path}: window at sample {start} gave {len(wave)} samples, expected {length} (file shorter than its header says)")
                out.append(wave)
        except AudioError as exc:
            return i, None, str(exc)
        return i, out, None


def _as_is(item):
    return item  # DataLoader collate: keep the numpy windows as they are


def write_label_store(
    teacher: Teacher,
    files: Iterable[str | Path],
    out_dir: str | Path,
    window_samples: int = DEFAULT_WINDOW_SAMPLES,
    sample_rate: int = 24000,
    batch_size: int = 16,
    min_samples: int = TARGET_GRID.receptive_field,
    progress: bool = True,
    overwrite: bool = False,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
) -> LabelStoreSummary:
    """Label every window of every file with ``teacher`` into one store folder.

    Args:
        teacher: a fitted discrete teacher, already on the device to use.
        files: audio files, folders or manifests (anything
            :func:`mert_core.data.scan_audio` reads).
        out_dir: the store folder to create (atomically: written under a
            temporary name, then renamed).
        window_samples: window = training crop length (120000: 5 s, as in the MERT paper).
        sample_rate: the student's rate.
        batch_size: full windows per teacher call.
        min_samples: a file's last, partial window is labelled if it holds at
            least this many samples (at least 400, one student frame).
        progress: show a progress bar.
        overwrite: replace an existing store at ``out_dir``.
        num_workers: processes decoding audio (0: decode in this process).
        dist_info: under torchrun (an initialised process group, ``world_size > 1``),
            every rank calls this with its own :class:`~mert_core.distributed.DistInfo`:
            each labels its share of the files (:func:`shard_ranges`) and rank 0
            merges the shares into the store a single process writes. ``out_dir``
            must be on a filesystem every rank sees.

    Returns:
        a :class:`LabelStoreSummary` (on every rank); unreadable files are skipped and listed.

    Raises:
        LabelStoreError: the teacher is continuous or not fitted, the folder
            exists, the teacher gives a frame count that does not match the
            audio (naming the file and both counts), or another rank failed.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    min_samples = _check_request(teacher, out_dir, window_samples, min_samples, overwrite)
    labelling = dict(sample_rate=sample_rate, window_samples=window_samples, batch_size=batch_size, num_workers=num_workers,
                     min_samples=min_samples)
    if dist_info is not None and dist_info.enabled:
        return _write_sharded(teacher, list(files), out_dir, dist_info, labelling, progress, started)
    source = _plan_source(list(files), labelling, progress)
    tmp_dir = _fresh_tmp_dir(out_dir)
    try:
        part = source.label(teacher, source.units, tmp_dir, progress=progress, **labelling)
        return _publish_store(teacher, part, source, tmp_dir, out_dir, labelling, started)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


def _check_request(teacher: Teacher, out_dir: Path, window_samples: int, min_samples: int, overwrite: bool) -> int:
    """Refuse what cannot make a store (before any work); returns the effective ``min_samples``."""
    spec = teacher.target_spec()
    if spec.kind != "discrete":
        raise LabelStoreError(f"teacher {teacher.name!r} makes continuous targets; a label store holds discrete labels only (compute {teacher.name!r} online)")
    if teacher.needs_fit():
        raise LabelStoreError(f"teacher {teacher.name!r} is not fitted; pass its teacher file (`mert teacher fit {teacher.name} ...` makes one)")
    if out_dir.exists() and not overwrite:
        raise LabelStoreError(f"{out_dir}: already exists; pass overwrite=True (--overwrite) to replace it, or choose another folder")
    if window_samples < TARGET_GRID.receptive_field:
        raise LabelStoreError(f"window_samples must be >= {TARGET_GRID.receptive_field} (one frame of the target grid), got {window_samples}")
    return max(min_samples, TARGET_GRID.receptive_field)


Plan = list[tuple[str, list[tuple[int, int]]]]  # per file: path, (offset, length) of each window


@dataclass
class _Source:
    """What a store labels, split into units ranks share: planned files, or shards.

    ``units``: the plan (files with their windows) or the shard URLs; ``weights``:
    the work in each unit (windows, members) to split ranks evenly; ``skipped``:
    inputs known unusable before labelling; ``index_fields``: what index.json adds;
    ``label``: labels a run of units into a part folder.
    """

    units: list
    weights: list[int]
    skipped: dict[str, str]
    index_fields: dict[str, Any]
    label: Callable[..., "_Part"]


def _plan_source(files: list, labelling: dict[str, int], progress: bool) -> _Source:
    """Scan files (their windows planned now), or list shards (members are met as they stream)."""
    from mert_core.shards import is_shard_source, open_corpus

    shards = [f for f in files if is_shard_source(f)]
    if shards and len(shards) != len(files):
        raise LabelStoreError("label store inputs mix shards with folders or manifests; label one kind into a store")
    if shards:
        corpus = open_corpus(shards)
        return _Source(corpus.urls, corpus.members or [1] * len(corpus.urls), {},
                       {"source": "shards", "shards": corpus.names}, _label_shards_part)
    plan, skipped = _plan_windows(files, labelling["sample_rate"], labelling["window_samples"], labelling["min_samples"], progress)
    return _Source(plan, [len(windows) for _, windows in plan], skipped, {"source": "files"}, _label_part)


def _plan_windows(files: list, sample_rate: int, window_samples: int, min_samples: int, progress: bool) -> tuple[Plan, dict[str, str]]:
    """Scan the audio: the windows of every usable file, in scan order, and the files skipped (with why)."""
    from mert_core.data import scan_audio

    manifest = scan_audio(files, progress=progress)
    skipped: dict[str, str] = dict(manifest.skipped)
    plan = []
    for f in manifest.files:
        windows = _windows_of(f.num_samples(sample_rate), window_samples, min_samples)
        if windows:
            plan.append((f.path, windows))
        else:
            skipped[f.path] = f"shorter than {min_samples} samples at {sample_rate} Hz: nothing to label"
    return plan, skipped


def _fresh_tmp_dir(out_dir: Path) -> Path:
    """An empty folder beside ``out_dir`` to write the store in before it is published."""
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    return tmp_dir


@dataclass
class _Part:
    """The labels of a run of planned files, in ``folder/labels.bin`` in plan order.

    ``entries`` are index.json entries whose frame offsets count from the part's
    first frame; ``skipped``: files found unreadable while labelling.
    """

    entries: list[dict[str, Any]]
    total_frames: int
    total_windows: int
    skipped: dict[str, str]

    FILE: ClassVar[str] = "part.json"

    def save(self, folder: Path) -> None:
        atomic_write(folder / self.FILE, lambda tmp: tmp.write_text(json.dumps(asdict(self))))

    @classmethod
    def load(cls, folder: Path) -> "_Part":
        return cls(**json.loads((folder / cls.FILE).read_text()))


def _label_part(teacher: Teacher, plan: Plan, folder: Path, sample_rate: int, window_samples: int, batch_size: int,
                num_workers: int, min_samples: int, progress: bool) -> _Part:
    """Label the windows of ``plan`` into ``folder/labels.bin`` (``folder`` is created if missing)."""
    reader = torch.utils.data.DataLoader(
        _FileWindows(plan, sample_rate), batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_as_is,
    )
    skipped: dict[str, str] = {}
    total = sum(len(w) for _, w in plan)
    return _write_part(teacher, plan, reader, total, folder, window_samples, batch_size, skipped, _file_identity, progress)


def _label_shards_part(teacher: Teacher, urls: list[str], folder: Path, sample_rate: int, window_samples: int, batch_size: int,
                       num_workers: int, min_samples: int, progress: bool) -> _Part:
    """Label every member of the shards ``urls``, in shard order, into ``folder/labels.bin``.

    Each member is decoded whole (:func:`mert_core.audio.decode_audio`, as the
    trainer's shard stream decodes it) and cut into windows on the grid
    ``k * window_samples``; an entry is keyed ``<shard file name>#<member key>``.
    Members that cannot be read or decoded, and shards that cannot be fetched
    after retries, are skipped and listed.
    """
    from mert_core.audio import decode_audio
    from mert_core.shards import audio_members, stored_member_name

    plan: Plan = []  # grows as members are read: the writer reads it by index
    skipped: dict[str, str] = {}
    sizes: dict[str, int] = {}

    def members():
        for url in urls:
            for item, ext, data in audio_members(url, skipped):
                try:
                    audio = decode_audio(data, f"{item.id}.{ext}", sample_rate)
                except AudioError as exc:
                    skipped[item.id] = str(exc)
                    continue
                windows = _windows_of(len(audio), window_samples, min_samples)
                if not windows:
                    skipped[item.id] = f"shorter than {min_samples} samples at {sample_rate} Hz: nothing to label"
                    continue
                name = stored_member_name(item.id)
                plan.append((name, windows))
                sizes[name] = len(data)
                yield len(plan) - 1, [audio[start : start + length] for start, length in windows], None

    return _write_part(teacher, plan, members(), None, folder, window_samples, batch_size, skipped,
                       lambda name: {"size": sizes[name], "mtime_ns": 0}, progress)


def _write_part(teacher: Teacher, plan: Plan, items, total_windows: int | None, folder: Path, window_samples: int, batch_size: int,
                skipped: dict[str, str], identity: Callable[[str], dict[str, int]], progress: bool) -> _Part:
    """Label ``items`` (``(plan index, windows or None, error)``) into ``folder/labels.bin`` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    device = next((t.device for t in itertools.chain(teacher.buffers(), teacher.parameters())), torch.device("cpu"))
    with open(folder / LABELS_FILE, "wb") as labels_out:
        writer = _LabelWriter(teacher, plan, labels_out, device, identity)
        _label_windows(writer, items, total_windows, window_samples, batch_size, skipped, progress)
        labels_out.flush()
        os.fsync(labels_out.fileno())
    return _Part(writer.entries, writer.total_frames, writer.total_windows, skipped)


def _file_identity(path: str) -> dict[str, int]:
    """What a store records to notice a changed file."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def merge_label_parts(part_dirs: list[Path], out_dir: Path) -> _Part:
    """Concatenate parts labelled from consecutive runs of one plan into ``out_dir/labels.bin``.

    The result is what :func:`_label_part` writes for the whole plan: the same
    bytes, entries and skipped files, in the same order. The part folders are
    removed once the merged file is on disk.
    """
    entries: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    total_frames = total_windows = 0
    with open(out_dir / LABELS_FILE, "wb") as labels_out:
        for folder in part_dirs:
            part = _Part.load(folder)
            with open(folder / LABELS_FILE, "rb") as labels_in:
                shutil.copyfileobj(labels_in, labels_out, 1 << 24)
            entries += [{**e, "windows": [[total_frames + first, n] for first, n in e["windows"]]} for e in part.entries]
            total_frames += part.total_frames
            total_windows += part.total_windows
            skipped.update(part.skipped)
        labels_out.flush()
        os.fsync(labels_out.fileno())
    for folder in part_dirs:
        shutil.rmtree(folder)
    return _Part(entries, total_frames, total_windows, skipped)


def shard_ranges(window_counts: list[int], world_size: int) -> list[range]:
    """Split files into ``world_size`` consecutive runs holding about equal numbers of windows.

    Consecutive runs let rank 0 merge the parts by concatenation. Each run's
    window count is within the largest file's count of an equal share.

    Args:
        window_counts: windows of each file, in plan order.
        world_size: ranks.

    Returns:
        one ``range`` of file indices per rank; together they cover every file once, in order.
    """
    ends = np.cumsum([0, *window_counts])  # ends[i]: windows of files before i
    targets = ends[-1] * np.arange(world_size + 1) / world_size
    after = np.searchsorted(ends, targets, side="left").clip(1, len(ends) - 1)
    # the file boundary nearest to each equal share
    cuts = np.where(targets - ends[after - 1] <= ends[after] - targets, after - 1, after)
    cuts[0], cuts[-1] = 0, len(window_counts)
    cuts = np.maximum.accumulate(cuts)
    return [range(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def _publish_store(teacher: Teacher, part: _Part, source: _Source, tmp_dir: Path, out_dir: Path, labelling: dict[str, int],
                   started: float) -> LabelStoreSummary:
    """Write index.json beside ``tmp_dir/labels.bin`` and rename ``tmp_dir`` to ``out_dir``."""
    skipped = {**source.skipped, **part.skipped}
    min_samples, sample_rate, window_samples = labelling["min_samples"], labelling["sample_rate"], labelling["window_samples"]
    spec = teacher.target_spec()
    dtype, C, hop = label_dtype(spec.num_classes), spec.num_codebooks, teacher.hop_samples
    index = {
        "labels_sha256": file_digest(tmp_dir / LABELS_FILE),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": teacher.name,
        "options": teacher.options.model_dump(mode="json"),
        "config_hash": teacher.config_hash(),
        "window_samples": window_samples,
        "min_samples": min_samples,
        "sample_rate": sample_rate,
        "hop_samples": hop,
        "frame_rate_hz": sample_rate / hop,
        "num_codebooks": C,
        "num_classes": spec.num_classes,
        "dtype": dtype.name,
        "total_frames": part.total_frames,
        **source.index_fields,
        "files": part.entries,
        "skipped": skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions("torch", "torchaudio", "numpy"),
    }
    index["index_sha256"] = _index_digest(index)
    with open(tmp_dir / INDEX_FILE, "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    if not publish_folder(tmp_dir, out_dir):
        raise LabelStoreError(f"{out_dir}: another process wrote a store there meanwhile; label again into another folder")
    summary = LabelStoreSummary(
        out_dir=out_dir,
        num_files=len(part.entries),
        num_windows=part.total_windows,
        num_frames=part.total_frames,
        num_codebooks=C,
        dtype=dtype.name,
        labels_bytes=part.total_frames * C * dtype.itemsize,
        seconds=time.perf_counter() - started,
        skipped=skipped,
    )
    log.info(
        "label store %s: %d files, %d windows, %d frames x %d codebooks (%s), %d files skipped, %.1f s",
        out_dir, summary.num_files, summary.num_windows, summary.num_frames, C, dtype.name, len(skipped), summary.seconds,
    )
    return summary


# -- sharded labelling under torchrun -------------------------------------------------


def _write_sharded(teacher: Teacher, files: list, out_dir: Path, info: DistInfo, labelling: dict[str, int],
                   progress: bool, started: float) -> LabelStoreSummary:
    """:func:`write_label_store` on every rank of a torchrun launch.

    Rank 0 plans the source once (scans the audio, or lists the shards) and
    hands every rank the plan; each rank labels its consecutive run of files
    (or shards) into ``part-RANK`` of one temporary folder; once all are done,
    rank 0 merges the parts and publishes the store. If any rank fails, every
    rank raises naming it and nothing is published.
    """
    progress = progress and info.is_main

    def plan_on_rank0():
        return _plan_source(files, labelling, progress), _fresh_tmp_dir(out_dir)

    source, tmp_dir = _from_rank0(plan_on_rank0, info, "planning the labelling")
    try:
        share = shard_ranges(source.weights, info.world_size)[info.rank]
        failure = None
        try:
            part_dir = tmp_dir / f"part-{info.rank:05d}"
            source.label(teacher, source.units[share.start : share.stop], part_dir, progress=progress, **labelling).save(part_dir)
        except Exception as exc:  # every rank must reach the gather below, or the others wait forever
            failure = exc
        failures = _gather(None if failure is None else f"{type(failure).__name__}: {failure}", info)
        failed = [(rank, why) for rank, why in enumerate(failures) if why is not None]
        if failed:
            # clean up before any rank exits: torchrun ends the others (SIGTERM, no `finally`) when one exits with an error
            if info.is_main:
                shutil.rmtree(tmp_dir)
            distributed.barrier(info)
            rank, why = failed[0]
            raise LabelStoreError(
                f"sharded labelling into {out_dir} failed on {len(failed)} of {info.world_size} ranks, "
                f"first rank {rank}: {why}; no store was written"
            ) from failure

        def merge_on_rank0():
            try:
                part = merge_label_parts([tmp_dir / f"part-{r:05d}" for r in range(info.world_size)], tmp_dir)
                return _publish_store(teacher, part, source, tmp_dir, out_dir, labelling, started)
            finally:  # before the other ranks hear the outcome (see above)
                if tmp_dir.exists():
                    shutil.rmtree(tmp_dir)

        return _from_rank0(merge_on_rank0, info, "merging the parts")
    finally:
        if info.is_main and tmp_dir.exists():
            shutil.rmtree(tmp_dir)


def _from_rank0(make, info: DistInfo, what: str):
    """``make()`` run on rank 0, its result on every rank. If it raises, rank 0
    raises that error and the other ranks a :class:`LabelStoreError` naming it."""
    import torch.distributed as dist

    result, error = None, None
    if info.is_main:
        try:
            result = make()
        except Exception as exc:
            error = exc
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    result, why = box[0]
    if why is not None:
        raise LabelStoreError(f"rank 0 failed {what}: {why}; no store was written")
    return result


def _gather(value, info: DistInfo) -> list:
    """``value`` of every rank, in rank order, on every rank."""
    import torch.distributed as dist

    out = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


class _LabelWriter:
    """Labels windows with the teacher and appends each file's labels to
    ``labels_out`` in plan order, as soon as it and every file before it are done.

    State: ``entries`` (index.json entries, in plan order), ``total_frames``,
    ``total_windows``; labelled windows of files not yet written wait in
    ``results`` (a bounded number: fewer than a batch of windows is pending).
    """

    def __init__(self, teacher: Teacher, plan: Plan, labels_out, device: torch.device, identity: Callable[[str], dict[str, int]]):
        self.teacher, self.plan, self.labels_out, self.device, self.identity = teacher, plan, labels_out, device, identity
        self.spec = teacher.target_spec()
        self.dtype = label_dtype(self.spec.num_classes)
        self.results: dict[int, dict[int, np.ndarray]] = {}
        self.skipped: set[int] = set()
        self.entries: list[dict[str, Any]] = []
        self.next_file = 0  # the first file not written yet
        self.total_frames, self.total_windows = 0, 0

    def label(self, items: list[tuple[int, int, np.ndarray]]) -> None:
        """Label ``(file index, window index, wave)`` windows of one length in one teacher call."""
        teacher, C = self.teacher, self.spec.num_codebooks
        wave = torch.from_numpy(np.stack([w for _, _, w in items])).to(self.device)
        with torch.no_grad():
            labels = teacher.store_targets(wave)  # B, T, C
        want = self.teacher.geometry.num_frames(wave.shape[1])
        for b, (fi, k, _) in enumerate(items):
            path = self.plan[fi][0]
            if labels.dim() != 3 or labels.shape[2] != C or labels.shape[1] not in (want, want + 1):
                raise LabelStoreError(
                    f"{path}: teacher {teacher.name!r} gave labels of shape {tuple(labels.shape[1:])} for window {k} "
                    f"({wave.shape[1]} samples), expected ({want} or {want + 1}, {C}) frames x codebooks; the teacher is broken"
                )
            lab = labels[b]
            if bool(((lab < 0) | (lab >= self.spec.num_classes)).any()):
                raise LabelStoreError(
                    f"{path}: teacher {teacher.name!r} gave labels outside 0..{self.spec.num_classes - 1} "
                    f"(min {int(lab.min())}, max {int(lab.max())}) in window {k}; a store holds only real classes"
                )
            self.results.setdefault(fi, {})[k] = lab.cpu().numpy().astype(self.dtype)

    def skip(self, fi: int) -> None:
        """File ``fi`` could not be read: write the files after it without it."""
        self.skipped.add(fi)

    def write_finished(self) -> None:
        """Append, in plan order, the labels of every file whose windows are all labelled."""
        while self.next_file < len(self.plan):
            fi = self.next_file
            path, windows = self.plan[fi]
            if fi not in self.skipped:
                if len(self.results.get(fi, ())) < len(windows):
                    return
                got = self.results.pop(fi)
                rows = []
                for k in range(len(windows)):
                    lab = np.ascontiguousarray(got[k])
                    self.labels_out.write(lab.tobytes())
                    rows.append([self.total_frames, int(lab.shape[0])])
                    self.total_frames += int(lab.shape[0])
                self.total_windows += len(windows)
                num_samples = windows[-1][0] + windows[-1][1]
                self.entries.append({"path": path, **self.identity(path), "num_samples": num_samples, "windows": rows})
            self.next_file += 1


def _label_windows(writer: _LabelWriter, items, total_windows: int | None, window_samples: int, batch_size: int,
                   skipped: dict[str, str], progress: bool) -> None:
    """Label the windows of ``items`` (``(plan index, windows, None)``, or ``(plan index,
    None, error)`` for an unreadable file): full windows in batches of
    ``batch_size``, a last, partial one on its own. Unreadable files go to ``skipped``."""
    plan = writer.plan
    pending: list[tuple[int, int, np.ndarray]] = []  # (file index, window index, wave) of full windows
    bar = tqdm(total=total_windows, desc=f"labelling with {writer.teacher.name}", unit="window", disable=not progress)
    for fi, waves, error in items:
        if error is not None:
            skipped[plan[fi][0]] = error
            writer.skip(fi)
            log.warning("skipping %s", error)
            bar.update(len(plan[fi][1]))
            continue
        for k, wave in enumerate(waves):
            if len(wave) == window_samples:
                pending.append((fi, k, wave))
            else:  # the last, partial window: labelled on its own, at its own length
                writer.label([(fi, k, wave)])
                bar.update(1)
        while len(pending) >= batch_size:
            writer.label(pending[:batch_size])
            bar.update(batch_size)
            pending = pending[batch_size:]
        writer.write_finished()
    if pending:
        writer.label(pending)
        bar.update(len(pending))
    writer.write_finished()
    bar.close()
    assert writer.next_file == len(plan), f"{len(plan) - writer.next_file} files labelled but never written"


def _index_digest(index: dict[str, Any]) -> str:
    """Hash of the index's content, without its own hash field."""
    import hashlib

    rest = {k: v for k, v in index.items() if k != "index_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:16]


# -- reading ------------------------------------------------------------------------


def _check_windows(index: dict[str, Any]) -> str | None:
    """Every file's window count, frame counts and offsets against its length, or what is wrong.

    Vectorised over all windows: a 1000-hour store has ~700k of them.
    """
    W, hop = int(index["window_samples"]), int(index["hop_samples"])
    min_samples = index.get("min_samples", TARGET_GRID.receptive_field)
    files = index["files"]
    for entry in files:
        full, rest = divmod(int(entry["num_samples"]), W)
        expected = full + (rest >= min_samples)  # what _windows_of makes
        if len(entry["windows"]) != expected:
            return f"{entry['path']}: {len(entry['windows'])} windows listed, its {entry['num_samples']} samples make {expected}"
    per_file = np.array([len(e["windows"]) for e in files], dtype=np.int64)
    rows = np.array([w for e in files for w in e["windows"]], dtype=np.int64).reshape(-1, 2)  # M, (first frame, frames)
    file_of = np.repeat(np.arange(len(files)), per_file)
    k = np.arange(len(rows)) - np.repeat(np.cumsum(per_file) - per_file, per_file)  # window number within its file
    lengths = np.minimum(W, np.array([e["num_samples"] for e in files], dtype=np.int64)[file_of] - k * W)
    frames = frames_for(lengths, hop, TARGET_GRID.receptive_field)
    bad = np.flatnonzero((rows[:, 1] != frames) & (rows[:, 1] != frames + 1))  # +1: a teacher may give one frame more
    if len(bad):
        i = bad[0]
        return (f"{files[file_of[i]]['path']}: window {k[i]} of the label store holds {rows[i, 1]} frames, "
                f"but its {lengths[i]} samples give {frames[i]} student frames")
    order = np.argsort(rows[:, 0], kind="stable")  # together the windows must tile labels.bin exactly
    ends = np.cumsum(rows[order, 1])
    gap = np.flatnonzero(rows[order, 0] != ends - rows[order, 1])
    if len(gap):
        i = order[gap[0]]
        return f"{files[file_of[i]]['path']}: window {k[i]} starts at frame {rows[i, 0]}, expected {ends[gap[0]] - rows[i, 1]} (windows overlap or leave a gap)"
    total = int(ends[-1]) if len(ends) else 0
    if total != index["total_frames"]:
        return f"the windows hold {total} frames, the index declares {index['total_frames']}"
    return None


class LabelStore:
    """A label store opened for reading: the index in memory, the labels memory-mapped.

    Use :meth:`open`, then :meth:`check` once against the run's teacher, then
    :meth:`targets` per batch.
    """

    def __init__(self, root: Path, index: dict[str, Any], labels: np.ndarray):
        self.root = root
        self.index = index
        self.labels = labels  # total_frames, C (memory-mapped)
        self.window_samples: int = index["window_samples"]
        self.num_codebooks: int = index["num_codebooks"]
        self._files = {e["path"]: e for e in index["files"]}
        self.from_shards = index.get("source") == "shards"  # entries are shard members, not files to stat

    @classmethod
    def open(cls, path: str | Path) -> "LabelStore":
        """Open the store folder ``path`` (written by :func:`write_label_store`)."""
        root = Path(path).absolute()
        index_file = root / INDEX_FILE
        if not index_file.is_file():
            raise LabelStoreError(f"{root}: not a label store (no {INDEX_FILE}); make one with `mert teacher label NAME --data AUDIO --out {root}`")
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError) as exc:
            raise LabelStoreError(f"{index_file}: cannot read it ({exc}); the store is damaged, re-run `mert teacher label`") from None
        if not isinstance(index, dict):
            raise LabelStoreError(f"{index_file}: expected a JSON object, got {type(index).__name__}; the store is damaged, re-run `mert teacher label`")
        if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
            raise LabelStoreError(
                f"{root}: format {index.get('format')!r} version {index.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}; "
                f"re-run `mert teacher label` with this mert"
            )
        try:
            dtype = np.dtype(index["dtype"])
            C, N = int(index["num_codebooks"]), int(index["total_frames"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelStoreError(f"{index_file}: malformed ({type(exc).__name__}: {exc}); the store is damaged, re-run `mert teacher label`") from None
        labels_file = root / LABELS_FILE
        want = N * C * dtype.itemsize
        have = labels_file.stat().st_size if labels_file.exists() else None
        if have != want:
            raise LabelStoreError(
                f"{labels_file}: holds {have} bytes, the index promises {want} ({N} frames x {C} codebooks x {dtype.itemsize}); "
                f"the store is damaged or incomplete, re-run `mert teacher label`"
            )
        redo = "re-run `mert teacher label` to rebuild it"
        try:
            problem = _check_windows(index)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"{INDEX_FILE} is malformed ({type(exc).__name__}: {exc})"
        if problem:
            raise LabelStoreError(f"label store {root}: {problem}; the index does not match the audio, {redo}")
        if index.get("index_sha256") != _index_digest(index):
            raise LabelStoreError(f"label store {root}: {INDEX_FILE} was changed after it was written (its hash differs); {redo}")
        highest = [-1]  # the largest label, found in the same read as the hash

        def track_max(chunk: bytes) -> None:
            highest[0] = max(highest[0], int(np.frombuffer(chunk, dtype=dtype).max()))

        digest = file_digest(labels_file, each_chunk=track_max)
        if highest[0] >= index["num_classes"]:
            raise LabelStoreError(f"label store {root}: {LABELS_FILE} holds label {highest[0]}, outside the teacher's classes 0..{index['num_classes'] - 1}; {redo}")
        if digest != index.get("labels_sha256"):
            raise LabelStoreError(f"label store {root}: {LABELS_FILE} differs from what was written (its hash differs); {redo}")
        labels = np.memmap(labels_file, dtype=dtype, mode="r", shape=(N, C)) if N else np.zeros((0, C), dtype)
        return cls(root, index, labels)

    def __len__(self) -> int:
        return len(self._files)

    @property
    def paths(self) -> list[str]:
        return list(self._files)

    def check(self, teacher: Teacher, window_samples: int, files: Iterable[str | Path] | None = None) -> None:
        """Refuse a store made by another teacher configuration, window size or audio.

        Args:
            teacher: the run's teacher (fitted).
            window_samples: the run's crop length.
            files: if given, every one must be in the store and unchanged.

        Raises:
            LabelStoreMismatch: naming each difference and what to do.
        """
        ix = self.index
        problems = []
        if ix["teacher"] != teacher.name:
            problems.append(f"it was made by teacher {ix['teacher']!r}, this run uses {teacher.name!r}")
        else:
            mine = teacher.config_hash()
            if ix["config_hash"] != mine:
                now = teacher.options.model_dump(mode="json")
                diff = [k for k in sorted(set(now) | set(ix["options"])) if now.get(k) != ix["options"].get(k)]
                was = ix["options"]
                changes = ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in diff)
                hint = f" (options that differ: {changes})" if diff else " (same options: the fitted state differs)"
                problems.append(f"it was made with teacher configuration {ix['config_hash']}, this run's {teacher.name!r} has {mine}{hint}")
        spec = teacher.target_spec()
        if (ix["num_classes"], ix["num_codebooks"]) != (spec.num_classes, spec.num_codebooks):
            problems.append(f"it holds {ix['num_codebooks']} codebooks of {ix['num_classes']} classes, "
                            f"this run's {teacher.name!r} declares {spec.num_codebooks} of {spec.num_classes}")
        if ix["window_samples"] != window_samples:
            problems.append(f"its windows are {ix['window_samples']} samples, this run's crops are {window_samples}")
        for key, mine in (("sample_rate", teacher.sample_rate), ("hop_samples", teacher.hop_samples)):
            if ix[key] != mine:
                problems.append(f"its {key} is {ix[key]}, this run's is {mine}")
        if problems:
            raise LabelStoreMismatch(
                f"label store {self.root} does not match this run: {'; '.join(problems)}. "
                f"Re-run `mert teacher label {teacher.name} --data AUDIO --out DIR` with this teacher and crop length, "
                f"or drop label_store to compute labels online"
            )
        if files is not None and self.from_shards:
            self._check_shards([str(f) for f in files])
        elif files is not None:
            bad = []
            for p in files:
                try:
                    self._entry(str(p))
                except LabelStoreError as exc:
                    bad.append(str(exc))
            if bad:
                raise LabelStoreMismatch(f"label store {self.root} does not cover this run's audio ({len(bad)} files), e.g. {bad[0]}")

    def _check_shards(self, sources: list[str]) -> None:
        """Every shard the run reads must have been labelled into this store (by file name)."""
        from mert_core.shards import is_shard_source, open_corpus

        if not all(is_shard_source(s) for s in sources):
            raise LabelStoreMismatch(f"label store {self.root} was made from shards, this run reads files ({', '.join(sources)}); "
                                     f"label the files with `mert teacher label`, or train on the shards")
        names = set(self.index.get("shards", []))
        missing = [n for n in open_corpus(sources, check=False).names if n not in names]
        if missing:
            raise LabelStoreMismatch(f"label store {self.root} does not cover this run's shards ({len(missing)} missing, e.g. {missing[0]}); "
                                     f"re-run `mert teacher label` on these shards")

    def _entry(self, path: str) -> dict[str, Any]:
        if self.from_shards:
            from mert_core.shards import stored_member_name

            entry = self._files.get(stored_member_name(path))
            if entry is None:
                raise LabelStoreError(f"{path}: not in label store {self.root} ({len(self._files)} members); the shard changed since it "
                                      f"was labelled, or the member could not be read then: re-run `mert teacher label` on these shards")
            return entry
        entry = self._files.get(os.path.abspath(path))
        if entry is None:
            raise LabelStoreError(
                f"{path}: not in label store {self.root} ({len(self._files)} files); the store was made for other audio: "
                f"re-run `mert teacher label` on this data"
            )
        try:
            st = os.stat(entry["path"])
        except OSError as exc:
            raise LabelStoreError(f"{path}: cannot stat it ({exc})") from None
        if st.st_size != entry["size"] or st.st_mtime_ns != entry["mtime_ns"]:
            raise LabelStoreError(
                f"{path}: changed since it was labelled (size {entry['size']} -> {st.st_size}, mtime_ns {entry['mtime_ns']} -> {st.st_mtime_ns}); "
                f"re-run `mert teacher label` for label store {self.root}"
            )
        return entry

    def window(self, path: str, offset_samples: int) -> np.ndarray:
        """The stored ``(frames, C)`` labels of the window starting at ``offset_samples``."""
        entry = self._entry(path)
        W = self.window_samples
        if offset_samples % W:
            raise LabelStoreError(
                f"{path}: crop offset {offset_samples} is not on the store's grid of {W}-sample windows; "
                f"crops must start at multiples of {W} (CropBatches(align_crops=True))"
            )
        k = offset_samples // W
        windows = entry["windows"]
        if k >= len(windows):
            raise LabelStoreError(f"{path}: crop offset {offset_samples} is past the {len(windows)} labelled windows of this file ({entry['num_samples']} samples)")
        start, count = windows[k]
        return self.labels[start : start + count]

    def targets(self, paths: list[str], offsets_samples: list[int], num_frames: int, lead_frames: int = 0) -> torch.Tensor:
        """Labels of a batch of grid-aligned crops.

        Args:
            paths: ``B`` audio files.
            offsets_samples: ``B`` crop starts, multiples of ``window_samples``.
            num_frames: frames the student makes from the batch.
            lead_frames: stored frames (the paper's grid) of each window before the
                student's first frame (``FrameGeometry.lead_frames``; 0 for the paper's student).

        Returns:
            ``(B, num_frames, C)`` int64; ``IGNORE_LABEL`` past the end of a window.
        """
        if len(paths) != len(offsets_samples):
            raise ValueError(f"targets: {len(paths)} paths but {len(offsets_samples)} offsets; give one offset per path")
        out = np.full((len(paths), num_frames, self.num_codebooks), IGNORE_LABEL, dtype=np.int64)
        for b, (path, offset) in enumerate(zip(paths, offsets_samples)):
            lab = self.window(path, int(offset))[lead_frames:]
            n = min(num_frames, lab.shape[0])
            out[b, :n] = lab[:n]
        return torch.from_numpy(out)


# -- the Python API behind `mert teacher fit` / `mert teacher label` ---------------------


def label_data(
    name: str,
    data_paths: Iterable[str | Path],
    out_dir: str | Path,
    options: dict[str, Any] | None = None,
    teacher_file: str | Path | None = None,
    registry: Registry | None = None,
    window_samples: int = DEFAULT_WINDOW_SAMPLES,
    sample_rate: int = 24000,
    batch_size: int = 16,
    min_samples: int = TARGET_GRID.receptive_field,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> LabelStoreSummary:
    """Label audio under ``data_paths`` with teacher ``name`` into the store ``out_dir``.

    ``teacher_file`` (the fitted artifact) is required for teachers that need
    fitting; other discrete teachers (EnCodec) take only ``options``. Under
    torchrun (``WORLD_SIZE > 1``) every rank calls this: the files are split
    across the ranks and rank 0 writes the one store (see
    :func:`write_label_store`); ``device`` ``auto`` or ``cuda`` gives each rank
    its own GPU. See :func:`write_label_store` for the other arguments.
    """
    from mert_core.registry import default_registry

    registry = registry or default_registry()
    options = dict(options or {})
    if teacher_file is not None:
        options = with_teacher_file(options, teacher_file)
    teacher = registry.build("teacher", name, options, geometry=FrameGeometry(sample_rate=sample_rate))
    if teacher.needs_fit():
        raise MissingTeacherFile(f"teacher {name!r} must be fitted first: pass --teacher-file FILE (made by `mert teacher fit {name} --data AUDIO --out FILE`)")
    info = distributed.info_from_env()
    started_group = info.enabled and not torch.distributed.is_initialized()
    if info.enabled:
        # rank 0 scans the audio (a million files: many minutes) and merges the parts while the others wait
        info, device = distributed.setup(device, timeout=LABEL_WAIT_TIMEOUT)
    teacher.to(torch.device(resolve_device(device))).eval()
    try:
        return write_label_store(
            teacher, list(data_paths), out_dir, window_samples=window_samples, sample_rate=sample_rate, batch_size=batch_size,
            min_samples=min_samples, progress=progress, overwrite=overwrite, num_workers=num_workers, dist_info=info,
        )
    finally:
        if started_group:
            distributed.teardown(info)
