"""Data pipeline speed: seeking crops vs decoding whole files, and the demo generator.

Prints ratios against references measured in the same run. Never gates CI.

    python benchmarks/bench_data.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from mert_core.audio import load_audio, read_crop
from mert_core.data import CropBatches, scan_audio
from mert_core.demo import DemoSize, generate_demo_data

SR = 24000
CROP = 5 * SR


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for ext, sr in (("flac", 44100), ("wav", 24000), ("mp3", 44100)):
            path = tmp / f"song.{ext}"
            sf.write(str(path), (0.1 * rng.standard_normal((180 * sr, 2))).astype(np.float32), sr)
            offset = 100 * SR
            whole = timed(lambda: load_audio(path, SR)[offset : offset + CROP], 2)
            crop = timed(lambda: read_crop(path, SR, offset, CROP), 5)
            print(f"3-min {ext} @ {sr} Hz: 5 s crop by seeking is {whole / crop:6.1f}x faster than decode+resample "
                  f"of the whole file ({crop * 1e3:.1f} ms vs {whole * 1e3:.1f} ms)")

        for k in range(16):
            sf.write(str(tmp / f"c{k}.flac"), (0.1 * rng.standard_normal(30 * 44100)).astype(np.float32), 44100)
        t = time.perf_counter()
        manifest = scan_audio([tmp], cache_dir=tmp / "cache", progress=False)
        first = time.perf_counter() - t
        t = time.perf_counter()
        scan_audio([tmp], cache_dir=tmp / "cache", progress=False)
        second = time.perf_counter() - t
        print(f"re-scan with cache: {first / second:6.1f}x faster than the first scan ({len(manifest.files)} files)")
        ds = CropBatches(manifest, batch_size=8, seed=0)
        per_batch = timed(lambda: ds[int(rng.integers(1000))], 5)
        audio_s = 8 * 5
        print(f"CropBatches: one 8 x 5 s batch (44.1 kHz flac) in {per_batch * 1e3:.0f} ms = {audio_s / per_batch:.0f}x real time per worker")

        t = time.perf_counter()
        generate_demo_data(tmp / "demo", size=DemoSize(keys=("C major", "A minor"), note_pitches=(60,)), progress=False)
        dt = time.perf_counter() - t
        minutes = (2 * 4 * 12 + 6 * 1.5) / 60
        print(f"demo generator: {minutes * 60 / dt:.0f}x real time ({minutes:.1f} min of audio in {dt:.1f} s)")


if __name__ == "__main__":
    main()
