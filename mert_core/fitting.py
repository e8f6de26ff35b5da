"""Fitting a teacher: a service of the core that every fitted teacher, built-in or not, uses.

A teacher that must be fitted before it makes targets (k-means centroids, per-bin
statistics, a trained quantiser) declares ``fittable = True``, takes options that
subclass :class:`FittedTeacherOptions` (its fitted file comes back through the
option :data:`TEACHER_FILE`, ``teacher_file``) and implements ``fit``. This module
holds what those fits share:

* drawing the sample a fit reads from a corpus (:func:`plan_sample`, bounded by
  hours, in seeded chunks; shards sampled into local files first) and reading it
  (:func:`sample_batches`, :func:`measure_frame_stats`);
* the fitted file: :func:`write_teacher_file` (the one gate: refuses a fit that made
  its teacher worse, records :func:`fit_provenance`), :func:`artifact_header`,
  :func:`read_teacher_file`, :func:`check_artifact_header`, :func:`adopt_settings`;
* the errors (:class:`~mert_core.errors.TeacherFileError`, :class:`~mert_core.errors.FitError`,
  :class:`~mert_core.errors.FitDiverged`, :class:`~mert_core.errors.NotFittedError`);
* :func:`fit_teacher`, what ``mert teacher fit`` runs.

After ``mert train`` fits a teacher it writes the file's path into the run config
(:func:`with_teacher_file`), so checkpoints are self-contained and a resumed run
loads the file instead of refitting.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from tqdm.auto import tqdm

from mert_core import library_versions
from mert_core.errors import ConfigError, FitDiverged, FitError, NotFittedError, TeacherFileError  # noqa: F401 - the fit errors
from mert_core.geometry import TARGET_GRID, FrameGeometry
from mert_core.paths import resolve_device
from mert_core.registry import Registry
from mert_core.teacher import Teacher, TeacherOptions

log = logging.getLogger("mert.fitting")

TEACHER_FILE = "teacher_file"
"""The option through which a fitted teacher takes its fitted file (:class:`FittedTeacherOptions`)."""


class FittedTeacherOptions(TeacherOptions):
    """Base of the options of a teacher that must be fitted (``Teacher.fittable``)."""

    teacher_file: Path | None = Field(
        None, description="Fitted teacher (.safetensors from `mert teacher fit`); None: not fitted yet (`mert train` fits it on the training data)."
    )


def with_teacher_file(options: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A teacher's options (as in a run config) naming its fitted file ``path``."""
    return {**options, TEACHER_FILE: str(path)}


def without_teacher_file(options: dict[str, Any]) -> dict[str, Any]:
    """A teacher's options without its fitted file (what determines the targets besides the fit)."""
    return {k: v for k, v in options.items() if k != TEACHER_FILE}


def teacher_file_of(options: dict[str, Any]) -> str | None:
    """The fitted file a teacher's options name, or None."""
    return options.get(TEACHER_FILE)


