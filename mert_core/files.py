"""Writing files so that a crash leaves the old version or the new one, never
half a file: one home for atomic writes (a leaf module: standard library only).

- :func:`atomic_write`: one file, written under a temporary name, fsynced, renamed.
- :func:`publish_folder`: a folder written under a temporary name, renamed into place.
- :func:`naming_a_full_disk`: a full disk reported with the file that could not be written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

# atomic_write's temporary names: "." + target name + "." + mkstemp's 8 random characters + ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


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
    except Exception as exc:
        if _disk_full(exc, path.parent):  # torch.save says only "unexpected pos", safetensors "I/O error"
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def naming_a_full_disk(path: Path) -> Iterator[None]:
    """Re-raise a full disk met in the block as ENOSPC naming ``path``, for writers that report it
    without a file name (a plain ``write``, TensorBoard's event writer)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and _disk_full(exc, Path(path).parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        raise


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for lack of space (checked while the partial file still fills the disk)."""
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


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


def publish_folder(tmp: Path, final: Path, replace: bool = True) -> bool:
    """Rename the finished folder ``tmp`` to ``final``.

    With ``replace``, a folder already at ``final`` is first moved aside (so a
    crash leaves one of the two) and deleted once ``tmp`` is in place.

    Returns:
        False if ``final`` could not be taken (another process published its
        own copy meanwhile); ``tmp`` is then left for the caller to use or remove.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if replace and final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        try:
            os.replace(final, old / "d")
        except OSError:
            pass  # someone else replaced it meanwhile
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        return False
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
