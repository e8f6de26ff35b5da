"""The training data pipeline: scan once, then draw deterministic crops.

* :func:`scan_audio` turns folders and manifest files into a :class:`Manifest`
  (every file with its duration, every unusable file with the reason). Scans
  are cached on disk; a re-scan only opens files whose size or mtime changed.
* :class:`CropBatches` is a map-style dataset whose item ``i`` is micro-batch
  ``i``: which files and which crops it holds is a pure function of
  ``(seed, i, rank, world_size)``, so a resumed run continues exactly where it
  stopped and ranks read disjoint shards.
* :func:`make_loader` wraps it in a DataLoader that starts at any index.

Bad files never crash a run: unreadable headers are recorded by the scan,
files that fail to decode later are replaced by the next candidate and
reported in the batch's ``"skipped"`` list.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from mert_core.audio import AUDIO_EXTENSIONS, AudioError, audio_info, read_crop, resampled_length
from mert_core.errors import DataError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.files import atomic_write
from mert_core.paths import cache_root

log = logging.getLogger(__name__)

MANIFEST_EXTENSIONS = (".tsv", ".csv")
_CACHE_VERSION = "v1"
_MANIFEST_COLUMNS = ("path", "duration_seconds", "sample_rate", "frames", "skipped_reason")
_CACHE_COLUMNS = ("path", "size", "mtime_ns", "sample_rate", "frames", "error")


# ---------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioFile:
    """One usable audio file.

    Attributes:
        path: absolute path.
        duration_seconds: length in seconds.
        sample_rate: the file's own rate; 0 when a manifest gave only a
            duration (the rate is then read when the file is opened).
        frames: length in samples at ``sample_rate`` (0 when unknown).
    """

    path: str
    duration_seconds: float
    sample_rate: int
    frames: int

    def num_samples(self, sample_rate: int) -> int:
        """Length after resampling to ``sample_rate`` (exactly what :func:`read_crop` sees)."""
        if self.sample_rate > 0 and self.frames > 0:
            return resampled_length(self.frames, self.sample_rate, sample_rate)
        return int(self.duration_seconds * sample_rate)


@dataclass
class Manifest:
    """The result of a scan: usable files and unusable ones with the reason.

    Attributes:
        files: usable files, sorted by path.
        skipped: path -> why it cannot be used (unreadable header, truncated, ...).
            Files that are merely short are *not* here; they are in ``files`` and
            filtered by the consumer (see :meth:`split_by_duration`).
        scan_stats: how the last scan got its entries: ``probed`` (header
            opened), ``reused`` (from the cache, file not opened), ``trusted``
            (duration given by a manifest file). Not saved.
    """

    files: list[AudioFile] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    scan_stats: dict[str, int] = field(default_factory=dict, compare=False)

    def split_by_duration(self, min_seconds: float) -> tuple[list[AudioFile], list[AudioFile]]:
        """``(long_enough, too_short)`` for a minimum duration."""
        long_enough = [f for f in self.files if f.duration_seconds >= min_seconds]
        too_short = [f for f in self.files if f.duration_seconds < min_seconds]
        return long_enough, too_short

    def save(self, path: str | Path) -> Path:
        """Write a TSV (columns ``path, duration_seconds, sample_rate, frames,
        skipped_reason``) that :meth:`load` and :func:`scan_audio` read back."""
        path = Path(path)
        rows = [[f.path, f"{f.duration_seconds:.6f}", f.sample_rate, f.frames, ""] for f in self.files]
        rows += [[p, "", "", "", _one_line(reason)] for p, reason in sorted(self.skipped.items())]
        _atomic_write_tsv(path, _MANIFEST_COLUMNS, rows)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        """Read a TSV written by :meth:`save` (no file is opened or checked)."""
        path = Path(path)
        header, rows = _read_table(path)
        _require_columns(path, header, ("path",))
        files, skipped = [], {}
        for line, row in rows:
            reason = row.get("skipped_reason") or ""
            if reason:
                skipped[row["path"]] = reason
                continue
            files.append(
                AudioFile(
                    path=row["path"],
                    duration_seconds=_number(path, line, row, "duration_seconds", float),
                    sample_rate=_number(path, line, row, "sample_rate", int, default=0),
                    frames=_number(path, line, row, "frames", int, default=0),
                )
            )
        return cls(files=sorted(files, key=lambda f: f.path), skipped=skipped)


# ---------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------


def scan_audio(paths: Iterable[str | Path], cache_dir: Path | None = None, progress: bool = True) -> Manifest:
    """Build a manifest of every audio file under ``paths``.

    Args:
        paths: folders (searched recursively for AUDIO_EXTENSIONS), manifest
            files (.tsv/.csv with a header holding a ``path`` column; relative
            paths are resolved against the manifest's folder; optional
            ``duration``/``duration_seconds``, or ``num_samples``/``frames``
            with ``sample_rate``: rows that give them are trusted and not
            opened), or single audio files.
        cache_dir: where scan results are cached (default
            :func:`mert_core.paths.cache_root`), keyed by the input paths. A re-scan
            reuses entries whose file size and mtime are unchanged, opens new
            or changed files and drops deleted ones.
        progress: show a progress bar while headers are read.

    Returns:
        A :class:`Manifest`; ``scan_stats`` says how many headers were read.

    Raises:
        DataError: a path does not exist, or a manifest is malformed.
    """
    inputs = [Path(p).expanduser().absolute() for p in paths]
    if not inputs:
        raise DataError("scan_audio: no input paths given; pass audio folders or manifest files")

    to_probe: dict[str, os.stat_result | None] = {}  # path -> stat (None: missing)
    trusted: dict[str, AudioFile] = {}
    listed_bad: dict[str, str] = {}
    for inp in inputs:
        if inp.is_dir():
            for p, st, problem in _walk_audio(inp):
                if problem:
                    listed_bad[p] = problem
                else:
                    to_probe[p] = st
        elif inp.is_file() and inp.suffix.lower() in MANIFEST_EXTENSIONS:
            _read_manifest_input(inp, to_probe, trusted, listed_bad)
        elif inp.is_file() and inp.suffix.lower() in AUDIO_EXTENSIONS:
            to_probe[str(inp)] = inp.stat()
        elif inp.exists():
            raise DataError(
                f"{inp}: not a folder, manifest ({'/'.join(MANIFEST_EXTENSIONS)}) or audio file "
                f"({'/'.join(AUDIO_EXTENSIONS)}); pass one of those"
            )
        else:
            raise DataError(f"{inp}: no such file or folder; check the data paths")
    # A file listed with a duration and also found in a folder: the listing wins.
    for p in trusted:
        to_probe.pop(p, None)

    cache_file = _cache_file(inputs, cache_dir)
    cached = _read_cache(cache_file)
    new_cache: dict[str, dict[str, str]] = {}
    files: list[AudioFile] = []
    skipped: dict[str, str] = dict(listed_bad)
    stats = {"probed": 0, "reused": 0, "trusted": len(trusted)}

    need: list[str] = []
    for p, st in to_probe.items():
        if st is None:
            skipped[p] = "file not found (listed in a manifest)"
            continue
        entry = cached.get(p)
        if entry is not None and entry["size"] == str(st.st_size) and entry["mtime_ns"] == str(st.st_mtime_ns):
            stats["reused"] += 1
            new_cache[p] = entry
        else:
            need.append(p)
    for p in tqdm(need, desc="scanning audio headers", unit="file", disable=not progress or len(need) < 50):
        st = to_probe[p]
        entry = {"path": p, "size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns), "sample_rate": "", "frames": "", "error": ""}
        try:
            info = audio_info(p)
            entry["sample_rate"], entry["frames"] = str(info.sample_rate), str(info.frames)
        except AudioError as exc:
            entry["error"] = _one_line(str(exc))
        stats["probed"] += 1
        new_cache[p] = entry
    for p, entry in new_cache.items():
        if entry["error"]:
            skipped[p] = entry["error"]
        else:
            sr, n = int(entry["sample_rate"]), int(entry["frames"])
            files.append(AudioFile(path=p, duration_seconds=n / sr, sample_rate=sr, frames=n))
    files += trusted.values()
    files.sort(key=lambda f: f.path)

    if cache_file is not None and (stats["probed"] or set(new_cache) != set(cached)):
        try:
            _atomic_write_tsv(cache_file, _CACHE_COLUMNS, [[e[c] for c in _CACHE_COLUMNS] for e in new_cache.values()])
        except OSError as exc:  # a read-only cache must not stop training
            log.warning("could not write scan cache %s (%s); the next scan will re-read headers", cache_file, exc)
    manifest = Manifest(files=files, skipped=skipped, scan_stats=stats)
    if skipped:
        first = next(iter(sorted(skipped.items())))
        log.warning("scan: %d of %d files unusable (e.g. %s); see Manifest.skipped",
                    len(skipped), len(skipped) + len(files), first[1])
    return manifest


def _walk_audio(root: Path) -> Iterator[tuple[str, os.stat_result | None, str]]:
    """Audio files under ``root`` (recursive, following links once): ``(path,
    stat, "")``, or ``(path, None, why)`` for an audio name that cannot be
    read as a file (a dangling link, a FIFO): those are counted, not dropped."""
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue  # a symlink loop or a folder reached twice
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("cannot list %s (%s); skipping it", folder, exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    stack.append(entry.path)
                elif not entry.name.lower().endswith(AUDIO_EXTENSIONS):
                    continue
                elif entry.is_file():
                    yield entry.path, entry.stat(), ""
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    yield entry.path, None, f"dangling symbolic link (its target {os.readlink(entry.path)} does not exist)"
                else:
                    yield entry.path, None, "not a regular file (a FIFO, socket or device); replace it with an audio file"
            except OSError as exc:
                yield entry.path, None, f"cannot stat ({_one_line(str(exc))})"


def _read_manifest_input(manifest: Path, to_probe: dict, trusted: dict, listed_bad: dict) -> None:
    header, rows = _read_table(manifest)
    _require_columns(manifest, header, ("path",))
    base = manifest.parent
    for line, row in rows:
        raw = row["path"]
        if not raw:
            raise DataError(f"{manifest}, line {line}: empty 'path'; every row needs one")
        p = str((base / Path(raw).expanduser()).absolute()) if not os.path.isabs(raw) else raw
        if row.get("skipped_reason"):
            listed_bad[p] = row["skipped_reason"]
            continue
        duration = _number(manifest, line, row, "duration", float, default=None)
        if duration is None:
            duration = _number(manifest, line, row, "duration_seconds", float, default=None)
        frames = _number(manifest, line, row, "num_samples", int, default=None)
        if frames is None:
            frames = _number(manifest, line, row, "frames", int, default=None)
        sr = _number(manifest, line, row, "sample_rate", int, default=None)
        if frames is not None and sr:
            trusted[p] = AudioFile(p, frames / sr, sr, frames)
        elif duration is not None:
            trusted[p] = AudioFile(p, duration, sr or 0, 0)
        else:  # only the path (or a sample count without its rate): read the header
            try:
                to_probe[p] = os.stat(p)
            except OSError:
                to_probe[p] = None


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and rows ``(line_number, {column: value})`` of a .tsv/.csv file."""
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty manifest; expected a header line with a 'path' column")
            header = [h.strip() for h in header]
            rows = []
            for i, values in enumerate(reader, start=2):
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise DataError(
                        f"{path}, line {i}: {len(values)} fields, header has {len(header)} "
                        f"({', '.join(header)}); fix the row (delimiter: {'comma' if delimiter == ',' else 'tab'})"
                    )
                rows.append((i, {h: v.strip() for h, v in zip(header, values)}))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read manifest ({_one_line(str(exc))})") from None
    return header, rows