def fit_provenance() -> dict[str, Any]:
    """What every fitted file records about how it was made: library versions and the time."""
    return {
        "versions": {"python": platform.python_version(), **library_versions("torch", "torchaudio", "numpy", "librosa", "safetensors")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- the fitted file ----------------------------------------------------------------------


@dataclass(frozen=True)
class FitQuality:
    """A number a fit measures of its teacher, lower is better (a reconstruction error, an inertia).

    Attributes:
        what: what it is, for a person ("held-out reconstruction error").
        start: its value after the initialisation, before training; None when not measured.
        end: its value for what the fitted file would hold.
        advice: what to change when the fit made it worse (e.g. a lower learning rate).
    """

    what: str
    start: float | None
    end: float
    advice: str = ""

    def problem(self) -> str | None:
        """Why a file with this quality must not be written (non-finite, or worse than at the start), or None."""
        if not math.isfinite(self.end) or (self.start is not None and not math.isfinite(self.start)):
            return "is not finite"
        # a margin for float rounding: an unchanged fit (0 steps) measures the same number twice
        if self.start is not None and self.end > self.start * (1 + FIT_QUALITY_TOLERANCE) + 1e-12:
            return "ended worse than it started"
        return None


FIT_QUALITY_TOLERANCE = 1e-6
"""How much worse than its start (relatively) a fit may end: only rounding."""


def write_teacher_file(out_file: Path, tensors: dict[str, torch.Tensor], format_key: str, meta: dict[str, Any],
                       quality: Iterable[FitQuality], teacher: str) -> Path:
    """Write a fitted teacher's file: ``tensors`` with ``meta`` as JSON under ``format_key``
    in the safetensors metadata, atomically, and only if every ``quality`` the fit
    measured is finite and no worse than it started (the one gate every built-in fit
    writes through; ``meta["fit_quality"]`` records them, and :func:`fit_provenance`
    the library versions and the time, the same for every fit).

    Raises:
        FitDiverged: naming ``teacher``, the quality, both numbers and ``out_file``, which is
            left as it was (an earlier file stays).
    """
    from safetensors.torch import save_file

    from mert_core.files import atomic_write

    quality = list(quality)
    for q in quality:
        problem = q.problem()
        if problem is not None:
            start = "not measured" if q.start is None else f"{q.start:.4e}"
            raise FitDiverged(
                f"teacher {teacher!r}: the fit's {q.what} {problem} ({start} after the initialisation, {q.end:.4e} at the "
                f"end), so {out_file} was not written; {q.advice or 'fit again with other options'}"
            )
    meta = {**meta, "fit_quality": [asdict(q) for q in quality], **fit_provenance()}
    out_file = Path(out_file)
    atomic_write(out_file, lambda tmp: save_file(tensors, str(tmp), metadata={format_key: json.dumps(meta)}))
    return out_file


def read_teacher_file(path: str | Path, artifact_format: str, format_version: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a fitted teacher file (what :func:`write_teacher_file` wrote): ``(metadata, tensors)``.

    Args:
        path: the ``.safetensors`` artifact.
        artifact_format: the metadata key that names the kind of teacher file.
        format_version: the version this code reads.

    Raises:
        TeacherFileError: missing, unreadable, or not a file of ``artifact_format``.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherFileError(f"teacher_file {path}: no such file; fit one with `mert teacher fit NAME --data AUDIO --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(artifact_format)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TeacherFileError(f"teacher_file {path}: cannot read it as safetensors ({exc}); re-run `mert teacher fit`") from None
    if raw is None:
        raise TeacherFileError(f"teacher_file {path}: a safetensors file without {artifact_format!r} metadata, not a fitted {artifact_format} file")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise TeacherFileError(f"teacher_file {path}: its {artifact_format!r} metadata is not valid JSON ({exc}); re-run `mert teacher fit`") from None
    if not isinstance(meta, dict):
        raise TeacherFileError(f"teacher_file {path}: its {artifact_format!r} metadata is not a JSON object; re-run `mert teacher fit`")
    if meta.get("format_version") != format_version:
        raise TeacherFileError(
            f"teacher_file {path}: format version {meta.get('format_version')}, this mert reads {format_version}; refit it with this version"
        )
    return meta, tensors


def artifact_header(teacher: Teacher, fmt: str, version: int, features: dict[str, Any]) -> dict[str, Any]:
    """The fields every fitted teacher file starts with (what :func:`check_artifact_header` reads back);
    ``features``: the options that determine the targets, JSON-ready."""
    return {
        "format": fmt,
        "format_version": version,
        "teacher": teacher.name,
        "sample_rate": teacher.sample_rate,
        "hop_samples": teacher.hop_samples,
        "frame_rate_hz": teacher.frame_rate_hz,
        "features": features,
    }


def check_artifact_header(meta: dict[str, Any], path: str | Path | None, teacher: str, sample_rate: int, hop_samples: int) -> None:
    """Refuse a teacher file fitted for another teacher, sample rate or hop.

    Raises:
        TeacherFileError: naming the file, both values and what to do.
    """
    if meta.get("teacher") != teacher:
        raise TeacherFileError(
            f"teacher_file {path}: fitted for teacher {meta.get('teacher')!r}, not {teacher!r}; use it with that teacher or fit one for {teacher!r}"
        )
    for key, mine in (("sample_rate", sample_rate), ("hop_samples", hop_samples)):
        if meta.get(key) != mine:
            raise TeacherFileError(f"teacher_file {path}: fitted at {key}={meta.get(key)}, this run uses {mine}; refit it for this run")


def adopt_settings(options: TeacherOptions, fitted: dict[str, Any], overridable: set[str] = frozenset()) -> TeacherOptions:
    """``options`` with the settings a teacher file was fitted with.

    An option the user set explicitly to another value than the file's is an
    error naming it, unless it is in ``overridable``.

    Raises:
        TeacherFileError: an explicit option disagrees with the file.
    """
    given = options.model_dump(mode="json")
    for key in sorted(options.model_fields_set & set(fitted)):
        if given[key] != fitted[key] and key not in overridable:
            raise TeacherFileError(
                f"option {key}={given[key]!r}, but teacher_file {options.teacher_file} was fitted with {key}={fitted[key]!r}; "
                f"drop the option or refit with it"
            )
    update = {k: v for k, v in fitted.items() if k in type(options).model_fields and k not in options.model_fields_set}
    return type(options)(**{**options.model_dump(), **update})


def centroid_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a fitted teacher's tensors (names, shapes and bytes): what its ``config_hash`` includes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().float().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# -- the sample a fit reads ----------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    path: str
    offset_samples: int
    num_samples: int


@dataclass
class SamplePlan:
    """Which chunks of which files a fit reads."""

    chunks: list[Chunk]
    total_files: int
    total_hours: float
    sample_hours: float
    unusable: dict[str, str]

    def describe(self) -> dict[str, Any]:
        """JSON-ready: every file with its sampled spans ``[offset_seconds, seconds]``
        (adjacent chunks merged)."""
        spans: dict[str, list[list[float]]] = {}
        for c in self.chunks:  # sorted by file and offset
            rows = spans.setdefault(c.path, [])
            if rows and rows[-1][2] == c.offset_samples:
                rows[-1][2] = c.offset_samples + c.num_samples
            else:
                rows.append([c.path, c.offset_samples, c.offset_samples + c.num_samples])
        return {
            "total_files": self.total_files,
            "total_hours": self.total_hours,
            "sample_hours": self.sample_hours,
            "num_chunks": len(self.chunks),
            "num_files": len(spans),
            "unusable_files": self.unusable,
            "spans_samples": {p: [[a, b] for _, a, b in rows] for p, rows in spans.items()},
        }


def plan_sample(
    files: list[str | Path],
    sample_rate: int,
    chunk_seconds: float,
    sample_fraction: float,
    sample_hours: float | None,
    seed: int,
    progress: bool = True,
) -> SamplePlan:
    """Draw the chunks a fit reads: every file cut into ``chunk_seconds`` pieces,
    shuffled with ``seed``, taken until the fraction (or the hours bound) is reached.
    Shards among ``files`` are first sampled whole, within the same bound, into
    local files (:func:`mert_core.shards.local_sample`): a fit never reads the whole corpus."""
    from mert_core.data import scan_audio
    from mert_core.shards import local_sample

    files = local_sample(files, sample_hours, sample_fraction, seed)
    manifest = scan_audio([Path(f) for f in files], progress=progress)
    chunk = max(1, round(chunk_seconds * sample_rate))
    candidates = []
    for f in manifest.files:
        n = f.num_samples(sample_rate)
        for start in range(0, n, chunk):
            length = min(chunk, n - start)
            if length >= TARGET_GRID.receptive_field:  # at least one frame of the target grid
                candidates.append(Chunk(f.path, start, length))
    total = sum(c.num_samples for c in candidates)
    if not candidates:
        raise FitError(
            f"no usable audio to fit on: {len(manifest.files)} readable files, {len(manifest.skipped)} unreadable "
            f"(e.g. {next(iter(manifest.skipped.items()), ('-', '-'))}); pass folders of wav/flac/ogg/mp3 files"
        )
    target = sample_fraction * total
    if sample_hours is not None:
        target = min(target, sample_hours * 3600 * sample_rate)
    order = np.random.default_rng(seed).permutation(len(candidates))
    chosen, have = [], 0
    for i in order:
        if have >= target:
            break
        chosen.append(candidates[i])
        have += candidates[i].num_samples
    chosen.sort(key=lambda c: (c.path, c.offset_samples))  # read files in order: much faster than random seeks
    hours = 1 / (3600 * sample_rate)
    return SamplePlan(chosen, len(manifest.files), total * hours, have * hours, dict(manifest.skipped))


def measure_frame_stats(
    features: Callable[[torch.Tensor], torch.Tensor], plan: SamplePlan, sample_rate: int, batch_size: int, device: torch.device,
    name: str, progress: bool = True, min_std: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, str]]:
    """Per-dimension mean and std of ``features(wave)`` frames over the chunks of ``plan``.

    Args:
        features: ``(B, S)`` waves -> ``(B, T, D)`` frames.
        min_std: the std is at least this (constant bins stay finite after standardising).

    Returns:
        ``(mean, std, frames, failures)``: ``(D,)`` float32 each, the frames
        measured, and the files that failed to decode.

    Raises:
        ValueError: fewer than 2 frames could be read.
    """
    total = total_sq = None
    frames = 0
    failures: dict[str, str] = {}
    for _, batch in sample_batches(plan, sample_rate, batch_size, device, failures, f"{name}: statistics", progress):
        with torch.no_grad():
            x = features(batch)
            x = x.reshape(-1, x.shape[-1]).double().cpu()  # float64 sums: hours of frames
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = x.square().sum(0) if total_sq is None else total_sq + x.square().sum(0)
        frames += x.shape[0]
    if frames < 2:
        raise FitError(f"{name}: no readable audio to measure per-bin statistics on ({len(plan.chunks)} chunks, "
                         f"{len(failures)} unreadable files); check --data")
    mean = total / frames
    std = (total_sq / frames - mean.square()).clamp(min=0).sqrt().clamp(min=min_std)
    return mean.float(), std.float(), frames, failures


def sample_batches(
    plan: SamplePlan, sample_rate: int, batch_size: int, device: torch.device, failures: dict[str, str], name: str, progress: bool = True
) -> Iterator[tuple[list[Chunk], torch.Tensor]]:
    """Read the chunks of ``plan``, ``batch_size`` at a time, as batches of equal length.

    A file that fails to decode is logged, recorded in ``failures`` (path ->
    error) and skipped from then on. Chunks are decoded ahead on threads
    (:func:`read_ahead`); batches come in plan order all the same.

    Yields:
        ``(chunks, waves)``: the chunks read and their ``(b, S)`` float32
        waveforms on ``device``.
    """
    bar = tqdm(total=len(plan.chunks), desc=f"{name}: features", unit="chunk", disable=not progress)
    reads = read_ahead(plan.chunks, sample_rate, ahead=2 * batch_size)
    while group := list(itertools.islice(reads, batch_size)):
        waves, kept = [], []
        for c, wave in group:
            if c.path in failures:
                continue
            if isinstance(wave, Exception):
                failures[c.path] = str(wave)
                log.warning("%s: skipping %s", name, wave)
                continue
            waves.append(wave)
            kept.append(c)
        bar.update(len(group))
        for length in sorted({len(w) for w in waves}):  # a short read (file shorter than its header) gets its own batch
            same = [i for i, w in enumerate(waves) if len(w) == length]
            yield [kept[i] for i in same], torch.from_numpy(np.stack([waves[i] for i in same])).to(device)
    bar.close()


def read_ahead(chunks: list[Chunk], sample_rate: int, ahead: int) -> Iterator[tuple[Chunk, np.ndarray | Exception]]:
    """``(chunk, wave)`` for every chunk in order, or ``(chunk, AudioError)``
    for one that fails; up to ``ahead`` chunks are decoded in advance on as
    many threads as torch uses. libsndfile and soxr release the GIL, so
    decoding (3/4 of a k-means fit's feature time on Ogg music) runs on every
    core and beside the feature computation: reading 40 chunks of game music
    took 0.32 s on 2 threads against 0.69 s in the main thread."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from mert_core.audio import AudioError, read_crop

    def read(c: Chunk) -> np.ndarray | Exception:
        try:
            return read_crop(c.path, sample_rate, c.offset_samples, c.num_samples)
        except AudioError as exc:
            return exc

    pending: deque = deque()
    todo = iter(chunks)
    with ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="mert-read") as pool:
        for c in itertools.islice(todo, max(1, ahead)):
            pending.append((c, pool.submit(read, c)))
        while pending:
            c, future = pending.popleft()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(read, following)))
            yield c, future.result()


# -- fitting a registered teacher ------------------------------------------------------------


def fit_teacher(
    name: str,
    data_paths: Iterable[str | Path],
    out_file: str | Path,
    options: dict[str, Any] | None = None,
    registry: Registry | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    sample_rate: int = 24000,
    progress: bool = True,
) -> Path:
    """Fit teacher ``name`` on audio under ``data_paths`` and save it to ``out_file``.

    Args:
        name: a registered teacher that needs fitting (``kmeans-mfcc``, ...).
        data_paths: audio folders, files or manifests, or shards (a fit reads a
            bounded sample of them: :func:`mert_core.shards.local_sample`).
        out_file: the artifact to write (``.safetensors``).
        options: teacher options (validated by the teacher's ``Options``).
        registry: default: the installed plugins.
        seed: seed of the sample and initialisation (unless ``options['seed']``).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda:0``, ...
        sample_rate: the student's rate.
        progress: show progress bars.

    Returns:
        ``out_file``.
    """
    from mert_core.registry import default_registry

    registry = registry or default_registry()
    options = dict(options or {})
    if options.get(TEACHER_FILE) is not None:
        raise ConfigError(f"option {TEACHER_FILE!r} is what fitting writes (--out); drop it from the options of {name!r}")
    teacher = registry.build("teacher", name, options, geometry=FrameGeometry(sample_rate=sample_rate))
    if not teacher.fittable or not teacher.needs_fit():
        fittable = [n for n in registry.names("teacher") if registry.get("teacher", n).obj.fittable]
        raise ConfigError(f"teacher {name!r} has nothing to fit with these options (e.g. cqt fits only with normalize=per-bin); "
                         f"teachers that can fit: {', '.join(fittable) or 'none'}")
    device = torch.device(resolve_device(device))
    teacher.to(device)
    from mert_core.shards import is_shard_source

    inputs = [str(p) if is_shard_source(p) else Path(p) for p in data_paths]  # a URL is no Path
    return teacher.fit(inputs, Path(out_file), seed=seed, device=device, progress=progress)
