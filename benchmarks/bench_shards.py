"""Audio delivered to the trainer: a folder read by random seeks vs shards on local disk vs
shards over HTTP from a local server, at 1, 2 and 4 DataLoader workers, on the same files;
the start-up of a 100k-shard index; and (``--train``) the fraction of a CPU training run's
step time spent waiting for the loader on shards.

Prints audio-seconds per second delivered (batches of ``--batch`` x 5 s crops, after a
warm-up) and the ratio of each source against the folder at the same worker count. Never gates CI.

    python benchmarks/bench_shards.py --audio /music                 # the table
    python benchmarks/bench_shards.py --audio /music --train 150     # + a `cpu`-preset run on the shards
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mert_core.data import CropBatches, make_loader, scan_audio
from mert_core.shards import ReadPolicy, open_corpus, pack_shards
from mert_core.streaming import ShardBatches, ShardStream

SR = 24000
LANES = 4


def delivered(batches, warmup: int, count: int) -> tuple[float, float, float]:
    """Over ``count`` batches after ``warmup``: audio-seconds per second and per CPU-second of
    this process (the reading itself only with 0 workers); and the first batch's latency."""
    start = time.perf_counter()
    for i in range(warmup):
        next(batches)
        if i == 0:
            first = time.perf_counter() - start
    t0, cpu0, seconds = time.perf_counter(), time.process_time(), 0.0
    for _ in range(count):
        seconds += float(next(batches)["lengths"].sum()) / SR
    return seconds / (time.perf_counter() - t0), seconds / (time.process_time() - cpu0), first


def folder_loader(manifest, batch: int, workers: int):
    ds = CropBatches(manifest, batch, crop_seconds=5.0, min_seconds=3.0, seed=0)
    return iter(make_loader(ds, num_workers=workers))


def shard_loader(source: str, batch: int, workers: int, buffer_crops: int):
    stream = ShardStream(open_corpus([source]), batch, crop_seconds=5.0, min_seconds=3.0, seed=0, lanes=LANES,
                         buffer_crops=buffer_crops, policy=ReadPolicy(retries=1))
    return ShardBatches(stream, workers)


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def index_startup(tmp: Path, num_shards: int = 100_000, world_size: int = 64) -> None:
    """A simulated index of ``num_shards`` shards: read it, check the first and last shard, build a rank's lanes."""
    folder = tmp / "big-index"
    folder.mkdir()
    shards = [{"name": f"shard-{i:06d}.tar", "members": 150, "bytes": 10**9, "seconds": 36000.0} for i in range(num_shards)]
    (folder / "index.json").write_text(json.dumps({"format": "mert-shards", "format_version": 1, "shards": shards}))
    for name in (shards[0]["name"], shards[-1]["name"]):
        (folder / name).write_bytes(b"\0" * 1024)  # the check looks only at the first and the last
    t0 = time.perf_counter()
    corpus = open_corpus([folder])
    t1 = time.perf_counter()
    stream = ShardStream(corpus, 8, rank=world_size - 1, world_size=world_size, lanes=LANES)
    first = [stream.shard_of(lane, 0) for lane in range(LANES)]
    t2 = time.perf_counter()
    size = (folder / "index.json").stat().st_size / 1e6
    print(f"\n{num_shards:,}-shard index ({size:.1f} MB, {corpus.hours:,.0f} h): read + check {t1 - t0:.2f} s, "
          f"rank {world_size - 1} of {world_size} to its first shards {t2 - t1:.3f} s "
          f"(first: {Path(first[0]).name}); start-up {t2 - t0:.2f} s")


