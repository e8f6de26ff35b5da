"""A corpus at the paper's scale: a manifest of 1,000,000 files, sharded over 64 ranks.

MERT pretrained on 160k hours, millions of files. This writes a .tsv manifest
of ``--entries`` synthetic rows (path + duration) that point at a few real
audio files through symlinked folders (``d0000/f000.wav`` ... : 1000 links x
``entries / 1000`` folder links, so a million distinct paths cost two thousand
directory entries), then measures what one training process does at start-up:
load the manifest (``scan_audio``), take its shard (``CropBatches`` for rank 0
and the last rank of ``--ranks``) and draw a few batches of 5 s crops. It
prints wall-clock and process CPU seconds (steadier on a shared machine) and
the process's resident memory (RSS) after each stage, and its peak.

    python benchmarks/bench_manifest.py                    # 1,000,000 entries, 64 ranks
    python benchmarks/bench_manifest.py --entries 100000
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from mert_core.data import CropBatches, scan_audio

LINKS_PER_FOLDER = 1000


def rss_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


def make_corpus(root: Path, entries: int, real_files: int = 4, seconds: float = 30.0) -> Path:
    """Real files, folder links and a manifest of ``entries`` rows; returns the manifest."""
    real = root / "real"
    real.mkdir()
    durations = []
    rng = np.random.default_rng(0)
    for k in range(real_files):
        n = int((seconds + 5 * k) * 24000)
        t = np.arange(n) / 24000
        wave = 0.2 * np.sin(2 * np.pi * 220 * 2 ** (k / 12) * t) + 0.01 * rng.standard_normal(n)
        sf.write(real / f"real{k}.wav", wave.astype(np.float32), 24000)
        durations.append(n / 24000)
    links = root / "links"
    links.mkdir()
    for j in range(LINKS_PER_FOLDER):
        os.symlink(real / f"real{j % real_files}.wav", links / f"f{j:03d}.wav")
    folders = (entries + LINKS_PER_FOLDER - 1) // LINKS_PER_FOLDER
    for i in range(folders):
        os.symlink(links, root / f"d{i:04d}", target_is_directory=True)
    manifest = root / "corpus.tsv"
    with open(manifest, "w") as f:
        f.write("path\tduration\n")
        for e in range(entries):
            i, j = divmod(e, LINKS_PER_FOLDER)
            f.write(f"d{i:04d}/f{j:03d}.wav\t{durations[j % real_files]:.3f}\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="crops per batch")
    parser.add_argument("--batches", type=int, default=5, help="batches drawn on the last rank")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mert-bench-manifest-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        manifest_path = make_corpus(root, opts.entries)
        print(f"{opts.entries:,} rows written in {time.perf_counter() - t:.1f} s "
              f"({manifest_path.stat().st_size / 1e6:.1f} MB of .tsv); process RSS {rss_mb():.0f} MB")
        rows = []
        base = rss_mb()

        def stage(name: str, work):
            t, cpu = time.perf_counter(), time.process_time()
            result = work()
            rows.append((name, time.perf_counter() - t, time.process_time() - cpu, rss_mb() - base))
            return result

        manifest = stage("load manifest (scan_audio)", lambda: scan_audio([manifest_path], cache_dir=root / "cache", progress=False))
        assert len(manifest.files) == opts.entries, len(manifest.files)
        for rank in (0, opts.ranks - 1):
            dataset = stage(f"shard: rank {rank} of {opts.ranks}",
                            lambda rank=rank: CropBatches(manifest, opts.batch, seed=0, rank=rank, world_size=opts.ranks))
        batches = stage(f"draw {opts.batches} batches of {opts.batch} x 5 s", lambda: [dataset[i] for i in range(opts.batches)])
        assert batches[-1]["wave"].shape == (opts.batch, 120000) and len(dataset.files) == opts.entries // opts.ranks

        print("| stage | wall s | process CPU s | RSS added (MB) |")
        print("|---|---|---|---|")
        for name, seconds, cpu, mb in rows:
            print(f"| {name} | {seconds:.2f} | {cpu:.2f} | {mb:.0f} |")
        startup, startup_cpu = rows[0][1] + rows[1][1], rows[0][2] + rows[1][2]
        print(f"start-up (load + shard): {startup:.1f} s wall, {startup_cpu:.1f} s CPU; peak RSS of the process {peak_rss_mb():.0f} MB "
              f"({(peak_rss_mb() - base) * 1e6 / opts.entries:.0f} bytes per entry above the baseline)")


if __name__ == "__main__":
    main()
