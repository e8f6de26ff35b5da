"""Sharded corpora end to end: `mert data pack`, shards over plain HTTP and the S3 API from
servers started here (real sockets on 127.0.0.1, real tar files), exact resume, faults,
label stores and fits over shards."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from conftest import music
from mert_cli.main import cli
from mert_core import api
from mert_core.audio import decode_audio, load_audio
from mert_core.shards import ReadPolicy, Skipped, member_id, open_corpus, pack_shards, read_members
from mert_core.streaming import ShardBatches, ShardStream

SR = 24000
# small crops and blocks keep a step cheap and let a few steps cover every shard
STREAM = ["data.batch_size=2", "data.num_workers=0", "data.crop_seconds=1.0", "data.min_seconds=0.5", "log_every=1",
          "data.stream.lanes=2", "data.stream.buffer_crops=4", "data.stream.retries=1", "data.stream.retry_seconds=0.05",
          "data.stream.timeout_seconds=2"]


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """Eight short real files: wav and flac, 24 and 44.1 kHz, one stereo."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        sf.write(folder / f"f{i}.flac", music(2.0 + 0.5 * i, SR, seed=i), SR)
    sf.write(folder / "sub" / "g.wav", music(3.2, 44100, seed=7), 44100)
    sf.write(folder / "sub" / "h.wav", np.stack([music(2.5, SR, seed=8), music(2.5, SR, seed=9)], 1), SR)
    return folder


@pytest.fixture
def packed(corpus_dir, tmp_path) -> Path:
    out = tmp_path / "shards"
    pack_shards([corpus_dir], out, "200KB", progress=False)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers ----------------------------------------------------------------------------


class _ShardServer(http.server.ThreadingHTTPServer):
    """Serves a folder over HTTP with byte ranges, logs every GET (path, first byte), and
    misbehaves on request: ``fail`` paths answer 500, ``slow`` paths stall past any timeout."""

    daemon_threads = True

    def __init__(self, root: Path):
        self.root, self.log, self.fail, self.slow = root, [], set(), set()
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool):
        server: _ShardServer = self.server
        name = self.path.lstrip("/")
        path = server.root / name
        start = 0
        if body:
            spec = self.headers.get("Range", "")
            start = int(spec.split("=")[1].split("-")[0]) if spec.startswith("bytes=") else 0
            server.log.append((name, start))
        if name in server.fail:
            self.send_error(500, "shard unavailable (test)")
            return
        if name in server.slow and body:
            time.sleep(5)  # past the client's 2 s read timeout
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            try:
                self.wfile.write(data[start:])
            except (BrokenPipeError, ConnectionResetError):
                pass


