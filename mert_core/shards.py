"""Audio corpora as WebDataset tar shards: packing, listing, and reading members.

A corpus that outgrows a folder lives in object storage as tar shards, read
sequentially (one request per shard) instead of one seek per crop. The shards
are plain WebDataset tars: each *member* (a WebDataset sample) is the entries
sharing a key, here ``<key>.<ext>`` (the audio, in its original encoding or
FLAC) and ``<key>.json`` (duration, sample rate, source path). ``index.json``
beside them lists every shard with its member count, bytes and seconds.

* :func:`pack_shards` writes a corpus (``mert data pack``).
* :func:`open_corpus` resolves what ``--data`` names (an ``index.json``, a folder
  holding one, a WebDataset brace pattern ``shard-{000000..000099}.tar``, or
  single ``.tar`` shards) to a :class:`ShardCorpus`, through ``fsspec``: local
  paths, ``file://``, ``https://``, ``s3://`` (with ``s3fs``), ``gs://`` (with
  ``gcsfs``).
* :func:`read_members` streams one shard's members from any byte offset, with
  retries; the trainer's stream (:mod:`mert_core.streaming`) and sharded label
  stores are built on it.
* :func:`local_sample` fetches a bounded, seeded sample of whole shards into the
  cache, for teacher fits that read files.

Tar entries are read with the standard library's ``tarfile`` in stream mode
rather than WebDataset's iterators because the trainer's exact resume needs
each member's byte offset (to start a shard in the middle without reading it
from the start), which WebDataset's iterators do not expose; members are
grouped by key exactly as WebDataset groups them
(``webdataset.tariterators.base_plus_ext``), and shards are written with
``webdataset.TarWriter``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from mert_core.audio import AUDIO_EXTENSIONS, AudioError, audio_info
from mert_core.errors import ShardError  # noqa: F401 - re-exported: raised here, imported from here
from mert_core.paths import cache_root

log = logging.getLogger("mert.shards")

FORMAT = "mert-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
AUDIO_FIELDS = tuple(e.lstrip(".") for e in AUDIO_EXTENSIONS)
"""Member entries read as audio (the entry's extension): the first one a member holds is used."""
_BRACE = re.compile(r"\{[^{}]*\.\.[^{}]*\}")


def parse_size(text: str | int) -> int:
    """``"1GB"`` -> 1_000_000_000 bytes (also KB, MB, GB, TB, KiB, MiB, GiB, TiB, or a plain number)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ShardError(f"shard size {text!r}: expected a number of bytes with an optional unit, e.g. 1GB, 500MB, 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise ShardError(f"shard size {text!r}: must be at least one byte")
    return size


# ---------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------


def is_url(spec: str | Path) -> bool:
    return "://" in str(spec)


def is_remote_or_pattern(spec: str | Path) -> bool:
    """A URL or a brace pattern: nothing that can be checked with a local stat."""
    return is_url(spec) or bool(_BRACE.search(str(spec)))


def is_shard_source(spec: str | Path) -> bool:
    """Whether ``--data`` names shards: a URL, an ``index.json``, a folder holding one,
    a brace pattern or a ``.tar`` file (anything else is a folder, manifest or audio file)."""
    s = str(spec)
    if is_remote_or_pattern(s) or s.endswith((".tar", ".tar.gz", ".tgz")) or posixpath.basename(s) == INDEX_FILE:
        return True
    return os.path.isdir(s) and os.path.isfile(os.path.join(s, INDEX_FILE))


def _filesystem(url: str, timeout_seconds: float | None = None):
    """``(fsspec filesystem, path)`` for ``url``, with connect and read timeouts where the protocol has them."""
    import fsspec

    protocol = fsspec.utils.get_protocol(url)
    options: dict[str, Any] = {}
    if timeout_seconds is not None and protocol in ("http", "https"):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_seconds, sock_read=timeout_seconds)}
    elif timeout_seconds is not None and protocol in ("s3", "s3a"):
        options["config_kwargs"] = {"connect_timeout": timeout_seconds, "read_timeout": timeout_seconds}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise ShardError(f"{url}: reading {protocol}:// needs a package that is not installed ({exc}); "
                         f"e.g. pip install 'mert-toolkit[s3]' for s3://, gcsfs for gs://") from None


def _join(base: str, name: str) -> str:
    if is_url(name) or os.path.isabs(name):
        return name
    return posixpath.join(base, name) if is_url(base) else os.path.join(base, name)


def shard_name(url: str) -> str:
    """The shard's file name (what label stores and fit samples key it by)."""
    return posixpath.basename(url.rstrip("/"))


def member_id(url: str, key: str) -> str:
    """How a member is named in batches and skip lists: ``<shard url>#<key>``."""
    return f"{url}#{key}"


def stored_member_name(member: str) -> str:
    """A member id as label stores key it, ``<shard file name>#<key>``: the same
    whichever address (a local path, https://, s3://) the shards were read from."""
    url, sep, key = member.partition(".tar#")
    if not sep:
        raise ValueError(f"{member!r} is not a shard member id (<shard url>.tar#<key>)")
    return f"{shard_name(url + '.tar')}#{key}"


# ---------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------


@dataclass
class ShardCorpus:
    """The shards a run reads, in a fixed order.

    Attributes:
        urls: every shard, as fsspec addresses.
        specs: what was given (``--data``).
        members: member count per shard, when an ``index.json`` says so (else None).
        seconds: audio seconds per shard, when an ``index.json`` says so (else None).
    """

    urls: list[str]
    specs: list[str]
    members: list[int] | None = None
    seconds: list[float] | None = None

    @property
    def names(self) -> list[str]:
        return [shard_name(u) for u in self.urls]

    @property
    def hours(self) -> float | None:
        return None if self.seconds is None else sum(self.seconds) / 3600

    def describe(self) -> str:
        what = f"{len(self.urls)} shards"
        if self.members is not None:
            what += f", {sum(self.members)} members"
        if self.seconds is not None:
            what += f", {self.hours:.2f} h"
        return f"{what} from {', '.join(self.specs)}"


def open_corpus(specs: Iterable[str | Path], check: bool = True) -> ShardCorpus:
    """Resolve ``specs`` (index files, folders holding one, brace patterns, ``.tar`` shards) to one corpus.

    Args:
        specs: what ``--data`` gave; every one must name shards.
        check: make sure the first and last shard of each spec exist (a typo in
            a URL or a brace range is an error now, not skipped shards later).

    Raises:
        ShardError: a spec names nothing, an index is malformed, two shards share a file name.
    """
    specs = [str(s) for s in specs]
    if not specs:
        raise ShardError("no shard sources given; pass an index.json, a brace pattern or .tar shards")
    urls: list[str] = []
    members: list[int] | None = []
    seconds: list[float] | None = []
    for spec in specs:
        if not is_shard_source(spec):
            raise ShardError(f"{spec}: a folder, manifest or audio file among shard sources; train on shards or on files, not both")
        if spec.endswith((".tar.gz", ".tgz")):
            raise ShardError(f"{spec}: compressed shards cannot be entered mid-way; repack them with `mert data pack` (audio is compressed already)")
        index_url = _index_url(spec)
        if index_url is not None:
            entries = _read_index(index_url)
            base = posixpath.dirname(index_url) if is_url(index_url) else os.path.dirname(index_url)
            found = [_join(base, e["name"]) for e in entries]
            members = None if members is None else members + [int(e["members"]) for e in entries]
            seconds = None if seconds is None else seconds + [float(e["seconds"]) for e in entries]
        else:
            found = _expand(spec)
            members = seconds = None
        if check:
            for url in dict.fromkeys([found[0], found[-1]]):
                _check_exists(url, spec, len(found))
        urls += found
    names: dict[str, str] = {}
    for url in urls:
        other = names.setdefault(shard_name(url), url)
        if other != url:
            raise ShardError(f"two shards are named {shard_name(url)} ({other} and {url}); shards are keyed by file name: rename one")
    return ShardCorpus(urls=urls, specs=specs, members=members or None, seconds=seconds or None)


def _index_url(spec: str) -> str | None:
    if posixpath.basename(spec) == INDEX_FILE:
        return spec if is_url(spec) else os.path.abspath(spec)
    if not is_url(spec) and os.path.isdir(spec):
        return os.path.join(os.path.abspath(spec), INDEX_FILE)
    return None


def _expand(spec: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    if not urls:
        raise ShardError(f"{spec}: the pattern expands to no shard")
    bad = [u for u in urls if not u.endswith(".tar")]
    if bad:
        raise ShardError(f"{spec}: {bad[0]} is not a .tar shard; name .tar shards, an index.json or a folder holding one")
    return [u if is_url(u) else os.path.abspath(u) for u in urls]


def _read_index(url: str) -> list[dict[str, Any]]:
    fs, path = _filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            index = json.loads(f.read())
    except FileNotFoundError:
        raise ShardError(f"{url}: no such shard index; check the address (`mert data pack` writes {INDEX_FILE} beside the shards)") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{url}: cannot read the shard index ({_one_line(exc)})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ShardError(f"{url}: not a shard index (expected a JSON object with a 'shards' list, as `mert data pack` writes)")
    if index.get("format") not in (None, FORMAT) or index.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ShardError(f"{url}: format {index.get('format')!r} version {index.get('format_version')!r}; "
                         f"this mert reads {FORMAT!r} up to version {FORMAT_VERSION}")
    entries = index["shards"]
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not {"members", "seconds"} <= e.keys():
            raise ShardError(f"{url}: shards[{i}] lacks 'name', 'members' or 'seconds'; the index is damaged, pack again")
    if not entries:
        raise ShardError(f"{url}: the index lists no shards; pack some audio first")
    return entries


def _check_exists(url: str, spec: str, count: int) -> None:
    fs, path = _filesystem(url, timeout_seconds=30)
    try:
        fs.info(path)  # a HEAD request over HTTP and S3 (fsspec's exists() GETs over HTTP)
    except FileNotFoundError:
        raise ShardError(f"{spec}: no shard at {url} (one of {count}); check the address, the brace range or the index") from None
    except _read_errors() as exc:  # an unreachable host, refused credentials
        raise ShardError(f"{spec}: cannot reach {url} ({_one_line(exc)})") from None


# ---------------------------------------------------------------------------
# Reading members
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadPolicy:
    """How hard to try before a shard (or the rest of it) is skipped.

    Attributes:
        retries: new attempts after a failed request or a broken tar stream,
            each from the first member not yet read.
        retry_seconds: wait before the first retry; doubles each time.
        timeout_seconds: connect and read timeout of a request (HTTP, S3).
    """

    retries: int = 3
    retry_seconds: float = 1.0
    timeout_seconds: float = 60.0


@dataclass
class Member:
    """One WebDataset sample of a shard: its entries by extension.

    Attributes:
        url: the shard.
        key: the WebDataset key (entry names up to the first dot).
        index: its position in the shard, counted from where reading started.
        offset: byte offset of its first tar header in the shard.
        end: byte offset just past its last entry (where the next member starts).
        entries: extension (lower case) -> bytes.
    """

    url: str
    key: str
    index: int
    offset: int
    end: int
    entries: dict[str, bytes] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return member_id(self.url, self.key)

    def audio(self) -> tuple[str, bytes]:
        """``(extension, bytes)`` of its audio entry.

        Raises:
            AudioError: it holds no audio entry.
        """
        for ext, data in self.entries.items():
            if ext.rsplit(".", 1)[-1] in AUDIO_FIELDS:
                return ext, data
        raise AudioError(f"{self.id}: no audio entry (has {', '.join(sorted(self.entries)) or 'nothing'}; "
                         f"expected one of {', '.join(AUDIO_FIELDS)})")

    def is_audio(self) -> bool:
        """False for a file packed beside the audio (``mert data pack --all-files``), which training skips."""
        return self.metadata().get("audio", True) is not False

    def metadata(self) -> dict[str, Any]:
        """Its ``.json`` entry (``{}`` if none or unreadable)."""
        try:
            meta = json.loads(self.entries.get("json", b"{}"))
        except ValueError:
            return {}
        return meta if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class Skipped:
    """Members that could not be read: ``what`` names the shard and member, ``reason`` says why."""

    url: str
    what: str
    reason: str



def audio_members(url: str, skipped: dict[str, str], policy: ReadPolicy = ReadPolicy()):
    """``(member, ext, bytes)`` of each audio member of shard ``url``; what cannot be read
    (a failed request, a member without a readable audio entry) goes into ``skipped``."""
    for item in read_members(url, policy=policy):
        if isinstance(item, Skipped):
            skipped[item.what] = item.reason
        elif item.is_audio():
            try:
                ext, data = item.audio()
            except AudioError as exc:
                skipped[item.id] = str(exc)
                continue
            yield item, ext, data

def read_members(url: str, offset: int = 0, first_index: int = 0, policy: ReadPolicy = ReadPolicy()) -> Iterator[Member | Skipped]:
    """The members of shard ``url`` from byte ``offset`` (a member's first header, or 0) to its end.

    A failed request, a timeout, an HTTP error or a broken tar stream (a
    truncated shard) is retried ``policy.retries`` times with doubling waits,
    each time from the first member not yet yielded. If it still fails, one
    :class:`Skipped` names the member where it failed (the rest of the shard is
    not read) and the iteration ends; the caller goes on with the next shard.
    A shard that is not there is skipped at once (a retry cannot help).

    Yields:
        :class:`Member` in shard order (``index`` counting from ``first_index``),
        and at most one :class:`Skipped`, last.
    """
    index, attempt, last_key = first_index, 0, None
    while True:
        cursor = _Cursor()
        try:
            with _open_at(url, offset, policy.timeout_seconds) as stream:
                for member in _members(stream, url, offset, index, cursor):
                    yield member
                    offset, index, last_key, attempt = member.end, index + 1, member.key, 0
            return
        except FileNotFoundError as exc:
            yield Skipped(url, url, f"shard not found ({_one_line(exc)})")
            return
        except _read_errors() as exc:
            attempt += 1
            where = f"member {cursor.key}" if cursor.key else (f"after member {last_key}" if last_key else "its start")
            if attempt > policy.retries:
                yield Skipped(url, member_id(url, cursor.key) if cursor.key else url,
                              f"cannot read the shard at {where} after {policy.retries} retries ({_one_line(exc)}); "
                              f"the rest of this shard was skipped")
                return
            wait = policy.retry_seconds * 2 ** (attempt - 1)
            log.warning("%s: read failed at %s (%s); retry %d of %d in %.1f s", url, where, _one_line(exc), attempt, policy.retries, wait)
            time.sleep(wait)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a failed fetch or a broken tar stream raises (not a bug in mert: those keep their traceback)."""
    errors: list[type[BaseException]] = [OSError, EOFError, tarfile.TarError, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:
        pass
    return tuple(errors)


class _open_at:
    """A binary stream of shard ``url`` from byte ``offset``: one streaming GET
    with a Range header over HTTP; an fsspec file with read-ahead elsewhere."""

    def __init__(self, url: str, offset: int, timeout_seconds: float | None):
        from fsspec.implementations.http import HTTPFileSystem

        fs, path = _filesystem(url, timeout_seconds)
        if isinstance(fs, HTTPFileSystem):
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            # a size given, fsspec opens the stream without its HEAD request first: one round trip
            # less per shard, and a HEAD answered 5xx would read as FileNotFoundError (not retried)
            self.file = fs.open(path, "rb", block_size=0, size=-1, headers=headers)
            if offset and self.file.r.status != 206:
                # the server ignored the range (python -m http.server does): read up to the offset
                log.info("%s: the server does not serve byte ranges; reading %d bytes to reach the member", url, offset)
                _discard(self.file, offset)
        else:
            self.file = fs.open(path, "rb", block_size=1 << 23)
            self.file.seek(offset)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, *exc) -> None:
        self.file.close()


def _discard(stream: BinaryIO, count: int) -> None:
    while count > 0:
        got = stream.read(min(count, 1 << 20))
        if not got:
            raise EOFError(f"the shard ended {count} bytes before the member to resume at")
        count -= len(got)


@dataclass
class _Cursor:
    key: str | None = None  # the member whose entries are being read


class _Counted:
    """A read-only stream that reads ahead in 1 MiB requests and counts the bytes handed out.

    tarfile reads 10 KiB at a time; an fsspec HTTP stream pays a hop to its
    event loop per read, so the read-ahead saves ~100 hops per MiB."""

    CHUNK = 1 << 20

    def __init__(self, stream: BinaryIO):
        self.stream, self.count = stream, 0
        self.buffer, self.at = b"", 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            out = self.buffer[self.at :] + self.stream.read()
            self.buffer, self.at = b"", 0
        else:
            while len(self.buffer) - self.at < size:
                more = self.stream.read(max(self.CHUNK, size))
                if not more:
                    break
                self.buffer, self.at = self.buffer[self.at :] + more, 0
            out = self.buffer[self.at : self.at + size]
            self.at += len(out)
        self.count += len(out)
        return out


def _members(stream: BinaryIO, url: str, base: int, first_index: int, cursor: _Cursor) -> Iterator[Member]:
    """Group the tar entries of ``stream`` (which starts at byte ``base`` of the shard) into members.

    ``cursor.key`` names the member being read (for error messages). Skips
    WebDataset's ``__*__`` metadata and what is not a regular file.

    Raises:
        tarfile.ReadError: an entry or the end-of-archive block is cut short (a truncated shard).
    """
    from webdataset.tariterators import base_plus_ext

    counted = _Counted(stream)
    try:
        tar = tarfile.open(fileobj=counted, mode="r|")
    except tarfile.ReadError as exc:
        if counted.count == 0:
            raise tarfile.ReadError(f"nothing at byte {base} of the shard (truncated)") from None
        raise tarfile.ReadError(f"not a tar stream at byte {base} ({exc})") from None
    current: Member | None = None
    index = first_index
    for info in tar:
        if not info.isreg():
            continue
        prefix, suffix = base_plus_ext(info.name)
        if prefix is None or posixpath.basename(prefix).startswith("__"):
            continue
        if current is not None and prefix != current.key:
            yield current
            index, current = index + 1, None
        if current is None:
            current = Member(url, prefix, index, base + info.offset, base + info.offset)
            cursor.key = prefix
        data = tar.extractfile(info).read()
        if len(data) != info.size:
            raise tarfile.ReadError(f"entry {info.name} holds {len(data)} of its {info.size} bytes (truncated)")
        current.entries[suffix.lower()] = data
        current.end = base + info.offset_data + _padded(info.size)
        tar.members = []  # stream mode keeps every header otherwise
    if current is not None:
        yield current  # every entry of it was read whole
    cursor.key = None
    # tarfile ends quietly where a header is cut short or missing: a complete
    # shard has a zero block there (the end-of-archive marker)
    while counted.read(_Counted.CHUNK):
        pass
    if counted.count < tar.offset + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"the shard ends at byte {base + counted.count} without its end-of-archive block (truncated)")


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


# ---------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------


@dataclass
class PackSummary:
    """What :func:`pack_shards` wrote."""

    out: str
    shards: int
    members: int
    hours: float
    bytes: int
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)


def pack_shards(inputs: Iterable[str | Path], out: str | Path, shard_bytes: int | str = 10**9, encoding: str = "original",
                seed: int | None = 0, all_files: bool = False, overwrite: bool = False, progress: bool = True) -> PackSummary:
    """Write the audio under ``inputs`` as WebDataset tar shards plus ``index.json``.

    Every usable file becomes one member: ``<key>.<ext>`` (its bytes as they
    are, or FLAC) and ``<key>.json`` (``source``, ``path`` relative to its input
    folder, ``duration_seconds``, ``sample_rate``, ``frames``, ``encoding``);
    keys are zero-padded numbers. A shard is closed before the member that
    would take it past ``shard_bytes`` (a bigger member gets a shard of its
    own). ``index.json`` is written last: a folder without it is an unfinished pack.

    Args:
        inputs: folders, manifests or audio files (as :func:`mert_core.data.scan_audio` reads).
        out: a local folder or an fsspec URL (``s3://bucket/corpus``).
        shard_bytes: target shard size (``"1GB"`` or bytes).
        encoding: ``original`` (the files' own bytes) or ``flac`` (decoded and
            re-encoded losslessly: 16-bit sources as 16-bit, deeper ones as 24-bit).
        seed: files are packed in a seeded random order, so that a shard mixes
            the corpus instead of holding one album (None: path order).
        all_files: also pack every other file under the input folders (labels,
            metadata: a whole dataset, for :func:`fetched_tree`), each as
            ``<key>.file`` with ``"audio": false`` in its ``.json``; training ignores them.
        overwrite: replace an existing pack at ``out``.
        progress: show a progress bar.

    Raises:
        ShardError: nothing to pack, or ``out`` already holds a pack.
    """
    from webdataset import TarWriter

    from mert_core.data import scan_audio

    started = time.perf_counter()
    if encoding not in ("original", "flac"):
        raise ShardError(f"encoding {encoding!r}: expected 'original' or 'flac'")
    limit = parse_size(shard_bytes)
    manifest = scan_audio(inputs, progress=progress)
    files = manifest.files
    if not files:
        raise ShardError(f"nothing to pack in {', '.join(map(str, inputs))}: {len(manifest.skipped)} unreadable files, no usable one")
    out = str(out) if is_url(out) else os.path.abspath(out)
    fs, root = _filesystem(out)
    if fs.exists(posixpath.join(root, INDEX_FILE)) and not overwrite:
        raise ShardError(f"{out}: already holds a pack ({INDEX_FILE}); pass overwrite=True (--overwrite) or choose another place")
    fs.makedirs(root, exist_ok=True)
    folders = [os.path.abspath(p) for p in inputs if os.path.isdir(p)]
    others = _other_files(folders, manifest) if all_files else []
    items: list = [*files, *others]
    order = range(len(items)) if seed is None else np.random.default_rng(seed).permutation(len(items))
    skipped = dict(manifest.skipped)
    shards: list[dict[str, Any]] = []
    writer, shard, total_bytes = None, None, 0
    for n, i in enumerate(tqdm(order, desc=f"packing into {out}", unit="file", disable=not progress)):
        f = items[i]
        path = f if isinstance(f, str) else f.path
        meta: dict[str, Any] = {"source": path, "path": _relative(path, folders)}
        try:
            if isinstance(f, str):
                ext, data, seconds = "file", Path(f).read_bytes(), 0.0
                meta["audio"] = False
            else:
                (ext, data), seconds = _member_audio(f.path, encoding), f.duration_seconds
                meta.update(duration_seconds=seconds, sample_rate=f.sample_rate, frames=f.frames, encoding=encoding)
        except (OSError, AudioError) as exc:
            skipped[path] = _one_line(exc)
            continue
        entries = {ext: data, "json": json.dumps(meta).encode()}
        size = sum(tarfile.BLOCKSIZE + _padded(len(v)) for v in entries.values())
        if shard is None or (shard["bytes"] + size > limit and shard["members"]):
            if writer is not None:
                writer.close()
            shard = {"name": SHARD_NAME.format(len(shards)), "members": 0, "bytes": 0, "seconds": 0.0}
            shards.append(shard)
            writer = _ShardFile(fs, posixpath.join(root, shard["name"]), TarWriter)
        writer.tar.write({"__key__": f"{n:09d}", **entries})
        shard["members"] += 1
        shard["bytes"] += size
        shard["seconds"] += seconds
        total_bytes += size
    if writer is not None:
        writer.close()
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoding": encoding,
        "shards": shards,
        "total_members": sum(s["members"] for s in shards),
        "total_hours": sum(s["seconds"] for s in shards) / 3600,
        "skipped": skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_bytes(fs, posixpath.join(root, INDEX_FILE), json.dumps(index, indent=1).encode())
    return PackSummary(out=out, shards=len(shards), members=index["total_members"], hours=index["total_hours"],
                       bytes=total_bytes, seconds=time.perf_counter() - started, skipped=skipped)


def _other_files(folders: list[str], manifest) -> list[str]:
    """Regular files under ``folders`` that are neither audio the scan used nor audio it skipped."""
    audio = {f.path for f in manifest.files} | set(manifest.skipped)
    found = []
    for folder in folders:
        for parent, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(parent, name)
                if path not in audio and not name.lower().endswith(AUDIO_EXTENSIONS) and os.path.isfile(path):
                    found.append(path)
    return sorted(found)


def _relative(path: str, folders: list[str]) -> str:
    """``path`` relative to the input folder holding it (its name alone if none does)."""
    for folder in folders:
        if path.startswith(folder.rstrip(os.sep) + os.sep):
            return os.path.relpath(path, folder).replace(os.sep, "/")
    return os.path.basename(path)


def _member_audio(path: str, encoding: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a file as a member: its own bytes, or FLAC."""
    if encoding == "original":
        return Path(path).suffix.lower().lstrip("."), Path(path).read_bytes()
    info = sf.info(path)
    subtype = "PCM_16" if info.subtype in ("PCM_S8", "PCM_U8", "PCM_16", "ULAW", "ALAW", "VORBIS", "OPUS", "MPEG_LAYER_III") else "PCM_24"
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        buffer = io.BytesIO()
        sf.write(buffer, data, sr, format="FLAC", subtype=subtype)
    except (RuntimeError, ValueError, sf.LibsndfileError) as exc:
        raise AudioError(f"{path}: cannot re-encode as FLAC ({_one_line(exc)})") from None
    return "flac", buffer.getvalue()


class _ShardFile:
    """One shard being written: locally under a temporary name renamed when
    closed (a killed pack leaves no half shard under a shard's name); to other
    filesystems straight to the destination (an S3 upload completes on close)."""

    def __init__(self, fs, path: str, tar_writer):
        from fsspec.implementations.local import LocalFileSystem

        self.fs, self.path = fs, path
        self.local_tmp = f"{path}.tmp-{os.getpid()}" if isinstance(fs, LocalFileSystem) else None
        self.file = fs.open(self.local_tmp or path, "wb")
        self.tar = tar_writer(self.file, encoder=False, mtime=0)

    def close(self) -> None:
        self.tar.close()
        self.file.close()
        if self.local_tmp is not None:
            os.replace(self.local_tmp, self.path)


def _write_bytes(fs, path: str, data: bytes) -> None:
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        from mert_core.files import atomic_write

        atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))
    else:
        fs.pipe_file(path, data)


# ---------------------------------------------------------------------------
# A local sample for fits that read files
# ---------------------------------------------------------------------------


def local_sample(inputs: Iterable[str | Path], hours: float | None, fraction: float = 1.0, seed: int = 0,
                 cache_dir: str | Path | None = None, policy: ReadPolicy = ReadPolicy()) -> list[str | Path]:
    """``inputs`` with every shard source replaced by local folders holding a seeded sample of whole shards.

    Shards are taken in a seeded order until they hold ``hours`` of audio, or
    ``fraction`` of the corpus where the index gives its hours (all shards when
    neither bounds it), fetched once into ``$MERT_CACHE/shard-samples/`` (one
    folder per shard, reused by the next fit) and their audio members written
    there as files. Folders, manifests and audio files among ``inputs`` are
    returned as they are.

    Args:
        inputs: what ``--data`` gave.
        hours: audio to fetch at least (the fit's own sample bound); None: no bound.
        fraction: of the corpus's hours to fetch at least.
        seed: the shard order.
        cache_dir: instead of ``$MERT_CACHE``.
        policy: retries of a failing shard.
    """
    inputs = list(inputs)
    specs = [str(p) for p in inputs if is_shard_source(p)]
    if not specs:
        return inputs
    corpus = open_corpus(specs)
    if corpus.hours is not None and fraction < 1:
        hours = min(hours if hours is not None else corpus.hours, fraction * corpus.hours)
    root = cache_root(cache_dir) / "shard-samples"
    order = np.random.default_rng(seed).permutation(len(corpus.urls))
    folders: list[str | Path] = []
    have = 0.0
    for i in order:
        if hours is not None and have >= hours * 3600:
            break
        folder, seconds = _fetched_shard(corpus.urls[int(i)], root, policy)
        folders.append(folder)
        have += seconds
    log.info("fit sample: %d of %d shards fetched (%.2f h) into %s", len(folders), len(corpus.urls), have / 3600, root)
    return [p for p in inputs if not is_shard_source(p)] + folders


def _fetched_shard(url: str, root: Path, policy: ReadPolicy) -> tuple[Path, float]:
    """The folder holding shard ``url``'s audio members as files, fetched if not yet; and its audio seconds."""
    from mert_core.files import publish_folder

    folder = root / f"{shard_name(url)}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    done = folder / "fetched.json"
    if done.is_file():
        return folder, json.loads(done.read_text())["seconds"]
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    seconds, skipped = 0.0, {}
    for item, ext, data in audio_members(url, skipped, policy=policy):
        target = tmp / f"{_safe_name(item.key)}.{ext}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        try:
            seconds += audio_info(target).duration_seconds
        except AudioError:
            pass  # the fit's scan lists it as unreadable
    for what, reason in skipped.items():
        log.warning("fit sample: skipped %s: %s", what, reason)
    (tmp / "fetched.json").write_text(json.dumps({"url": url, "seconds": seconds, "skipped": skipped}))
    if not publish_folder(tmp, folder, replace=False):  # another process fetched it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, seconds


def _safe_name(key: str) -> str:
    """A member key as a relative file path inside the sample folder (no absolute parts, no ``..``)."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "member"


# ---------------------------------------------------------------------------
# A dataset packed whole, back as a folder (evaluation tasks)
# ---------------------------------------------------------------------------


def fetched_tree(source: str | Path, cache_dir: str | Path | None = None, policy: ReadPolicy = ReadPolicy()) -> Path:
    """The files of a pack, fetched once into ``$MERT_CACHE/shard-trees/`` at their packed paths.

    For datasets that tools read as folders (an evaluation task's ``data_dir``):
    pack them with ``mert data pack --all-files`` so that their labels travel
    with the audio; each member is written at the ``path`` its ``.json`` records
    (relative to the packed folder), audio in its packed encoding. Fetched once
    per shard list, then reused.

    Raises:
        ShardError: the source names nothing, or a member could not be fetched
            (a dataset with holes would score differently).
    """
    from mert_core.files import publish_folder

    corpus = open_corpus([source])
    root = cache_root(cache_dir) / "shard-trees"
    folder = root / hashlib.sha256("\n".join(corpus.urls).encode()).hexdigest()[:16]
    if (folder / ".fetched.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    members = 0
    for url in corpus.urls:
        for item in read_members(url, policy=policy):
            if isinstance(item, Skipped):
                shutil.rmtree(tmp, ignore_errors=True)
                raise ShardError(f"{source}: cannot fetch {item.what} ({item.reason}); the dataset would be incomplete")
            entries = {k: v for k, v in item.entries.items() if k != "json"}
            if not entries:
                continue
            ext, data = next(iter(entries.items()))
            target = tmp / _safe_name(item.metadata().get("path") or f"{item.key}.{ext}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            members += 1
    (tmp / ".fetched.json").write_text(json.dumps({"source": str(source), "shards": corpus.urls, "members": members}))
    if not publish_folder(tmp, folder, replace=False):  # another process fetched it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %d members of %s into %s", members, source, folder)
    return folder