def _require_columns(path: Path, header: list[str], needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(
            f"{path}: header lacks column(s) {', '.join(missing)} (found: {', '.join(header) or 'nothing'}); "
            "the first line must name the columns, e.g. 'path<TAB>duration'"
        )


def _number(path: Path, line: int, row: dict[str, str], column: str, kind: type, default: Any = ...) -> Any:
    value = row.get(column, "")
    if value == "":
        if default is ...:
            raise DataError(f"{path}, line {line}: column {column!r} is empty; expected a number")
        return default
    try:
        number = kind(value)
    except ValueError:
        raise DataError(f"{path}, line {line}: column {column!r} = {value!r}; expected {'an integer' if kind is int else 'a number'}") from None
    if number < 0 or (kind is float and not np.isfinite(number)):
        raise DataError(f"{path}, line {line}: column {column!r} = {value!r}; expected a finite value >= 0")
    return number


def _cache_file(inputs: list[Path], cache_dir: Path | None) -> Path | None:
    cache_dir = cache_root(cache_dir)
    key = hashlib.sha256(json.dumps(sorted(str(p) for p in inputs)).encode()).hexdigest()[:16]
    return cache_dir / "scans" / f"scan-{_CACHE_VERSION}-{key}.tsv"


def _read_cache(cache_file: Path | None) -> dict[str, dict[str, str]]:
    if cache_file is None or not cache_file.exists():
        return {}
    try:
        header, rows = _read_table(cache_file)
        if tuple(header) != _CACHE_COLUMNS:
            raise DataError(f"unexpected columns {header}")
        return {row["path"]: row for _, row in rows}
    except DataError as exc:  # a damaged cache costs a re-scan, nothing more
        log.warning("ignoring unreadable scan cache %s (%s)", cache_file, exc)
        return {}


def _atomic_write_tsv(path: Path, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(list(header))
            writer.writerows(rows)

    atomic_write(path, write)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------
# Deterministic crops
# ---------------------------------------------------------------------------


class CropBatches(Dataset):
    """Micro-batches of random crops; item ``i`` depends only on ``(seed, i, rank, world_size)``.

    Sharding: the usable files (sorted by path) are dealt to ranks round-robin,
    ``files[rank::world_size]``; each rank only ever reads its own shard, so
    ranks never read the same file. Order: each rank walks its shard in epochs;
    epoch ``e`` is a permutation seeded by ``(seed, rank, e)``. Clip ``b`` of
    batch ``i`` is draw ``j = i * batch_size + b``: epoch ``j // n``, position
    ``j % n`` for a shard of ``n`` files. The crop offset is drawn from a
    generator seeded by ``(seed, rank, j, attempt)``.

    A file that fails to decode is replaced by the next file of the same
    epoch's permutation (``attempt`` 1, 2, ...) and reported in ``"skipped"``.
    Known-bad files are remembered per process and not opened again; they are
    still reported each time they are replaced, so an item is the same whether
    or not this process has met the bad file before (count distinct paths).

    Args:
        manifest: from :func:`scan_audio`.
        batch_size: clips per micro-batch.
        sample_rate: output rate (24 kHz).
        crop_seconds: crop length (MERT: 5 s).
        min_seconds: shorter files are not used (MERT: 3 s); see ``too_short``.
        seed: data-order seed.
        rank, world_size: this process's place among data-parallel ranks.
        align_crops: crop offsets are multiples of the crop length (only whole
            windows of the grid ``k * crop``), so that offline label stores
            computed per window on that grid match online labels exactly.

    Item ``i`` is a dict:
        ``wave``: ``(B, S)`` float32, ``S = round(crop_seconds * sample_rate)``,
        zero-padded after ``lengths[b]``; ``lengths``: ``(B,)`` int64;
        ``paths``: ``list[str]``; ``offsets``: ``list[int]`` (first sample of
        each crop in the resampled file); ``skipped``: ``list[(path, reason)]``.
    """

    def __init__(
        self,
        manifest: Manifest,
        batch_size: int,
        *,
        sample_rate: int = 24000,
        crop_seconds: float = 5.0,
        min_seconds: float = 3.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        align_crops: bool = False,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size = batch_size
        self.sample_rate = sample_rate
        self.crop_samples = int(round(crop_seconds * sample_rate))
        if self.crop_samples < 1:
            raise DataError(f"crop_seconds={crop_seconds} gives no samples at {sample_rate} Hz; expected > 0")
        self.min_seconds = min_seconds
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.align_crops = align_crops

        usable, short = manifest.split_by_duration(min_seconds)
        usable = sorted(usable, key=lambda f: f.path)
        self.too_short: list[str] = [f.path for f in short]
        self.num_usable_files = len(usable)
        self.files: list[AudioFile] = usable[rank::world_size]
        if not self.files:
            raise DataError(
                f"rank {rank} of {world_size} has no training files: {len(usable)} usable file(s) "
                f"(>= min_seconds={min_seconds} s; {len(short)} too short, {len(manifest.skipped)} unreadable); "
                "add audio, lower min_seconds or use fewer ranks"
            )
        self._known_bad: dict[str, str] = {}
        self._perms: dict[int, np.ndarray] = {}

    # -- the pure part ----------------------------------------------------------

    def _seed_words(self, *words: int) -> list[int]:
        # SeedSequence wants non-negative ints; a negative config seed still works.
        return [self.seed % 2**63, self.rank, *words]

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng(self._seed_words(0, epoch)).permutation(len(self.files))
            if len(self._perms) >= 2:  # a worker only ever straddles two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def candidate(self, draw: int, attempt: int = 0) -> tuple[AudioFile, int]:
        """File and crop offset of draw ``draw`` (= ``i * batch_size + b``), try ``attempt``."""
        n = len(self.files)
        epoch, position = divmod(draw, n)
        f = self.files[self._permutation(epoch)[(position + attempt) % n]]
        total = f.num_samples(self.sample_rate)
        rng = np.random.default_rng(self._seed_words(1, draw, attempt))
        if total <= self.crop_samples:
            offset = 0
        elif self.align_crops:
            offset = int(rng.integers(0, total // self.crop_samples)) * self.crop_samples
        else:
            offset = int(rng.integers(0, total - self.crop_samples + 1))
        return f, offset

    # -- reading ------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            raise IndexError(f"CropBatches index must be >= 0, got {index}")
        B, S = self.batch_size, self.crop_samples
        clips, paths, offsets, skipped = [], [], [], []
        for b in range(B):
            draw = index * B + b
            for attempt in range(len(self.files)):
                f, offset = self.candidate(draw, attempt)
                reason = self._known_bad.get(f.path)
                if reason is None:
                    try:
                        clip = read_crop(f.path, self.sample_rate, offset, S)
                        break
                    except AudioError as exc:
                        reason = _one_line(str(exc))
                        self._known_bad[f.path] = reason
                skipped.append((f.path, reason))
            else:
                raise DataError(
                    f"rank {self.rank}: none of the {len(self.files)} files of this shard could be read "
                    f"(e.g. {skipped[-1][0]}: {skipped[-1][1]}); check the data"
                )
            clips.append(clip)
            paths.append(f.path)
            offsets.append(offset)
        return crop_batch(clips, S, paths, offsets, skipped)


def crop_batch(clips: list[np.ndarray], crop_samples: int, paths: list[str], offsets: list[int],
               skipped: list[tuple[str, str]]) -> dict[str, Any]:
    """The batch dict every training loader yields (see :class:`CropBatches`) from ``B`` clips of up to ``crop_samples``."""
    wave = np.zeros((len(clips), crop_samples), dtype=np.float32)
    lengths = np.zeros(len(clips), dtype=np.int64)
    for b, clip in enumerate(clips):
        wave[b, : len(clip)] = clip
        lengths[b] = len(clip)
    return {"wave": torch.from_numpy(wave), "lengths": torch.from_numpy(lengths), "paths": paths, "offsets": offsets, "skipped": skipped}


class _CountFrom(Sampler[int]):
    """``start, start + 1, ...`` forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _init_worker(_worker_id: int) -> None:
    # Each worker decodes and resamples one batch at a time; more torch threads
    # per worker only oversubscribe the cores the main process trains on.
    torch.set_num_threads(1)


def make_loader(dataset: CropBatches, start_index: int = 0, num_workers: int = 1, *, prefetch_factor: int = 2, pin_memory: bool | None = None) -> DataLoader:
    """An endless iterator over ``dataset[start_index], dataset[start_index + 1], ...``.

    Resuming after ``step`` optimizer updates with ``grad_accum`` micro-batches
    each: ``start_index = step * grad_accum``.

    Args:
        dataset: a :class:`CropBatches` (or any dataset indexed by batch number).
        start_index: first micro-batch.
        num_workers: worker processes (0 reads in the calling process); each
            uses one torch thread; they persist across iterations.
        prefetch_factor: batches each worker reads ahead.
        pin_memory: None pins only when CUDA is available.
    """
    if start_index < 0:
        raise DataError(f"start_index must be >= 0, got {start_index}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor, "worker_init_fn": _init_worker} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, sampler=_CountFrom(start_index), num_workers=num_workers, pin_memory=pin_memory, **extra)
