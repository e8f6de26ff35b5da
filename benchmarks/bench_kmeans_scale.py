"""The k-means teacher fit's cost as the corpus grows: flat beyond the sample.

Builds synthetic manifests of 10, 100 and 1000 hours whose rows point, through
symbolic links, at a few real audio files (each row with its file's true
duration, so nothing is probed), then times ``fit_teacher("kmeans-mfcc")``
with the default options on each, in one run. The default sample is bounded
(``sample_hours``), so the time should stay flat; what still grows is planning
(the manifest read and the chunk draw), printed separately.

    python benchmarks/bench_kmeans_scale.py --audio /music
    python benchmarks/bench_kmeans_scale.py --audio /music --sample-hours 0.5 --clusters 100   # quick

Prints seconds and ratios to the smallest corpus; never gates CI.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def make_manifest(folder: Path, real: list[tuple[Path, float]], hours: float) -> Path:
    """A ``path<TAB>duration`` manifest of ``hours``, cycling through ``real`` files via links."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, total, i = ["path\tduration"], 0.0, 0
    while total < hours * 3600:
        path, seconds = real[i % len(real)]
        link = folder / f"{i:06d}{path.suffix}"
        link.symlink_to(path)
        rows.append(f"{link.name}\t{seconds}")
        total, i = total + seconds, i + 1
    manifest = folder / "corpus.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--audio", type=Path, required=True, help="Folder of real audio files the manifests point at.")
    ap.add_argument("--hours", type=float, nargs="+", default=[10, 100, 1000], help="Corpus sizes.")
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--sample-hours", type=float, default=None, help="Override the default sample bound (quick runs).")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from mert_core.audio import AUDIO_EXTENSIONS, audio_info
    from mert_core.labels import fit_teacher
    from mert_core.registry import load_registry
    from mert_plugins.teachers.kmeans import plan_sample, read_teacher_file

    real = []
    for p in sorted(args.audio.rglob("*")):
        if p.suffix.lower() in AUDIO_EXTENSIONS:
            info = audio_info(p)
            real.append((p.resolve(), info.frames / info.sample_rate))
    registry = load_registry()
    options = {"n_clusters": args.clusters, **({"sample_hours": args.sample_hours} if args.sample_hours else {})}
    teacher = registry.build("teacher", "kmeans-mfcc", options)
    print(f"{len(real)} real files; K={args.clusters}; sample_hours={teacher.options.sample_hours}; {args.threads} thread(s)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-kmeans-scale-") as tmp:
        for hours in args.hours:
            manifest = make_manifest(Path(tmp) / f"h{hours:g}", real, hours)
            t0 = time.perf_counter()
            plan = plan_sample([manifest], 24000, teacher.options.chunk_seconds, teacher.options.sample_fraction, teacher.options.sample_hours, 0, progress=False)
            t_plan = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = fit_teacher("kmeans-mfcc", [manifest], Path(tmp) / f"t{hours:g}.safetensors", options, registry=registry, device="cpu", progress=False)
            t_fit = time.perf_counter() - t0
            meta = read_teacher_file(out)[0]
            stream = meta["streams"]["mfcc"]
            rows.append((hours, t_plan, t_fit, meta, stream))
            print(f"{plan.total_hours:8.1f} h corpus: fit {t_fit:7.1f} s (planning {t_plan:5.1f} s, features {meta['fit']['feature_seconds']:.1f} s); "
                  f"sample {meta['sample']['sample_hours']:.2f} h, {stream['num_frames']} frames, {stream['streamed_passes']} passes, "
                  f"inertia {stream['inertia_per_frame']:.4f}/frame", flush=True)
    base = rows[0][2]
    for hours, t_plan, t_fit, *_ in rows:
        print(f"  -> {hours:g} h: fit time {t_fit / base:.2f}x the {rows[0][0]:g} h corpus's (corpus {hours / rows[0][0]:g}x larger)")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
