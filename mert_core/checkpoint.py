"""Checkpoints: atomic writes, ``torch.load(weights_only=True)``-safe contents,
and a safetensors export of the student.

A training checkpoint (``.pt``) is a dict of tensors and plain data:
``format, step, config (TrainConfig as JSON data), model_args, student, heads,
optimizer, scaler, rng, counters, plugin_versions, teacher_hashes, history``
(``history``: what each ``--resume`` changed, e.g. ``optim.lr``).
The student export (``student.safetensors``) holds the student's weights with
``model_args`` and ``config`` as JSON in the safetensors metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, safe_open, save_file

FORMAT = "mert-checkpoint-v1"
STUDENT_FILE = "student.safetensors"
LAST = "last.pt"
LOCK_FILE = ".lock"

log = logging.getLogger(__name__)

# atomic_write's temporary names: "." + target name + "." + mkstemp's 8 random characters + ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the path and what to do."""


class RunFolderBusy(RuntimeError):
    """Another process is writing into the same run folder."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash (even
    SIGKILL) leaves either the old file or the new one, never half a file
    (plus, after SIGKILL, a temporary file that :func:`remove_stale_temp_files`
    deletes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete what :func:`atomic_write` leaves in ``folder`` when killed mid-write.

    Only safe while no other process writes there: call it with the folder's
    :func:`lock_run_folder` held.

    Returns:
        the files removed.
    """
    removed = []
    for p in sorted(Path(folder).glob(".*.tmp")):
        if _TMP_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def lock_run_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (one writer per run folder).

    An OS lock (``flock``) on ``folder/.lock``: released when the block ends,
    however it ends, and by the OS when the process dies (a crash leaves no
    stale lock). The holder's pid is written into the file for the message a
    second writer gets.

    Raises:
        RunFolderBusy: another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, say so once
        log.warning("%s: cannot lock the run folder on this platform; do not start two runs into it", folder)
        yield
        return
    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunFolderBusy(
                f"{folder} is in use by another run (pid {holder}); wait for it to end or pass another --out"
            ) from None
        except OSError as exc:  # e.g. a network filesystem without locks
            log.warning("%s: cannot lock the run folder (%s); do not start two runs into it", folder, exc.strerror)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    state = {"format": FORMAT, **state}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint; pass a run folder holding {LAST} or a .pt file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc}); it may be truncated or not a mert checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file (format={state.get('format') if isinstance(state, dict) else type(state).__name__})")
    return state


def save_student(student, path: Path, config: dict[str, Any] | None = None) -> None:
    """Export the student's weights to safetensors with its builder arguments.

    Args:
        student: a ``MertStudent``.
        path: the ``.safetensors`` file to write.
        config: the run's config as plain data (stored as JSON metadata).
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    meta = {"format": FORMAT, "model_args": json.dumps(student.args), "config": json.dumps(config or {})}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def file_digest(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file's content (first 16 hex digits): a stable cache key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_student(path: str | Path, device: str | torch.device = "cpu"):
    """Load a student for inference from a run folder, a ``.pt`` checkpoint,
    a ``student.safetensors`` export, or a Hugging Face HubertModel folder.

    Returns:
        ``(student, info)``: the ``MertStudent`` in eval mode on ``device``, and
        a dict with ``config`` (plain data, may be empty), ``step`` (or None),
        ``checkpoint_id`` (content hash, stable across copies) and ``path``.
    """
    from mert_core.model import MertStudent

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist; pass a run folder, a .pt checkpoint, a .safetensors export or a Hugging Face folder")
    if path.is_dir():
        if (path / STUDENT_FILE).exists():
            path = path / STUDENT_FILE
        elif (path / LAST).exists():
            path = path / LAST
        elif (path / "config.json").exists():
            from mert_core.convert import load_hf_hubert

            student = load_hf_hubert(path).to(device).eval()
            weights = next((p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists()), path / "config.json")
            return student, {"config": {}, "step": None, "checkpoint_id": "hf-" + file_digest(weights), "path": str(path)}
        else:
            raise CheckpointError(f"{path}: holds neither {STUDENT_FILE}, {LAST} nor a Hugging Face config.json")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "model_args" not in meta:
            raise CheckpointError(f"{path}: safetensors file without mert model_args metadata; export it with mert_core.checkpoint.save_student")
        student = MertStudent.from_args(json.loads(meta["model_args"]))
        student.load_state_dict(load_file(str(path)))
        info = {"config": json.loads(meta.get("config", "{}")), "step": None}
    else:
        state = load_checkpoint(path)
        student = MertStudent.from_args(state["model_args"])
        student.load_state_dict(state["student"])
        info = {"config": state["config"], "step": state["step"]}
    info.update(checkpoint_id=file_digest(path), path=str(path))
    return student.to(device).eval(), info
