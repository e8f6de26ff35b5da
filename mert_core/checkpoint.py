"""Checkpoints: atomic writes, ``torch.load(weights_only=True)``-safe contents,
and a safetensors export of the student.

A training checkpoint (``.pt``) is a dict of tensors and plain data: ``format``,
the fields of :class:`TrainingState` (the one declaration of what it holds) and
a content hash. :func:`resume_from` reads one for ``--resume``, with the config
fields a resume may change declared in :data:`RESUMABLE_FIELDS`;
:func:`restore_training` and :func:`restore_rng` put it back into a run.
The student export (``student.safetensors``) holds the student's weights with
``model_args`` and ``config`` as JSON in the safetensors metadata.

A run folder holds ``checkpoints/step_N.pt``, ``last.pt`` (a link to the
newest) and the export; :func:`resume_config` decides what a ``--resume`` may
change, :func:`roll_back_to_checkpoint_before` undoes non-finite steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from safetensors.torch import load_file, safe_open, save_file

from mert_core.config import TrainConfig
from mert_core.errors import CheckpointError, ConfigError, RunFolderBusy, RunFolderTaken  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.files import atomic_write, naming_a_full_disk, remove_stale_temp_files  # noqa: F401 - re-exported: the run folder's writes
from mert_core.fitting import teacher_file_of, with_teacher_file, without_teacher_file
from mert_core.model import MertStudent

FORMAT = "mert-checkpoint-v1"
STUDENT_FILE = "student.safetensors"
LAST = "last.pt"
LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


RUN_FILES = (LAST, STUDENT_FILE, "checkpoints", "config.json", "metrics.jsonl", "summary.json", "loss.png", "tensorboard")
"""What a training run writes into its folder, besides its fitted teachers (``teacher-*.safetensors``
and a Mel-RVQ fit's ``.ckpt``) and the lock."""


def run_files(folder: Path) -> list[Path]:
    """The files and folders of a run in ``folder`` (:data:`RUN_FILES` and fitted teachers), if any."""
    folder = Path(folder)
    return [folder / name for name in RUN_FILES if (folder / name).exists()] + sorted(folder.glob("teacher-*.safetensors*"))


def clear_run_files(folder: Path) -> list[Path]:
    """Delete what :func:`run_files` lists (with the folder's lock held); returns it."""
    import shutil

    removed = run_files(folder)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


_HELD_LOCKS: set[int] = set()
"""Descriptors of the run-folder locks this process holds."""


def _drop_inherited_locks() -> None:
    # In a forked child (a DataLoader worker): an flock belongs to the open file, which the
    # child shares, so a worker outliving a SIGKILLed run (it notices within ~5 s) held the
    # lock that long. Closing the child's copy leaves the lock to the process that took it.
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def lock_run_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (one writer per run folder).

    An OS lock (``flock``) on ``folder/.lock``: released when the block ends,
    however it ends, and by the OS when the process dies (a crash, SIGKILL
    included, leaves no stale lock); forked children (loader workers) do not
    keep it. The holder's pid is written into the file for the message a
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
        _HELD_LOCKS.add(fd)
        with naming_a_full_disk(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # closing the last descriptor releases the lock


HASH_KEY = "content_sha256"
"""Where a checkpoint (a key of its dict) and a student export (a metadata field) keep :func:`content_digest`."""


def content_digest(obj: Any) -> str:
    """sha256 (16 hex digits) of what a checkpoint holds: every tensor's dtype, shape and bytes,
    and the plain data around them, dict keys in sorted order. The zip file ``torch.save``
    writes is not checked on load (a flipped bit in a tensor loads silently); this is."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            h.update(f"dict {len(x)};".encode())
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"list {len(x)};".encode())
            for item in x:
                feed(item)
        else:  # str, int, float, bool, None
            h.update(f"{type(x).__name__} {x!r};".encode())

    feed(obj)
    return h.hexdigest()[:16]


def _check_content(path: Path, recorded: str | None, content: Any, what: str) -> None:
    if recorded is not None and recorded != content_digest(content):
        older = "" if path.name != LAST else (
            f"; to resume from an older checkpoint, copy it over {LAST}: "
            f"{', '.join(p.name for p in sorted((path.parent / 'checkpoints').glob('step_*.pt'))) or 'none is left'}"
        )
        raise CheckpointError(
            f"{path}: {what} differ from the content hash recorded when it was written (a damaged copy, bit rot); "
            f"use another checkpoint (a run folder keeps the last ones in checkpoints/) or write it again{older}"
        )


def check_export_content(path: Path, metadata: dict[str, str], weights: dict[str, torch.Tensor]) -> None:
    """Refuse a student export whose weights or metadata differ from the hash it was written with."""
    rest = {k: v for k, v in metadata.items() if k != HASH_KEY}
    _check_content(path, metadata.get(HASH_KEY), {"tensors": weights, "metadata": rest}, "its weights or metadata")


def describe_load_error(exc: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` refused a file, without torch's
    multi-line advice to load it with ``weights_only=False`` (which would run whatever it holds)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return (f"it holds Python objects{f' ({found.group(1)})' if found else ''}, and loading those runs code: mert reads only "
                f"tensors and plain data from such files; it is not a weights file, or it was tampered with")
    return f"{type(exc).__name__}: {next((line for line in text.splitlines() if line.strip()), '')}"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` (with the format and its content hash) atomically."""
    state = {"format": FORMAT, **{k: v for k, v in state.items() if k != HASH_KEY}}
    state[HASH_KEY] = content_digest(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's dict, read with ``weights_only=True`` and checked against its content
    hash (checkpoints written before the hash existed load unchecked).

    Raises:
        CheckpointError: missing, unreadable, not a mert checkpoint, or damaged.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint; pass a run folder holding {LAST} or a .pt file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read checkpoint ({describe_load_error(exc)}); it may be truncated or not a mert checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file (format={state.get('format') if isinstance(state, dict) else type(state).__name__})")
    recorded = state.pop(HASH_KEY, None)
    _check_content(path, recorded, state, "its contents")
    return state


def save_student(student: MertStudent, path: str | Path, config: dict[str, Any] | None = None) -> None:
    """Export the student's weights to safetensors with its builder arguments.

    Args:
        student: a ``MertStudent``.
        path: the ``.safetensors`` file to write.
        config: the run's config as plain data (stored as JSON metadata).
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
    meta = {"format": FORMAT, "model_args": json.dumps(student.args), "config": json.dumps(config or {})}
    meta[HASH_KEY] = content_digest({"tensors": tensors, "metadata": meta})
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def file_digest(path: Path, chunk_bytes: int = 1 << 22, each_chunk=None) -> str:
    """sha256 of a file's content (first 16 hex digits): a stable cache key
    and integrity check.

    Args:
        path: the file.
        chunk_bytes: read size (a multiple of any array item size).
        each_chunk: called with every chunk read, so a caller can check the
            content in the same single pass.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
            if each_chunk is not None:
                each_chunk(chunk)
    return h.hexdigest()[:16]


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[MertStudent, dict[str, Any]]:
    """Load a student for inference from a run folder, a ``.pt`` checkpoint,
    a ``student.safetensors`` export, or a Hugging Face HubertModel folder.

    Returns:
        ``(student, info)``: the ``MertStudent`` in eval mode on ``device``, and
        a dict with ``config`` (plain data, may be empty), ``step`` (or None),
        ``counters`` (a ``.pt``'s audio seconds etc., else absent),
        ``checkpoint_id`` (content hash, stable across copies) and ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist; pass a run folder, a .pt checkpoint, a .safetensors export or a Hugging Face folder")
    if path.is_dir():
        if (path / STUDENT_FILE).exists():
            path = path / STUDENT_FILE
        elif (path / LAST).exists():
            path = path / LAST
        elif (path / "config.json").exists():
            from mert_core.convert import hf_fingerprint, load_hf_hubert

            student = load_hf_hubert(path).to(device).eval()
            return student, {"config": {}, "step": None, "checkpoint_id": hf_fingerprint(path), "path": str(path)}
        else:
            raise CheckpointError(f"{path}: holds neither {STUDENT_FILE}, {LAST} nor a Hugging Face config.json")
    if path.suffix == ".safetensors":
        meta, shapes = _safetensors_header(path)
        if "model_args" not in meta:
            raise CheckpointError(f"{path}: safetensors file without mert model_args metadata; export it with mert_core.checkpoint.save_student")
        args, config = _json_metadata(path, meta, "model_args"), _json_metadata(path, meta, "config", "{}")
        student = _student_for(path, args, shapes)
        try:
            weights = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a file that changed or is damaged past its header
            raise CheckpointError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc}); the file is damaged, export it again") from None
        check_export_content(path, meta, weights)
        check_finite_weights(path, weights)
        student.load_state_dict(weights)
        info = {"config": config, "step": None}
    else:
        state = load_checkpoint(path)
        weights = state.get("student")
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{path}: 'student' is not a dict of tensors; the checkpoint is damaged")
        check_finite_weights(path, weights)
        student = _student_for(path, state.get("model_args"), {k: tuple(v.shape) for k, v in weights.items()})
        student.load_state_dict(weights)
        info = {"config": state.get("config", {}), "step": state.get("step"), "counters": state.get("counters", {})}
    info.update(checkpoint_id=file_digest(path), path=str(path))
    return student.to(device).eval(), info


def check_finite_weights(where: str | Path, weights: dict[str, torch.Tensor], error: type[Exception] = CheckpointError) -> None:
    """Refuse weights holding NaN or inf: every feature they make would be NaN, and a probe
    on NaN features scores about chance without a word.

    Raises:
        ``error``: naming ``where`` and the first tensor that is not finite.
    """
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise error(
            f"{where}: weight {bad[0]!r} holds NaN or infinite values ({len(bad)} of {len(weights)} tensors do); "
            f"the run that wrote it diverged or the file is damaged: use an earlier checkpoint"
        )


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """A safetensors file's metadata and tensor shapes, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every malformed header
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it may be truncated or not a mert export") from None


def _json_metadata(path: Path, meta: dict[str, str], key: str, default: str | None = None) -> Any:
    try:
        return json.loads(meta[key] if default is None else meta.get(key, default))
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({exc}); export the student again with mert") from None


def _student_for(path: Path, args: Any, shapes: dict[str, tuple[int, ...]]):
    """The student ``args`` describe, refused before allocating unless it matches the file's tensor ``shapes``."""
    from mert_core.model import MertStudent

    try:
        return MertStudent.from_args(args, stored_shapes=shapes)
    except ValueError as exc:
        raise CheckpointError(f"{path}: model_args do not match the weights it holds: {exc}") from None


# -- a run folder's checkpoints: rolling back, resuming ----------------------------

def roll_back_to_checkpoint_before(out_dir: Path, first_bad_step: int) -> int | None:
    """Point ``last.pt`` and the student export at the newest checkpoint older
    than ``first_bad_step`` (weights that gave finite outputs), delete the newer
    ones (weights that did not), and return its step. With none older, remove
    ``last.pt`` and the student export too, and return None."""
    ckpt_dir = out_dir / "checkpoints"
    numbered = sorted(ckpt_dir.glob("step_*.pt"))
    good = [p for p in numbered if int(p.stem.removeprefix("step_")) < first_bad_step]
    for p in numbered[len(good):]:
        p.unlink()
    if not good:  # no weights known to give finite outputs: leave none behind to be loaded later
        (out_dir / LAST).unlink(missing_ok=True)
        (out_dir / STUDENT_FILE).unlink(missing_ok=True)
        return None
    state = load_checkpoint(good[-1])
    point_last(out_dir, good[-1], state)
    student = MertStudent.from_args(state["model_args"])
    student.load_state_dict(state["student"])
    save_student(student, out_dir / STUDENT_FILE, state["config"])
    return state["step"]


def point_last(out_dir: Path, numbered: Path, state: dict) -> None:
    """Make ``last.pt`` a hard link to ``numbered``, swapped in atomically."""
    tmp = out_dir / f".{LAST}.link"
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(numbered, tmp)
        os.replace(tmp, out_dir / LAST)
    except OSError:  # filesystems without hard links
        save_checkpoint(state, out_dir / LAST)


@dataclass
class TrainingState:
    """What a training checkpoint holds: everything a resumed run needs to continue bit for bit.

    Written by the trainer (:meth:`as_dict` into :func:`save_checkpoint`), read back by
    :func:`resume_from` (a plain dict: checkpoints of older versions lack the later fields).

    Attributes:
        step: optimizer steps taken.
        config: the run's ``TrainConfig`` as JSON data (fitted teacher files included).
        model_args: the student's builder arguments (``MertStudent.args``).
        student, heads: their state dicts.
        optimizer: the AdamW state dict.
        scaler: the fp16 GradScaler's state dict ({} when not in use).
        rng: every rank's RNG states, in rank order: ``{"torch": [...], "cuda": [...]}``.
        counters: audio seconds, bad steps, elapsed and data-wait seconds, skipped files.
        plugin_versions: distribution -> version of every loaded plugin.
        teacher_hashes: teacher name -> ``config_hash()`` (what made the targets).
        teacher_states: ``training_state()`` of each teacher that follows the student (EMA).
        world_size: ranks that wrote it.
        history: what each ``--resume`` changed, e.g. ``optim.lr``.
        data_stream: every rank's shard-stream state (None for folders: their batches are a
            function of the step).
    """

    step: int
    config: dict[str, Any]
    model_args: dict[str, Any]
    student: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, list[torch.Tensor]]
    counters: dict[str, Any]
    plugin_versions: dict[str, str]
    teacher_hashes: dict[str, str]
    teacher_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    world_size: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    data_stream: list | None = None

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint's dict (no copies of the tensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


RESUMABLE_FIELDS: dict[str, Literal["new", "saved"]] = {
    # init_from only starts a run: a resume takes the weights from the checkpoint and keeps the recorded source
    "model.init_from": "saved",
    "model.init_from_hash": "saved",
    # how a step runs, not what it computes
    "model.activation_checkpointing": "new",
    "compile": "new",
    "data.num_workers": "new",
    "device": "new",
    # the peak lr may change (the non-finite stop advises lowering it), recorded in the run's history
    "optim.lr": "new",
    "optim.max_steps": "new",
    "log_every": "new",
    "checkpoint_every": "new",
    "keep_checkpoints": "new",
    "max_bad_steps": "new",
    "max_scale_growth": "new",
    "out_dir": "new",  # a run folder copied or moved elsewhere resumes there
}
"""Config fields a ``--resume`` may change (any other change is refused), and whose value the
resumed run uses: ``"new"``, the one given now, or ``"saved"``, the checkpoint's (the change is
accepted and recorded in the history, not applied)."""


def resume_config(config: TrainConfig, state: dict, out_dir: Path) -> tuple[TrainConfig, dict[str, list]]:
    """The saved config with the :data:`RESUMABLE_FIELDS` that take the ``"new"`` value from
    ``config``, and every change as ``{field: [saved, new]}``.

    Raises:
        ConfigError: a field outside :data:`RESUMABLE_FIELDS` differs.
    """
    from mert_core.runconfig import with_named_data_paths

    # runs saved before the demo default was resolved in the config recorded no data paths: the demo's
    saved = _moved(with_named_data_paths(TrainConfig.model_validate(state["config"])), Path(config.out_dir))
    new, old = _flatten(config.model_dump(mode="json")), _flatten(saved.model_dump(mode="json"))
    # a teacher fitted by the first run has its artifact recorded in the saved config only
    for flat, given in ((old, new), (new, old)):
        for saved_t, given_t in zip(flat.get("teachers", []), given.get("teachers", [])):
            if teacher_file_of(given_t["options"]) is None:
                saved_t["options"] = without_teacher_file(saved_t["options"])
    changed = {}
    for key in sorted(set(new) | set(old)):
        if new.get(key) != old.get(key) and key in RESUMABLE_FIELDS:
            changed[key] = [old.get(key), new.get(key)]
        elif new.get(key) != old.get(key):
            raise ConfigError(
                f"--resume: config field {key!r} is {new.get(key)!r} but the run in {out_dir} used {old.get(key)!r}; "
                f"resume with the same settings or use a new --out"
            )
    return _with_fields(saved, config, [key for key, use in RESUMABLE_FIELDS.items() if use == "new"]), changed


def _with_fields(saved: TrainConfig, given: TrainConfig, keys: list[str]) -> TrainConfig:
    """``saved`` with the fields ``keys`` (``"field"`` or ``"section.field"``) taken from ``given``."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, _, name = key.rpartition(".")
        if section:
            sections.setdefault(section, {})[name] = getattr(getattr(given, section), name)
        else:
            top[name] = getattr(given, name)
    top.update({section: getattr(saved, section).model_copy(update=values) for section, values in sections.items()})
    return saved.model_copy(update=top)


def resume_from(out_dir: Path, config: TrainConfig) -> tuple[dict[str, Any], TrainConfig, list[dict], str]:
    """Read ``out_dir/last.pt`` for a ``--resume`` of ``config``.

    Returns:
        The checkpoint (a :class:`TrainingState` dict), the config to run (:func:`resume_config`),
        the run's history with this resume's changes appended, and a line saying so.
    """
    state = load_checkpoint(out_dir / LAST)
    config, changed = resume_config(config, state, out_dir)
    history = list(state.get("history", [])) + ([{"resumed_at_step": state["step"], "changed": changed}] if changed else [])
    message = (f"resuming from {out_dir / LAST} at step {state['step']}"
               + "".join(f"; {k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    return state, config, history, message


def restore_training(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler,
                     teachers: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Put a checkpoint's weights (``model``: student and heads as ``student.`` / ``heads.``),
    optimizer, scaler and teacher training states back; return its step and counters."""
    model.load_state_dict({**_prefixed("student.", state["student"]), **_prefixed("heads.", state["heads"])})
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    for name, teacher in teachers.items():  # e.g. the EMA teacher's weights
        teacher.load_training_state(state.get("teacher_states", {}).get(name, {}))
    return state["step"], state["counters"]


def restore_rng(state: dict[str, Any], rank: int, device: torch.device) -> None:
    """Continue this rank's RNG streams where the checkpoint left them (a checkpoint written
    by fewer ranks hands rank ``r`` the state of rank ``r % world_size``)."""
    rng = state["rng"]
    torch.set_rng_state(rng["torch"][rank % len(rng["torch"])])
    if device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state(rng["cuda"][rank % len(rng["cuda"])])


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _moved(saved: TrainConfig, out_dir: Path) -> TrainConfig:
    """``saved`` with the teacher files its run fitted into its folder found in ``out_dir``,
    where the folder is now (copied or moved); ``out_dir`` itself is compared as a change."""
    old = Path(saved.out_dir)
    if old == out_dir:
        return saved
    saved = saved.model_copy(deep=True)
    for tc in saved.teachers:
        fitted = teacher_file_of(tc.options)
        if fitted is not None and Path(fitted).is_relative_to(old):
            tc.options = with_teacher_file(tc.options, out_dir / Path(fitted).relative_to(old))
    return saved


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