def train_wait(source: str, steps: int, out: Path) -> None:
    """A `cpu`-preset CQT run on the shards: the fraction of the loop's time spent in next(batches)."""
    from mert_core import api
    from mert_core.trainer import build_run, run_loop
    import contextlib

    config = api.make_train_config(teachers=["cqt"], preset="cpu", data=[source], out_dir=out, max_steps=steps,
                                   overrides=["data.num_workers=1", "checkpoint_every=1000", "log_every=50"])
    with contextlib.ExitStack() as scope:
        run = build_run(config, None, resume=False, progress=False, log=lambda m: None, run_scope=scope)
        start = time.perf_counter()
        run_loop(run, progress=False)
        loop = time.perf_counter() - start
    batches = run.batches
    steady = "n/a"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if len(rows) > 1:
        steady = f"{rows[-1]['audio_seconds_per_second']:.1f}"
    first, rest = batches.first_wait_seconds, batches.wait_seconds - batches.first_wait_seconds
    print(f"\ntraining on shards (cpu preset, cqt, batch {config.data.batch_size} x {config.data.crop_seconds:g} s, 1 worker, "
          f"{os.cpu_count()} cores): {steps} steps in {loop:.1f} s; waiting for the loader {batches.wait_seconds:.2f} s = "
          f"{100 * batches.wait_seconds / loop:.1f} % of the loop, of which {first:.2f} s for the first batch (the lanes' first "
          f"blocks) and {rest:.2f} s = {100 * rest / max(loop - first, 1e-9):.2f} % of the steps after it; "
          f"last logged window {steady} audio-s/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio", type=Path, required=True, help="folder of real music (the same files feed all three sources)")
    parser.add_argument("--workers", default="1,2,4", help="DataLoader worker counts (each must divide the 4 lanes)")
    parser.add_argument("--batch", type=int, default=8, help="crops per batch")
    parser.add_argument("--batches", type=int, default=120, help="batches timed per row, after the warm-up (many more than the "
                                                                  "workers' read-ahead, which the warm-up fills)")
    parser.add_argument("--parts", default="table,cpu,index", help="what to measure: table (rates per worker count), "
                                                                   "cpu (CPU cost per audio second), index (100k-shard start-up)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per cell, the sources taking turns")
    parser.add_argument("--buffer-crops", type=int, default=32, help="shuffle block per lane (data.stream.buffer_crops)")
    parser.add_argument("--shard-size", default="64MB")
    parser.add_argument("--train", type=int, default=0, metavar="STEPS", help="also time a training run of this many steps on the shards")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    manifest = scan_audio([args.audio], progress=False)
    usable, _ = manifest.split_by_duration(3.0)
    hours = sum(f.duration_seconds for f in usable) / 3600
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        packed = pack_shards([args.audio], tmp / "shards", args.shard_size, progress=False)
        print(f"{len(usable)} files, {hours:.2f} h ({', '.join(sorted({Path(f.path).suffix for f in usable}))}); packed into "
              f"{packed.shards} shards of <= {args.shard_size} in {packed.seconds:.1f} s; batches of {args.batch} x 5 s, "
              f"{args.batches} timed after a warm-up; shards: {LANES} lanes, {args.buffer_crops}-crop blocks\n")
        server, url = serve(tmp / "shards")
        sources = {
            "folder, random seeks": lambda w: folder_loader(manifest, args.batch, w),
            "local shards": lambda w: shard_loader(str(tmp / "shards"), args.batch, w, args.buffer_crops),
            "HTTP shards (local server)": lambda w: shard_loader(f"{url}/index.json", args.batch, w, args.buffer_crops),
        }
        try:
            if "table" in parts:
                # rounds alternate the sources, so that a burst of load elsewhere on the machine
                # lands on all of them; each cell is the median of the rounds
                print(f"| source | workers | audio-s/s (median of {args.rounds}) | range | vs folder | first batch s |")
                print("|---|---|---|---|---|---|")
                for workers in (int(w) for w in args.workers.split(",")):
                    warmup = max(2 * LANES, 2 * 2 * workers)  # every lane started, every worker's read-ahead (prefetch 2) filled
                    runs: dict[str, list] = {name: [] for name in sources}
                    for _ in range(args.rounds):
                        for name, make in sources.items():
                            runs[name].append(delivered(make(workers), warmup, args.batches))
                    base = statistics.median(r[0] for r in runs["folder, random seeks"])
                    for name, rs in runs.items():
                        med = statistics.median(r[0] for r in rs)
                        print(f"| {name} | {workers} | {med:.1f} | {min(r[0] for r in rs):.0f}-{max(r[0] for r in rs):.0f} | "
                              f"{med / base:.2f}x | {statistics.median(r[2] for r in rs):.2f} |", flush=True)
            if "cpu" in parts:
                print(f"\nreading in the training process (0 workers): audio-seconds per CPU-second (median of {args.rounds}), "
                      "a measure the machine's load does not move much")
                cpu = {name: [] for name in sources}
                for _ in range(args.rounds):
                    for name, make in sources.items():
                        cpu[name].append(delivered(make(0), 2 * LANES, args.batches // 2)[1])
                for name, rs in cpu.items():
                    print(f"| {name} | {statistics.median(rs):.1f} audio-s per CPU-s |", flush=True)
        finally:
            server.terminate()
        if "index" in parts:
            index_startup(tmp)
        if args.train:
            train_wait(str(tmp / "shards"), args.train, tmp / "run")


if __name__ == "__main__":
    main()
