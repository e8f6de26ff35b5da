"""k-means teacher pipeline vs the straightforward reference, on the same audio in one run.

Reference (the original MusicHuBERT/HuBERT recipe's shape): librosa MFCC +
deltas of every frame held in memory, then scikit-learn full-batch ``KMeans``
(k-means++, ``n_init=1``), labels with ``KMeans.predict`` file by file, and
labels saved as one line of integers per file.

Ours: ``fit_teacher("kmeans-mfcc")`` (torch features streamed to a disk cache,
k-means++ and Lloyd on a subsample, streamed exact Lloyd passes), labels with
``write_label_store`` (batched torch features + nearest centroid, one
memory-mapped uint16 file).

Inertia is compared in one feature space: scikit-learn ``KMeans`` and
``MiniBatchKMeans`` are also run on *our* features (all frames in memory), so
that "equal or better inertia" compares clusterings, not feature scalings.

    python benchmarks/bench_kmeans.py                 # 30 min of audio, K=500
    python benchmarks/bench_kmeans.py --minutes 5 --clusters 100   # quick
    python benchmarks/bench_kmeans.py --audio /music  # fit strategies on real music (below)
    python benchmarks/bench_kmeans.py --kernels       # nearest centroid: rows per score block

With ``--audio``, the k-means fits alone are compared on our 39-d MFCC of
every frame of real music, in one run: our default fit (the default bounded
sample, k-means++ and Lloyd on a subsample, streamed exact Lloyd passes that
stop when a pass gains < ``inertia_tol``), scikit-learn ``MiniBatchKMeans``
with fairseq HuBERT's ``learn_kmeans.py`` settings (10 % sample, batch 10000,
max_iter 100, n_init 20, tol 0, max_no_improvement 100, reassignment_ratio 0)
and full-batch ``KMeans`` (exact Lloyd, n_init 1). Inertia per frame is
measured for all three on *all* frames (the samples differ).

Runs single-threaded by default (``--threads``) for both sides: the numbers are
then comparable on a shared machine. Prints seconds and ratios; never gates CI.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 24000
HOP = 320


def synth_piece(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Music-like audio with variety: chord progressions of harmonic tones with
    random timbres, a melody, drums (kick sweeps, noise snares, hats), dynamics."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    out = np.zeros(n)
    beat = 60 / rng.uniform(70, 160)
    root = 55 * 2 ** (rng.integers(0, 12) / 12)
    scale = np.array([0, 2, 4, 5, 7, 9, 11]) if rng.random() < 0.5 else np.array([0, 2, 3, 5, 7, 8, 10])
    timbre = rng.uniform(0.1, 1.0, 8) / np.arange(1, 9) ** rng.uniform(0.5, 2)

    def span(start: float, length: float) -> slice:
        return slice(int(start * SR), min(n, int((start + length) * SR)))

    bar = 4 * beat
    for start in np.arange(0, seconds, bar):
        degree = rng.integers(0, 7)
        chord = [scale[(degree + i) % 7] + 12 * ((degree + i) // 7) for i in (0, 2, 4)]
        seg = span(start, bar)
        tt = t[seg]
        for semis in chord:
            f0 = root * 2 * 2 ** (semis / 12)
            for h, a in enumerate(timbre, 1):
                if f0 * h < SR / 2:
                    out[seg] += 0.05 * a * np.sin(2 * np.pi * f0 * h * tt + rng.uniform(0, 6.28))
        out[seg] *= np.exp(-rng.uniform(0.2, 2) * (tt - start))
    for start in np.arange(0, seconds, beat / 2):  # melody in eighth notes
        if rng.random() < 0.3:
            continue
        seg = span(start, beat / 2)
        tt = t[seg]
        f0 = root * 4 * 2 ** (scale[rng.integers(0, 7)] / 12 + rng.integers(0, 2))
        out[seg] += 0.12 * np.exp(-6 * (tt - start)) * (np.sin(2 * np.pi * f0 * tt) + 0.3 * np.sin(4 * np.pi * f0 * tt))
    for i, start in enumerate(np.arange(0, seconds, beat / 2)):  # drums
        seg = span(start, 0.25)
        tt = t[seg] - start
        if i % 4 == 0:
            out[seg] += 0.5 * np.sin(2 * np.pi * (50 + 100 * np.exp(-30 * tt)) * tt) * np.exp(-12 * tt)
        elif i % 4 == 2:
            out[seg] += 0.25 * rng.standard_normal(len(tt)) * np.exp(-20 * tt)
        else:
            out[seg] += 0.05 * np.diff(rng.standard_normal(len(tt) + 1)) * np.exp(-60 * tt)
    out *= rng.uniform(0.3, 1.0) * (1 + 0.5 * np.sin(2 * np.pi * t / rng.uniform(5, 20)))
    out += 10 ** rng.uniform(-4, -2) * rng.standard_normal(n)
    return (out / max(1.0, np.abs(out).max())).astype(np.float32)


def make_audio(folder: Path, minutes: float, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    files, total = [], 0.0
    while total < minutes * 60:
        seconds = float(rng.uniform(20, 60))
        path = folder / f"piece{len(files):04d}.wav"
        sf.write(path, synth_piece(seconds, rng), SR)
        files.append(path)
        total += seconds
    return files


def librosa_features(path: Path, n_mfcc: int, n_mels: int) -> np.ndarray:
    import librosa

    y, _ = sf.read(path, dtype="float32")
    m = librosa.feature.mfcc(y=y, sr=SR, n_mfcc=n_mfcc, n_fft=1024, hop_length=HOP, n_mels=n_mels)
    return np.concatenate([m, librosa.feature.delta(m), librosa.feature.delta(m, order=2)]).T.astype(np.float32)


def timed(fn):
    """``(result, wall seconds, CPU seconds of this process)``. On a shared
    machine CPU time is the stable measure: it does not count waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def music_fits(audio: Path, K: int, seed: int, references: bool = True) -> None:
    """Our default fit vs fairseq-style ``MiniBatchKMeans`` vs full-batch ``KMeans`` on real music."""
    import torch
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from mert_core.audio import AUDIO_EXTENSIONS, AudioError, read_crop
    from mert_core.registry import load_registry
    from mert_plugins.teachers._streaming_kmeans import FeatureCache, fit_kmeans, nearest
    from mert_plugins.teachers.kmeans import plan_sample

    teacher = load_registry().build("teacher", "kmeans-mfcc", {"n_clusters": K})
    o, ext = teacher.options, teacher.extractors["mfcc"]
    files = sorted(p for p in audio.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    plan = plan_sample(files, SR, o.chunk_seconds, 1.0, None, seed, progress=False)  # every chunk: all frames

    def features():
        rows = []
        for c in plan.chunks:
            try:
                w = read_crop(c.path, SR, c.offset_samples, c.num_samples)
            except AudioError:
                continue
            with torch.no_grad():
                rows.append(ext(torch.from_numpy(w)[None])[0].numpy())
        return np.concatenate(rows)

    x, t_feat, _ = timed(features)
    N = len(x)
    print(f"real music: {len(files)} files, {plan.total_hours:.2f} h, {N} frames of {x.shape[1]}-d MFCC ({t_feat:.0f} s to compute); K={K}")

    def per_frame(centroids) -> float:
        return float(nearest(torch.from_numpy(x), torch.as_tensor(centroids, dtype=torch.float32))[1].double().mean())

    # ours: the default sample (sample_hours bound), defaults of every fit option
    default_frames = min(N, int(o.sample_hours * 3600 * 75)) if o.sample_hours else N
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(N, default_frames, replace=False)) if default_frames < N else np.arange(N)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp) / "x.f32", x.shape[1])
        cache.append(torch.from_numpy(x[rows]))
        cache.finish()
        ours, w_ours, c_ours = timed(lambda: fit_kmeans(cache, K, seed=seed, n_init=o.n_init, init_frames=o.init_frames, max_iter=o.max_iter,
                                                         max_passes=o.max_passes, tol=o.tol, inertia_tol=o.inertia_tol, progress=False))
        if references:
            exact, w_exact, c_exact = timed(lambda: fit_kmeans(cache, K, seed=seed, n_init=o.n_init, init_frames=o.init_frames, max_iter=o.max_iter,
                                                               max_passes=1000, tol=0.0, progress=False))
        cache.close()
    sample = x[np.sort(rng.choice(N, N // 10, replace=False))]
    fairseq = MiniBatchKMeans(K, init="k-means++", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100,
                              n_init=20, reassignment_ratio=0.0, compute_labels=False, random_state=seed)
    _, w_fs, c_fs = timed(lambda: fairseq.fit(sample))
    i_ours, i_fs = per_frame(ours.centroids), per_frame(fairseq.cluster_centers_)
    print(f"\n== k-means fits on the same features (CPU s / wall s; inertia per frame over all {N} frames) ==")
    print(f"ours, default fit ({len(rows)} frames, {ours.passes} streamed passes): {c_ours:8.1f} / {w_ours:8.1f}  inertia {i_ours:.4f}")
    print(f"MiniBatchKMeans, fairseq settings ({len(sample)} frames):       {c_fs:8.1f} / {w_fs:8.1f}  inertia {i_fs:.4f}")
    print(f"  -> ours vs fairseq-style: {c_fs / c_ours:.2f}x faster (CPU), inertia ratio {i_ours / i_fs:.4f}  (aim: >= 5x at <= 1)")
    if not references:
        return
    full, w_full, c_full = timed(lambda: KMeans(K, n_init=1, random_state=seed).fit(x))
    i_exact, i_full = per_frame(exact.centroids), per_frame(full.cluster_centers_)
    print(f"ours, exact Lloyd to a fixed point ({exact.passes} passes):      {c_exact:8.1f} / {w_exact:8.1f}  inertia {i_exact:.4f}")
    print(f"KMeans, full batch ({full.n_iter_} it.):                             {c_full:8.1f} / {w_full:8.1f}  inertia {i_full:.4f}")
    print(f"  -> ours vs full-batch KMeans: {c_full / c_ours:.2f}x faster (CPU), inertia ratio {i_ours / i_full:.4f}")
    print(f"  -> ours vs exact Lloyd from the same start: {c_exact / c_ours:.2f}x faster, inertia ratio {i_ours / i_exact:.4f}  (limit 1.01)")


def kernels(K: int, dim: int = 39, rows: int = 65536) -> None:
    """Time the nearest-centroid search over ``rows`` frames with score blocks of
    different heights: the block size ``_chunk_rows`` picks vs larger ones."""
    import torch

    from mert_plugins.teachers import _streaming_kmeans as km

    x, c = torch.randn(rows, dim), torch.randn(K, dim)
    groups = km._groups_from_ranking(torch.arange(K), 32)
    laid, laid_sq = groups.laid_out(c)
    chosen = km._chunk_rows(laid.shape[0], laid.device)
    print(f"nearest centroid of {rows} frames, D={dim}, K={K} ({laid.shape[0]} slots); CPU ms, best of 5")
    times = {}
    for step in sorted({chosen, 4096, 8192, 32768, 65536}):
        def run():
            for a in range(0, rows, step):
                scores = torch.addmm(laid_sq, x[a : a + step], laid.T, beta=1.0, alpha=-2.0)
                km._grouped_nearest(scores, groups)
        run()
        times[step] = min(timed(run)[2] for _ in range(5))
        print(f"  {step:6d} rows per block: {times[step] * 1e3:7.1f} ms{'  <- _chunk_rows' if step == chosen else ''}")
    print(f"  -> the chosen block vs 32768-row blocks: {times[32768] / times[chosen]:.2f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="Audio to generate.")
    ap.add_argument("--clusters", type=int, default=500, help="K (MERT's default: 500).")
    ap.add_argument("--threads", type=int, default=1, help="Threads for torch and scikit-learn alike.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the audio and outputs here (default: a temp folder).")
    ap.add_argument("--audio", type=Path, default=None, help="Folder of real music: compare the k-means fit strategies on it instead.")
    ap.add_argument("--kernels", action="store_true", help="Time the nearest-centroid block size instead.")
    ap.add_argument("--no-references", action="store_true",
                    help="With --audio: skip full-batch KMeans and exact Lloyd (hours on a large corpus); fairseq-style only.")
    args = ap.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    if args.kernels:
        return kernels(args.clusters)
    if args.audio is not None:
        return music_fits(args.audio, args.clusters, args.seed, references=not args.no_references)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    from mert_core.labels import LabelStore, fit_teacher, student_frames, write_label_store
    from mert_core.registry import load_registry
    from mert_plugins.teachers.kmeans import read_teacher_file

    K, n_mfcc, n_mels = args.clusters, 13, 64
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-kmeans-"))
    (work / "audio").mkdir(parents=True, exist_ok=True)
    files, t_gen, _ = timed(lambda: make_audio(work / "audio", args.minutes, args.seed))
    print(f"audio: {len(files)} files, {args.minutes:g} min at 24 kHz (generated in {t_gen:.1f} s); K={K}; {args.threads} thread(s); in {work}")
    registry = load_registry()

    # -- fitting ---------------------------------------------------------------------
    def reference_fit():
        x = np.concatenate([librosa_features(p, n_mfcc, n_mels) for p in files])
        km = KMeans(K, n_init=1, random_state=args.seed).fit(x)
        return x, km

    (x_ref, km_ref), w_ref, c_ref = timed(reference_fit)
    out_file = work / "mfcc.safetensors"
    opts = {"n_clusters": K, "n_mels": n_mels}
    _, w_ours, c_ours = timed(lambda: fit_teacher("kmeans-mfcc", [work / "audio"], out_file, opts, registry=registry, seed=args.seed, device="cpu", progress=False))
    meta, tensors = read_teacher_file(out_file)
    stream = meta["streams"]["mfcc"]
    teacher = registry.build("teacher", "kmeans-mfcc", {"teacher_file": str(out_file)})

    # our features, all in memory, for scikit-learn on the same feature space
    chunk = round(meta["fit"]["chunk_seconds"] * SR)

    def our_features():
        rows = []
        for p in sorted(files):
            y, _ = sf.read(p, dtype="float32")
            for a in range(0, len(y), chunk):
                w = torch.from_numpy(y[a : a + chunk])[None]
                rows.append(teacher.extractors["mfcc"](w)[0].numpy())
        return np.concatenate(rows)

    x_ours = our_features()
    N = len(x_ours)
    km_same, w_km, c_km = timed(lambda: KMeans(K, n_init=1, random_state=args.seed).fit(x_ours))
    mb_same, w_mb, c_mb = timed(lambda: MiniBatchKMeans(K, n_init=1, random_state=args.seed, batch_size=4096).fit(x_ours))
    inertia_mb = -mb_same.score(x_ours)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in stream["seconds"].items())

    print("\n== fitting (CPU s / wall s) ==")
    print(f"reference  librosa features + KMeans, all {len(x_ref)} frames in RAM: {c_ref:7.2f} / {w_ref:7.2f}  ({km_ref.n_iter_} Lloyd iterations)")
    print(f"ours       fit_teacher, streamed:                                  {c_ours:7.2f} / {w_ours:7.2f}  "
          f"(wall: features {meta['fit']['feature_seconds']:.1f}, {stages}; subsample {stream['init_frames']} frames x "
          f"{stream['subsample_iterations']} it., {stream['streamed_passes']} streamed passes, "
          f"{stream['full_distance_passes']:.1f} passes' worth of full distance computations)")
    print(f"  -> fit speed-up vs reference: {c_ref / c_ours:.2f}x CPU time, {w_ref / w_ours:.2f}x wall  (aim: >= 5x)")
    print(f"inertia per frame on our features: ours {stream['inertia_per_frame']:.4f} | sklearn KMeans {km_same.inertia_ / N:.4f} "
          f"({c_km:.1f} CPU s, {km_same.n_iter_} it.) | sklearn MiniBatchKMeans {inertia_mb / N:.4f} ({c_mb:.1f} CPU s)")
    print(f"  -> inertia ratio ours / KMeans: {stream['inertia'] / km_same.inertia_:.4f}  (aim: <= 1); "
          f"ours / MiniBatchKMeans: {stream['inertia'] / inertia_mb:.4f}")
    print(f"  -> k-means alone on the same features: ours {c_ours - meta['fit']['feature_seconds']:.1f} s (approx.) vs KMeans {c_km:.1f} s")

    # -- labelling ---------------------------------------------------------------------
    def reference_label():
        lines = []
        for p in sorted(files):
            lines.append(" ".join(map(str, km_ref.predict(librosa_features(p, n_mfcc, n_mels)))))
        return lines

    lines, w_ref_label, c_ref_label = timed(reference_label)
    text_file = work / "labels.km"
    text_file.write_text("\n".join(lines) + "\n")
    ref_frames = sum(len(line.split()) for line in lines)
    summary, w_label, c_label = timed(lambda: write_label_store(teacher, [work / "audio"], work / "store", batch_size=16, progress=False, overwrite=True))
    print("\n== labelling (frames per CPU second / per wall second) ==")
    print(f"reference  librosa + KMeans.predict per file: {ref_frames / c_ref_label:10.0f} / {ref_frames / w_ref_label:10.0f}")
    print(f"ours       write_label_store (batched torch):  {summary.num_frames / c_label:10.0f} / {summary.num_frames / w_label:10.0f}")
    print(f"  -> labelling throughput ratio: {(summary.num_frames / c_label) / (ref_frames / c_ref_label):.2f}x CPU, "
          f"{(summary.num_frames / w_label) / (ref_frames / w_ref_label):.2f}x wall")

    # -- label store vs text labels ----------------------------------------------------
    store_bytes = sum(f.stat().st_size for f in (work / "store").iterdir())
    text_bytes = text_file.stat().st_size

    def load_text():
        return [np.array(line.split(), dtype=np.int64) for line in text_file.read_text().splitlines()]

    def load_store():
        store = LabelStore.open(work / "store")
        out = []
        for e in store.index["files"]:
            out.append(np.concatenate([store.window(e["path"], k * store.window_samples) for k in range(len(e["windows"]))]))
        return out

    t_text = min(timed(load_text)[2] for _ in range(5))
    t_store = min(timed(load_store)[2] for _ in range(5))
    store = LabelStore.open(work / "store")
    rng = np.random.default_rng(0)
    picks = [(e["path"], int(rng.integers(len(e["windows"]))) * store.window_samples) for e in (store.index["files"][i] for i in rng.integers(len(store.index["files"]), size=256))]
    t_batch = timed(lambda: [store.targets([p for p, _ in picks[i : i + 16]], [o for _, o in picks[i : i + 16]], student_frames(store.window_samples)) for i in range(0, 256, 16)])[2]
    print("\n== label store vs one text line per file ==")
    print(f"size on disk: store {store_bytes / 1e6:.2f} MB ({summary.bytes_per_frame_per_codebook:.0f} bytes/frame/codebook, labels.bin {summary.labels_bytes / 1e6:.2f} MB + index) | text {text_bytes / 1e6:.2f} MB")
    print(f"  -> size ratio text / store: {text_bytes / store_bytes:.2f}x  (aim: store <= 2 bytes/frame/codebook)")
    print(f"load all labels (best of 5, CPU): store {t_store * 1e3:.1f} ms | text {t_text * 1e3:.1f} ms -> {t_text / t_store:.2f}x")
    print(f"16 batches of 16 random crops from the store: {t_batch * 1e3:.1f} ms CPU ({t_batch / 16 * 1e3:.2f} ms per batch)")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
