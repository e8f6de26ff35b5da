"""Extracting features once and keeping them on disk.

Features of one (upstream, task, split, settings) live in::

    $MERT_CACHE/features/<upstream id>/<task>/<split>/<settings hash>/
        features.npy   clip level: (N, L, D); frame level: (sum of T_i, L, D)
        offsets.npy    frame level only: (N + 1,) row where item i starts
        index.npy      (N,) which example of task.examples(split) row/item i is
        meta.json      upstream, task, settings, layer names/sizes, skipped files,
                       and per data file its size, shape and content hash

``features.npy`` is opened memory-mapped, so a probe reads only what it uses.
The folder is written under a temporary name and renamed when complete, so
a crash never leaves a half-written cache that a later run would trust.
Features that are NaN or infinite (as computed, or in the storage dtype) stop
the extraction with an error naming the upstream and layer: nothing is cached.
The settings hash covers the task's file list (a changed dataset is re-extracted)
and everything that changes the numbers (window length, dtype, the version of
the feature code); the upstream's id covers its weights and configuration.

An entry is self-verifying: ``meta.json``, written last, names the entry
(upstream id, task, split, settings, layer names and sizes), records each data
file's size, array shape and content hash, and holds a hash of itself. Before
a cached entry is reused they are checked against the entry asked for (where
it was found), then the data (sizes and shapes first, then one streamed hash);
an entry that does not verify (edited, truncated, deleted, permuted or swapped
files, an edited ``meta.json``) is logged, removed and extracted again, so a
damaged cache never changes a score.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mert_core.audio import AudioError, load_audio
from mert_core.checkpoint import file_digest
from mert_core.errors import NonFiniteFeatures  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.evaluation.upstreams import FEATURES_VERSION
from mert_core.files import publish_folder
from mert_core.paths import cache_root
from mert_core.tasks import Task, TaskDataError

log = logging.getLogger("mert.evaluation")
FORMAT = "mert-features-v3"  # v2: meta.json holds the data files' sizes, shapes and hashes; v3: features checked finite
DATA_FILES = ("features.npy", "index.npy", "offsets.npy")


class ExtractOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window_seconds: float = Field(
        30.0, ge=1.0, description="Long audio is cut into windows this long (MARBLE: 30 s; at least 1 s: shorter windows "
                                  "starve the model of the context it was trained with); clip features average them.")
    batch_windows: int = Field(8, ge=1, description="Windows per forward pass of a student upstream.")
    feature_dtype: Literal["auto", "float32", "float16"] = Field(
        "auto", description="Storage type; auto = float32 for clip-level, float16 for frame-level (halves the disk they need).")
    audio_workers: int = Field(2, ge=0, description="Threads decoding audio ahead of the model (0: decode in the main thread).")


class _NpyAppender:
    """Write a ``.npy`` file row block by row block without knowing the
    final row count: the header is reserved up front and rewritten, with the
    true shape, by :meth:`close`."""

    HEADER_BYTES = 256

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype):
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.rows = 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * self.HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {self.row_shape} expected, got {block.shape[1:]}")
        self.file.write(block.tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.rows, *self.row_shape)}
        text = repr(header).encode("latin1")
        # Magic, version 1.0, little-endian header length, then the dict padded with spaces and a newline.
        pad = self.HEADER_BYTES - 10 - len(text) - 1
        if pad < 0:
            raise ValueError(f"{self.path}: npy header too long for shape {header['shape']}")
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + (self.HEADER_BYTES - 10).to_bytes(2, "little") + text + b" " * pad + b"\n")
        self.file.close()


@dataclass
class FeatureSet:
    """Extracted features of one split, memory-mapped from the cache.

    Attributes:
        directory: the cache folder.
        meta: the contents of ``meta.json``.
        features: ``(N, L, D)`` (clip) or ``(F, L, D)`` (frame) memmap.
        index: ``(N,)`` example index (into ``task.examples(split)``) of each item.
        offsets: frame level: ``(N + 1,)``; item ``i`` is ``features[offsets[i]:offsets[i+1]]``.
        reused: True when found in the cache rather than computed now.
    """

    directory: Path
    meta: dict
    features: np.ndarray
    index: np.ndarray
    offsets: np.ndarray | None
    reused: bool = False

    @classmethod
    def open(cls, directory: Path, reused: bool = False) -> "FeatureSet":
        meta = json.loads((directory / "meta.json").read_text())
        features = np.load(directory / "features.npy", mmap_mode="r")
        offsets = np.load(directory / "offsets.npy") if (directory / "offsets.npy").exists() else None
        return cls(directory, meta, features, np.load(directory / "index.npy"), offsets, reused)

    @property
    def level(self) -> str:
        return self.meta["level"]

    @property
    def layer_names(self) -> list[str]:
        return self.meta["layer_names"]

    @property
    def layer_dims(self) -> list[int]:
        return self.meta["layer_dims"]

    @property
    def frame_rate_hz(self) -> float:
        return float(self.meta["frame_rate_hz"])

    def __len__(self) -> int:
        return len(self.index)

    def item(self, i: int) -> np.ndarray:
        """``(L, D)`` (clip) or ``(T_i, L, D)`` (frame) features of item ``i``."""
        if self.offsets is None:
            return self.features[i]
        return self.features[self.offsets[i]:self.offsets[i + 1]]


def settings_for(upstream, task: Task, split: str, options: ExtractOptions) -> dict:
    """Everything that decides the stored numbers (hashed into the folder name)."""
    dtype = options.feature_dtype
    if dtype == "auto":
        dtype = "float16" if task.level == "frame" else "float32"
    return {
        "format": FORMAT,
        "features_version": FEATURES_VERSION,
        "task_fingerprint": task.fingerprint(split),
        "level": task.level,
        "sample_rate": upstream.sample_rate,
        "window_seconds": options.window_seconds,
        "dtype": dtype,
    }


def feature_dir(upstream, task: Task, split: str, options: ExtractOptions, cache_dir: str | Path | None = None) -> Path:
    settings = settings_for(upstream, task, split, options)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "features" / upstream.id / task.name / split / digest


def extract(upstream, task: Task, split: str, options: ExtractOptions | None = None, cache_dir: str | Path | None = None,
            progress: bool = True) -> FeatureSet:
    """Features of every layer for the examples of one split, from the cache
    if they were extracted before.

    Unreadable audio files are skipped, counted and listed in ``meta.json``.

    Raises:
        TaskDataError: no example of the split could be read.
    """
    options = options or ExtractOptions()
    final = feature_dir(upstream, task, split, options, cache_dir)
    settings = settings_for(upstream, task, split, options)
    identity = entry_identity(upstream, task, split, settings)
    if final.exists():
        problem = verify_cache_entry(final, identity)
        if problem is None:
            log.info("reusing cached features at %s", final)
            return FeatureSet.open(final, reused=True)
        log.warning("cached features at %s do not verify (%s); extracting them again", final, problem)
        _remove(final)

    examples = task.examples(split)
    log.info("extracting %s features of %s/%s (%d examples) into %s", upstream.name, task.name, split, len(examples), final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = {**_extract_into(tmp, upstream, task, split, examples, settings, options, progress), **identity}
        meta["files"] = _describe_files(tmp)
        meta["meta_sha256"] = _meta_digest(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: its presence means the rest is complete
        if not publish_folder(tmp, final, replace=False):  # another process finished the same extraction first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureSet.open(final, reused=False)


def _describe_files(directory: Path) -> dict[str, dict]:
    """Size, shape, dtype and content hash of each data file in ``directory``."""
    out = {}
    for name in DATA_FILES:
        path = directory / name
        if path.exists():
            array = np.load(path, mmap_mode="r")
            out[name] = {"bytes": path.stat().st_size, "shape": list(array.shape), "dtype": array.dtype.str, "sha256": file_digest(path)}
    return out


def entry_identity(upstream, task: Task, split: str, settings: dict) -> dict:
    """What the ``meta.json`` of the entry for (``upstream``, ``task``, ``split``, ``settings``)
    must record about itself, so that an entry found in another entry's place (swapped
    split folders) or with edited layers is not reused."""
    return {
        "upstream_id": upstream.id,
        "task_name": task.name,
        "split": split,
        "settings": settings,
        "layer_names": list(upstream.layer_names),
        "layer_dims": list(upstream.layer_dims_for(task.level)),
    }


def _meta_digest(meta: dict) -> str:
    """sha256 (16 hex digits) of ``meta`` without its own ``meta_sha256``."""
    payload = json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def verify_cache_entry(directory: Path, identity: dict | None = None) -> str | None:
    """Why the cache entry in ``directory`` cannot be trusted, or None if it verifies.

    Checks, cheapest first: ``meta.json`` parses, is of this format and
    matches its own hash; it is the entry ``identity`` describes (upstream,
    task, split, settings, layer names and sizes: see :func:`entry_identity`);
    every data file it lists exists with the recorded size, array shape and
    dtype; the index and offsets are consistent; and the content hash of each
    file (one streamed read) matches the one recorded when it was written.
    """
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except FileNotFoundError:
        return "no meta.json (an unfinished or older entry)"
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable: {exc}"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        return f"meta.json is not a {FORMAT} entry"
    if meta.get("meta_sha256") != _meta_digest(meta):
        return "meta.json differs from the hash recorded when it was written"
    for key, want in (identity or {}).items():
        if meta.get(key) != want:
            return f"meta.json records {key} {meta.get(key)!r}, this entry is for {want!r}"
    files = meta["files"]
    wanted = {"features.npy", "index.npy"} | ({"offsets.npy"} if meta.get("level") == "frame" else set())
    if set(files) != wanted:
        return f"meta.json lists {sorted(files)}, expected {sorted(wanted)}"
    arrays = {}
    for name, want in files.items():
        path = directory / name
        try:
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"{name} holds {size} bytes, meta.json records {want['bytes']}"
            arrays[name] = array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            return f"{name} unreadable: {exc}"
        if list(array.shape) != want["shape"] or array.dtype.str != want["dtype"]:
            return f"{name} has shape {list(array.shape)} {array.dtype.str}, meta.json records {want['shape']} {want['dtype']}"
    index, rows = arrays["index.npy"], arrays["features.npy"].shape[0]
    if len(index) != meta.get("num_kept") or (len(index) and (index.min() < 0 or index.max() >= meta.get("num_examples", 0))):
        return "index.npy does not match the kept examples recorded in meta.json"
    offsets = arrays.get("offsets.npy")
    if offsets is not None and (len(offsets) != len(index) + 1 or offsets[0] != 0 or offsets[-1] != rows or (np.diff(offsets) < 0).any()):
        return "offsets.npy does not split features.npy into the kept items"
    if offsets is None and rows != len(index):
        return f"features.npy has {rows} rows for {len(index)} items"
    for name, want in files.items():
        if file_digest(directory / name) != want["sha256"]:
            return f"{name} content differs from the hash recorded when it was written"
    return None


def _remove(directory: Path) -> None:
    """Move a bad entry out of the way, then delete it (a concurrent reader keeps its open files)."""
    doomed = directory.parent / f".{directory.name}.bad-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(directory, doomed)
    except FileNotFoundError:  # another process removed it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _load(upstream, ex):
    try:
        start = ex.start_seconds or 0.0
        return load_audio(ex.path, upstream.sample_rate, offset_seconds=start, duration_seconds=ex.duration_seconds)
    except AudioError as exc:
        return exc


def _check_finite(upstream, stored: np.ndarray, computed: np.ndarray, path) -> None:
    """Refuse features that are not finite, naming the upstream, the layers and the file.

    Args:
        stored: ``(T, L, D)`` features in the cache's dtype.
        computed: the same as the upstream returned them (float32), to tell an
            overflow of the storage type from a model that diverged.
    """
    finite = np.isfinite(stored).all(axis=(0, 2))  # L
    if finite.all():
        return
    layers = [upstream.layer_names[j] for j in np.flatnonzero(~finite)]
    cause = (f"their values pass {stored.dtype}'s range: extract with --set feature_dtype=float32"
             if np.isfinite(computed).all() else "the model's computation overflows: its weights are finite but the run that wrote them diverged")
    raise NonFiniteFeatures(
        f"upstream {upstream.name} ({upstream.id}): {', '.join(layers)} features of {path} are NaN or infinite; "
        f"{cause}; nothing was cached"
    )


def _extract_into(tmp: Path, upstream, task: Task, split: str, examples, settings: dict, options: ExtractOptions, progress: bool) -> dict:
    frame_level = task.level == "frame"
    dims = upstream.layer_dims_for(task.level)
    writer = _NpyAppender(tmp / "features.npy", (len(dims), max(dims)), settings["dtype"])
    kept, offsets, skipped = [], [0], []
    started = time.time()
    chunk = max(1, options.batch_windows)
    chunks = [list(range(s, min(s + chunk, len(examples)))) for s in range(0, len(examples), chunk)]
    pool = ThreadPoolExecutor(options.audio_workers) if options.audio_workers > 0 else None

    def submit(ids):  # decode the next chunk in threads while the model runs on this one
        if pool is None:
            return [_load(upstream, examples[i]) for i in ids]
        return [pool.submit(_load, upstream, examples[i]) for i in ids]

    bar = tqdm(total=len(examples), desc=f"extract {upstream.name} {task.name}/{split}", unit="ex", disable=not progress, leave=False)
    try:
        pending = submit(chunks[0]) if chunks else []
        for k, ids in enumerate(chunks):
            loaded = [p.result() if pool is not None else p for p in pending]
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
            good = [(i, w) for i, w in zip(ids, loaded) if not isinstance(w, AudioError)]
            skipped += [{"path": str(examples[i].path), "error": str(w)} for i, w in zip(ids, loaded) if isinstance(w, AudioError)]
            if good:
                waves = [w for _, w in good]
                feats = upstream.frame_features(waves) if frame_level else upstream.clip_features(waves)
                for (i, _), f in zip(good, feats):
                    with np.errstate(over="ignore"):  # an overflow of the storage type is named below
                        stored = np.asarray(f if frame_level else f[None], dtype=writer.dtype)  # what the cache would hold
                    _check_finite(upstream, stored, f, examples[i].path)
                    writer.append(stored)
                    kept.append(i)
                    if frame_level:
                        offsets.append(offsets[-1] + f.shape[0])
            bar.update(len(ids))
    finally:
        bar.close()
        writer.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if skipped:
        log.warning("%s/%s: skipped %d unreadable file(s) of %d, e.g. %s", task.name, split, len(skipped), len(examples), skipped[0]["error"])
    if not kept:
        first = skipped[0]["error"] if skipped else "no examples"
        raise TaskDataError(f"task {task.name!r} split {split!r}: none of the {len(examples)} audio files could be read (first error: {first}); check the task's data folder")
    np.save(tmp / "index.npy", np.asarray(kept, dtype=np.int64))
    if frame_level:
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    return {
        "format": FORMAT,
        "upstream": upstream.describe(),
        "task": task.describe(),
        "split": split,
        "level": task.level,
        "settings": settings,
        "frame_rate_hz": upstream.frame_rate_hz,
        "num_examples": len(examples),
        "num_kept": len(kept),
        "skipped": skipped,
        "seconds": round(time.time() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