@pytest.fixture
def shard_server(packed):
    server = _ShardServer(packed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def python_http_server(packed):
    """`python -m http.server` on a free local port, serving the pack (no byte ranges)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(packed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 API server on a free local port; s3fs finds it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("corpus-bucket")
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _train(data, out, *extra, steps=3, teachers=("cqt",)):
    config = api.make_train_config(teachers=list(teachers), preset="tiny", data=[data], out_dir=out, max_steps=steps,
                                   overrides=[*STREAM, *extra])
    api.train(config, progress=False)
    return json.loads((out / "summary.json").read_text())


# -- packing ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["original", "flac"])
def test_pack_reads_back_with_plain_webdataset(corpus_dir, tmp_path, encoding):
    """The snippet of docs/data.md: plain webdataset reads a pack; every member decodes to its source."""
    import webdataset as wds

    out = tmp_path / "shards"
    result = CliRunner().invoke(cli, ["data", "pack", "--data", str(corpus_dir), "--out", str(out), "--shard-size", "200KB",
                                      "--encoding", encoding, "--quiet"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["total_members"] == 8 and index["encoding"] == encoding and index["skipped"] == {}
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(index["shards"]))]
    assert len(index["shards"]) >= 3 and sum(s["members"] for s in index["shards"]) == 8
    assert index["total_hours"] * 3600 == pytest.approx(sum(sf.info(p).duration for p in corpus_dir.rglob("*.*")), abs=1e-3)

    seen = {}
    for sample in wds.WebDataset(f"{out}/shard-{{000000..{len(index['shards']) - 1:06d}}}.tar", shardshuffle=False):
        meta = json.loads(sample["json"])
        ext = next(k for k in sample if not k.startswith("__") and k != "json")
        source = Path(meta["source"])
        if encoding == "original":
            assert ext == source.suffix.lstrip(".") and sample[ext] == source.read_bytes()
        else:
            assert ext == "flac"
        # the bytes decode to exactly what the file gives (FLAC re-encoding of 16-bit audio is lossless)
        assert np.array_equal(decode_audio(sample[ext], sample["__key__"], SR), load_audio(source, SR))
        seen[str(source)] = meta["duration_seconds"]
    assert sorted(seen) == sorted(str(p) for p in corpus_dir.rglob("*.*"))


def test_members_read_from_any_offset_and_a_truncated_shard_is_named(packed, tmp_path):
    corpus = open_corpus([packed])
    url = next(u for u, n in zip(corpus.urls, corpus.members) if n >= 2)
    whole = list(read_members(url))
    assert [m.index for m in whole] == list(range(len(whole))) and all(isinstance(m, type(whole[0])) for m in whole)
    assert whole[0].offset == 0 and all(a.end == b.offset for a, b in zip(whole, whole[1:]))
    tail = list(read_members(url, whole[1].offset, 1))
    assert [(m.key, m.index, m.entries) for m in tail] == [(m.key, m.index, m.entries) for m in whole[1:]]

    raw = Path(url).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: whole[1].offset + 700])  # inside the second member's audio
    items = list(read_members(str(cut), policy=ReadPolicy(retries=1, retry_seconds=0.01)))
    assert [m.key for m in items[:-1]] == [whole[0].key]
    assert isinstance(items[-1], Skipped) and items[-1].what == member_id(str(cut), whole[1].key)
    assert "truncated" in items[-1].reason or "unexpected end" in items[-1].reason
    cut.write_bytes(raw[: whole[1].offset])  # cut where a member starts: no end-of-archive block
    items = list(read_members(str(cut), policy=ReadPolicy(retries=0)))
    assert isinstance(items[-1], Skipped) and "end-of-archive" in items[-1].reason


# -- the stream -----------------------------------------------------------------------


def _stream(corpus, state=None, workers=0, **kw):
    ds = ShardStream(corpus, 2, crop_seconds=1.0, min_seconds=0.5, seed=3, lanes=2, buffer_crops=3,
                     policy=ReadPolicy(retries=0), state=state, **kw)
    return ShardBatches(ds, workers)


def test_stream_resumes_exactly_from_a_byte_offset_whatever_the_workers(shard_server):
    """Resumed at any batch, the stream gives the batches of an unbroken one, bit for bit, with
    0 or 2 workers; each lane reopens its shard at the saved member's byte, not at 0."""
    corpus = open_corpus([f"{shard_server.url}/index.json"])
    unbroken, states = _stream(corpus), []
    batches = []
    for _ in range(14):
        batches.append(next(unbroken))
        states.append(unbroken.state_dict())
    seen_offsets = 0
    for k in (2, 5, 8):
        saved = json.loads(json.dumps(states[k]))  # as a checkpoint holds it
        shard_server.log.clear()
        resumed = _stream(corpus, state=saved, workers=2 if k % 2 else 0)
        for want in batches[k + 1 :]:
            got = next(resumed)
            assert got["paths"] == want["paths"] and got["offsets"] == want["offsets"]
            assert torch.equal(got["wave"], want["wave"]) and torch.equal(got["lengths"], want["lengths"])
        stream = resumed.stream
        for lane, state in saved["lane_states"].items():
            j, _, offset, _ = state["start"]
            first = next(start for name, start in shard_server.log if name == Path(stream.shard_of(int(lane), j)).name)
            assert first == offset  # the lane's shard was entered at its saved member, not read from byte 0
            seen_offsets += offset > 0
    assert seen_offsets > 0  # some lane was resumed in the middle of a shard


def test_ranks_and_lanes_read_every_shard_once_per_epoch(packed):
    corpus = open_corpus([packed])
    n, world, lanes = len(corpus.urls), 2, 2
    streams = [ShardStream(corpus, 2, seed=5, rank=r, world_size=world, lanes=lanes) for r in range(world)]
    for epoch in range(3):
        read = []
        for s in streams:
            per_epoch = s.shards_per_epoch()
            # the rank's epoch-th run of shards, dealt to its lanes in turn
            read += [s.shard_of(q % lanes, q // lanes) for q in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        assert sorted(read) == sorted(corpus.urls)  # every shard once, by one lane of one rank
    firsts = [tuple(s.shard_of(0, j) for j in range(n)) for s in streams]
    assert firsts[0] != firsts[1]


def test_too_few_shards_for_the_ranks_and_bad_worker_counts_are_refused(packed):
    from mert_core.streaming import StreamError

    corpus = open_corpus([packed])
    with pytest.raises(StreamError, match=f"{len(corpus.urls)} shards for 99 ranks"):
        ShardStream(corpus, 2, rank=0, world_size=99)
    with pytest.raises(StreamError, match="num_workers=3 must divide data.stream.lanes=2"):
        ShardBatches(ShardStream(corpus, 2, lanes=2), 3)
    state = _stream(corpus).state_dict()
    with pytest.raises(StreamError, match="lanes: 2 -> 4"):
        ShardStream(corpus, 2, crop_seconds=1.0, min_seconds=0.5, seed=3, lanes=4, buffer_crops=3, state=state)


# -- training end to end over HTTP and S3 ------------------------------------------------


def test_train_on_shards_served_by_python_http_server(python_http_server, tmp_path):
    summary = _train(f"{python_http_server}/index.json", tmp_path / "run")
    assert summary["steps"] == 3 and summary["shards"] >= 3 and summary["skipped_files"] == {}
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["data_stream"][0]["lanes"] == 2 and set(state["data_stream"][0]["lane_states"]) == {"0", "1"}


def test_pack_to_s3_and_train_from_it(corpus_dir, tmp_path, s3_server):
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "pack", "--data", str(corpus_dir), "--out", "s3://corpus-bucket/music", "--shard-size", "200KB", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "into" in result.output and "s3://corpus-bucket/music" in result.output
    result = runner.invoke(cli, ["data", "info", "s3://corpus-bucket/music/index.json"])
    assert result.exit_code == 0 and "8 members" in result.output, result.output
    args = ["train", "--teacher", "cqt", "--preset", "tiny", "--data", "s3://corpus-bucket/music/index.json", "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--quiet"]
    for item in STREAM:
        args += ["--set", item]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["files_skipped"] == 0


def test_a_shard_list_pointing_at_nothing_is_one_line_before_step_0(packed, tmp_path, shard_server):
    runner = CliRunner()
    base = ["train", "--teacher", "cqt", "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps", "1", "--quiet"]
    for data, says in [
        (f"{shard_server.url}/elsewhere/index.json", "no such shard index"),
        (str(tmp_path / "nothing" / "shard-{000000..000003}.tar"), "no shard at"),
        (f"{shard_server.url}/shard-{{000000..000999}}.tar", "shard-000999.tar (one of 1000)"),
    ]:
        result = runner.invoke(cli, [*base, "--data", data])
        assert result.exit_code == 2, result.output
        assert says in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run").exists()
    result = runner.invoke(cli, [*base, "--data", str(packed), "--data", str(packed / "..")])
    assert result.exit_code == 2 and "mixes shards with folders" in result.output


# -- faults --------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, entries in members:
            for ext, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _flac(seconds: float, seed: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, music(seconds, SR, seed=seed), SR, format="FLAC")
    return buffer.getvalue()


def test_faults_are_retried_skipped_and_named_and_the_run_goes_on(tmp_path):
    """A shard answering 500, one stalling past the timeout, one truncated inside a member,
    and a member of garbage: the run ends, and summary.json names each with its shard and member."""
    root = tmp_path / "faulty"
    root.mkdir()
    good = lambda i: (f"m{i}", {"flac": _flac(2.0, i), "json": b"{}"})  # noqa: E731
    _tar(root / "shard-000000.tar", [good(0), good(1)])
    _tar(root / "shard-000001.tar", [good(2), ("garbage", {"flac": np.random.default_rng(0).bytes(5000)}), good(3)])
    _tar(root / "shard-000002.tar", [good(4), good(5)])  # answers 500
    _tar(root / "shard-000003.tar", [good(6), good(7)])  # stalls
    _tar(root / "shard-000004.tar", [good(8), good(9)])
    whole = (root / "shard-000004.tar").read_bytes()
    second = next(m for m in read_members(str(root / "shard-000004.tar")) if m.key == "m9")
    (root / "shard-000004.tar").write_bytes(whole[: second.offset + 2000])  # cut inside m9's audio
    server = _ShardServer(root)
    server.fail.add("shard-000002.tar")
    server.slow.add("shard-000003.tar")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # 5 shards, 6 readable members of 2 s: 12 crops; 10 steps of 2 crops read them all at least once
        summary = _train(f"{server.url}/shard-{{000000..000004}}.tar", tmp_path / "run", steps=10)
    finally:
        server.shutdown()
        server.server_close()
    assert summary["steps"] == 10
    skipped = summary["skipped_files"]
    u = server.url
    assert set(skipped) == {f"{u}/shard-000001.tar#garbage", f"{u}/shard-000002.tar", f"{u}/shard-000003.tar",
                            f"{u}/shard-000004.tar#m9"}, skipped
    assert "cannot decode audio" in skipped[f"{u}/shard-000001.tar#garbage"]
    assert "500" in skipped[f"{u}/shard-000002.tar"] and "after 1 retries" in skipped[f"{u}/shard-000002.tar"]
    assert "Timeout" in skipped[f"{u}/shard-000003.tar"]
    assert "member m9" in skipped[f"{u}/shard-000004.tar#m9"]
    assert summary["files_skipped"] == 4
    assert sum(1 for name, _ in server.log if name == "shard-000002.tar") >= 2  # tried, then retried


# -- shards written by another tool ----------------------------------------------------


def test_shards_written_by_another_tool_train_without_repacking(tmp_path):
    """webdataset's own ShardWriter, keys with folders in them, a label entry, no index.json."""
    import webdataset as wds

    root = tmp_path / "theirs"
    root.mkdir()
    wav = io.BytesIO()
    sf.write(wav, music(2.5, 16000, seed=3), 16000, format="WAV")
    with wds.ShardWriter(str(root / "train-%04d.tar"), maxcount=2) as sink:
        for i in range(5):
            audio = {"flac": _flac(2.0 + i * 0.3, 20 + i)} if i % 2 else {"wav": wav.getvalue()}
            sink.write({"__key__": f"album{i // 2}/track{i:02d}", "cls": str(i % 3).encode(), **audio})
    summary = _train(str(root / "train-{0000..0002}.tar"), tmp_path / "run", steps=4)
    assert summary["steps"] == 4 and summary["shards"] == 3 and summary["skipped_files"] == {}


# -- teachers over shards ------------------------------------------------------------


def test_kmeans_fit_reads_a_bounded_sample_and_label_stores_key_shard_members(packed, tmp_path, shard_server):
    """A fit over shards fetches only enough shards for its sample_hours; `mert teacher label`
    over the shards served by HTTP makes a store keyed by shard members that equals the
    teacher on the trainer's aligned crops, and trains."""
    from conftest import assert_kmeans_labels_equal_up_to_ties
    from mert_core.labels import LabelStore
    from mert_core.paths import cache_root

    index = f"{shard_server.url}/index.json"
    corpus = open_corpus([index])
    fitted = tmp_path / "mfcc.safetensors"
    opts = {"n_clusters": 6, "n_mels": 40, "sample_hours": 6 / 3600}  # 6 s: a few of the shards
    api.fit_teacher("kmeans-mfcc", [index], fitted, opts, device="cpu", progress=False)
    fetched = sorted(p for p in (cache_root() / "shard-samples").iterdir() if not p.name.startswith("."))
    assert 1 <= len(fetched) < len(corpus.urls)
    fetched_names = {p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in fetched}
    assert {name for name, _ in shard_server.log} == fetched_names | {"index.json"}  # nothing else was read

    W = SR  # 1 s windows = the crops below
    result = CliRunner().invoke(cli, ["teacher", "label", "kmeans-mfcc", "--teacher-file", str(fitted), "--data", index,
                                      "--out", str(tmp_path / "store"), "--window-seconds", "1.0", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    store = LabelStore.open(tmp_path / "store")
    assert store.index["source"] == "shards" and store.index["shards"] == corpus.names
    assert all("#" in e["path"] and not e["path"].startswith("http") for e in store.index["files"])
    from mert_core.registry import default_registry

    teacher = default_registry().build("teacher", "kmeans-mfcc", {"teacher_file": str(fitted)})
    store.check(teacher, W, files=[str(packed)])  # the same shards read locally: keyed by file name, not address
    stream = ShardBatches(ShardStream(open_corpus([packed]), 3, crop_seconds=1.0, min_seconds=0.5, lanes=1, buffer_crops=4, aligned=True), 0)
    for _ in range(4):
        batch = next(stream)
        assert all(o % W == 0 for o in batch["offsets"])
        stored = store.targets(batch["paths"], batch["offsets"], teacher.geometry.num_frames(W))
        for b in range(3):
            if batch["lengths"][b] == W:
                online = teacher.targets(batch["wave"][b : b + 1])
                assert_kmeans_labels_equal_up_to_ties(teacher, batch["wave"][b : b + 1], online, stored[b : b + 1, : online.shape[1]])
    summary = _train(str(packed), tmp_path / "run", f"teacher.kmeans-mfcc.teacher_file={fitted}",
                     f"teacher.kmeans-mfcc.label_store={tmp_path / 'store'}", steps=2, teachers=("kmeans-mfcc",))
    assert summary["steps"] == 2


# -- kill and resume ----------------------------------------------------------------------


def _wait_for_orphaned_workers(run: Path, seconds: float = 60) -> None:
    """DataLoader workers of a SIGKILLed trainer share its flock on the run folder until they
    notice their parent is gone (torch checks every 5 s); a resume waits for that."""
    import fcntl

    deadline = time.time() + seconds
    with open(run / ".lock") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, "the killed run's workers still hold its folder"
                time.sleep(0.2)


def _cli(*args, env):
    return subprocess.Popen([sys.executable, "-m", "mert_cli.main", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_over_http_ends_with_the_same_weights(shard_server, tmp_path):
    """As the folder test in test_train.py, with the batches streamed from shards over HTTP:
    the resumed run reads the same crops in the same order (bitwise equal weights) and
    enters its shards at the saved members' bytes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    steps = 8

    def args(out):
        a = ["train", "--teacher", "cqt", "--teacher", "ema", "--preset", "tiny", "--data", f"{shard_server.url}/index.json",
             "--out", str(out), "--max-steps", str(steps), "--quiet", "--set", "checkpoint_every=2", "--set", "data.num_workers=2"]
        for item in STREAM:
            if not item.startswith("data.num_workers"):
                a += ["--set", item]
        return a

    reference = _cli(*args(tmp_path / "ref"), env=env)
    assert reference.wait(timeout=600) == 0, reference.stdout.read()
    killed = _cli(*args(tmp_path / "run"), env=env)
    target = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    deadline = time.time() + 300
    while not target.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 0 < saved["step"] < steps
    _wait_for_orphaned_workers(tmp_path / "run")
    shard_server.log.clear()
    resumed = _cli(*args(tmp_path / "run"), "--resume", "--set", "data.num_workers=1", env=env)  # workers may change
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    # bitwise: the same batches, masks and RNG streams make the same computation
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k
    for k in a["teacher_states"]["ema"]:
        assert torch.equal(a["teacher_states"]["ema"][k], b["teacher_states"]["ema"][k]), k
    assert a["data_stream"] == b["data_stream"]
    # each lane's first request after the resume starts at its saved member
    state = saved["data_stream"][0]
    corpus = open_corpus([f"{shard_server.url}/index.json"])
    stream = ShardStream(corpus, 2, seed=0, lanes=2, buffer_crops=4)
    for lane, lane_state in state["lane_states"].items():
        j, _, offset, _ = lane_state["start"]
        name = Path(stream.shard_of(int(lane), j)).name
        assert next(start for n, start in shard_server.log if n == name) == offset


# -- evaluation datasets ------------------------------------------------------------------


def test_an_evaluation_task_reads_its_dataset_from_shards(tmp_path):
    """A task folder packed whole (--all-files: the labels travel with the audio) and served over
    HTTP gives `mert extract` the same examples and the same features as the folder itself."""
    from mert_core.demo import DemoSize, ensure_demo_data

    size = DemoSize(pieces_per_key=3, piece_seconds=2.0, keys=("C major", "A minor"), note_pitches=(60,), timbres=("flute",), note_seconds=0.5)
    demo = ensure_demo_data(tmp_path / "demo", size=size, progress=False)
    result = CliRunner().invoke(cli, ["data", "pack", "--data", str(demo), "--out", str(tmp_path / "packed"), "--shard-size", "300KB",
                                      "--all-files", "--quiet"])
    assert result.exit_code == 0, result.output
    server = _ShardServer(tmp_path / "packed")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        (upstream,) = api.build_upstreams(baselines=["handcrafted"])
        remote = api.build_task("demo-key", {"data_dir": f"{server.url}/index.json"})
        local = api.build_task("demo-key", {"data_dir": str(demo)})
        assert Path(remote.options.data_dir) != demo and (Path(remote.options.data_dir) / "metadata.jsonl").is_file()
        for split in ("train", "test"):
            want, got = local.examples(split), remote.examples(split)
            assert [(Path(e.path).relative_to(demo), e.label) for e in want] == \
                   [(Path(e.path).relative_to(remote.options.data_dir), e.label) for e in got]
        a = api.extract_task(upstream, local, ["train"], cache_dir=tmp_path / "c1", progress=False)["train"]
        b = api.extract_task(upstream, remote, ["train"], cache_dir=tmp_path / "c2", progress=False)["train"]
        assert len(a) == len(b) > 0 and np.array_equal(np.asarray(a.features), np.asarray(b.features))
        server.log.clear()
        api.build_task("demo-key", {"data_dir": f"{server.url}/index.json"})
        assert server.log == [("index.json", 0)]  # the shards were fetched once; the index says which to reuse
    finally:
        server.shutdown()
        server.server_close()


DDP_SCRIPT = """
import sys
from mert_core import api
overrides = sys.argv[3:]
config = api.make_train_config(teachers=["cqt"], preset="tiny", data=[sys.argv[1]], out_dir=sys.argv[2], max_steps=2, overrides=overrides)
api.train(config, progress=False)
"""


def test_two_process_torchrun_saves_both_ranks_stream_positions(packed, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script),
         str(packed), str(out), *STREAM, "checkpoint_every=1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = torch.load(out / "last.pt", weights_only=True)
    streams = state["data_stream"]
    assert [s["rank"] for s in streams] == [0, 1] and all(s["world_size"] == 2 for s in streams)
    assert all(s["next_lane"] == 0 and set(s["lane_states"]) == {"0", "1"} for s in streams)  # 2 batches: one per lane
