"""What computing the EnCodec teacher online costs, and how fast it labels.

1. Training step time with the teachers online (rvq-vae + cqt make targets from
   each batch) against the same step with precomputed labels, both with
   in-batch mixup, a tiny student, its heads, loss, backward and AdamW. The
   ratio online / precomputed is the cost of going online.
2. EnCodec labelling throughput (audio-seconds per second) through the label
   store writer, batched (``batch_size`` windows per call) against one window
   at a time, and whether the two give the same codes.

Random weights (same architecture, same cost) are used unless the official
checkpoint is found (``--weights`` or the torch hub cache). Numbers are ratios
against a reference measured in the same run; this never gates CI.

    python benchmarks/bench_rvq_vae.py                 # CPU, 2 clips of 5 s
    python benchmarks/bench_rvq_vae.py --device cuda --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from mert_core.heads import TargetHeads
from mert_core.labels import LabelStore, write_label_store
from mert_core.loss import MultiTargetLoss
from mert_core.masking import compute_span_mask
from mert_core.model import tiny
from mert_core.registry import load_registry
from mert_core.trainer import Pretrainer, align_targets
from mert_plugins.teachers.rvq_vae import default_weights_path, save_random_weights

SR = 24000


def music(seconds: float, seed: int) -> np.ndarray:
    """Chords of harmonic tones with a pulse and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    out = np.zeros_like(t)
    root = 110 * 2 ** (rng.integers(0, 12) / 12)
    for i, start in enumerate(np.arange(0, seconds, 0.5)):
        seg = (t >= start) & (t < start + 0.5)
        for interval in (0, 4 if i % 2 else 3, 7):
            for h in range(1, 5):
                out[seg] += 0.08 / h * np.sin(2 * np.pi * root * 2 ** (interval / 12) * h * t[seg])
        out[seg] *= np.exp(-3 * (t[seg] - start))
    return (out + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, desc: str) -> list[float]:
    fn()  # warm-up: kernel caches, allocator
    out = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def bench_step(teachers, device, batch_size: int, crop_samples: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one training step, online vs precomputed targets."""
    registry = load_registry()
    mixup = registry.build("augment", "inbatch-mixup", {}, sample_rate=SR).to(device)
    student = tiny()
    specs = {name: t.target_spec() for name, t in teachers.items()}
    heads = TargetHeads(specs, student.embed_dim, 64)
    model = Pretrainer(student, heads).to(device)
    loss_fn = MultiTargetLoss(specs, {name: 1.0 for name in teachers})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wave = torch.from_numpy(np.stack([music(crop_samples / SR, s) for s in range(batch_size)])).to(device)
    lengths = torch.full((batch_size,), crop_samples, device=device)
    num_frames = student.num_frames(crop_samples)
    paths = [f"clip{i}" for i in range(batch_size)]
    with torch.no_grad():
        stored = {name: t.targets(wave) for name, t in teachers.items()}  # what a label store would hand over

    def step(online: bool) -> None:
        generator = torch.Generator(device=device).manual_seed(0)
        targets = {}
        with torch.no_grad():
            for name, teacher in teachers.items():
                t = teacher.targets(wave, generator=generator) if online else stored[name]
                targets[name], _ = align_targets(name, t, num_frames, specs[name], paths)
        mixed = mixup(wave, lengths, generator)
        mask = compute_span_mask((batch_size, num_frames), torch.full((batch_size,), num_frames, device=device), 0.8, 5, generator)
        predictions, penalty = model(mixed, lengths, mask)
        loss, _ = loss_fn(predictions, {name: t[mask] for name, t in targets.items()}, penalty)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    pre = timed(lambda: step(False), device, repeats, "step, precomputed labels")
    on = timed(lambda: step(True), device, repeats, "step, teachers online")
    return statistics.median(on), statistics.median(pre)


def bench_teachers(teachers, device, batch_size: int, crop_samples: int, repeats: int) -> dict[str, float]:
    """Median seconds of each teacher's ``targets`` on one batch."""
    wave = torch.from_numpy(np.stack([music(crop_samples / SR, s) for s in range(batch_size)])).to(device)
    return {name: statistics.median(timed(lambda t=t: t.targets(wave), device, repeats, name)) for name, t in teachers.items()}


def bench_labelling(make_teacher, files: list[str], window: int, batch_size: int, out: Path) -> dict:
    """Audio-seconds per second writing a label store, batched vs one window per EnCodec call."""
    audio_seconds = sum(sf.info(f).frames for f in files) / SR
    result = {}
    for name, bs in (("one at a time", 1), (f"batched x{batch_size}", batch_size)):
        teacher = make_teacher(bs)
        write_label_store(teacher, files[:1], out / f"warm-{bs}", window_samples=window, batch_size=bs, progress=False)
        start = time.perf_counter()
        write_label_store(teacher, files, out / f"store-{bs}", window_samples=window, batch_size=bs, progress=False)
        result[name] = audio_seconds / (time.perf_counter() - start)
    one, many = (LabelStore.open(out / f"store-{bs}").labels for bs in (1, batch_size))
    result["codes differing"] = (int((np.asarray(one) != np.asarray(many)).sum()), int(np.asarray(one).size))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2, help="clips per training step and windows per labelling call")
    parser.add_argument("--crop-seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=4, help="audio files to label")
    parser.add_argument("--file-seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--weights", type=Path, default=None, help="EnCodec checkpoint; default: torch hub cache, else random weights")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    crop = int(round(args.crop_seconds * SR))
    registry = load_registry()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights or (default_weights_path() if default_weights_path().is_file() else None)
        if weights is None:
            weights = save_random_weights(tmp / "encodec_random.th")
            print("weights: random (same architecture as the official checkpoint, same cost)")
        else:
            print(f"weights: {weights}")
        def make_rvq(clips_per_call=None):
            options = {"weights_path": str(weights), "clips_per_call": clips_per_call}
            return registry.build("teacher", "rvq-vae", options).to(device).eval()

        teachers = {"rvq-vae": make_rvq()}
        if "cqt" in registry.names("teacher"):
            teachers["cqt"] = registry.build("teacher", "cqt", {}).to(device).eval()
        else:
            print("cqt teacher not installed: measuring rvq-vae alone")
        print(f"device {device}, {torch.get_num_threads()} CPU threads, batch {args.batch_size} x {crop / SR:g} s")

        on, pre = bench_step(teachers, device, args.batch_size, crop, args.repeats)
        print(f"step with {' + '.join(teachers)} online: {on:.3f} s; with precomputed labels: {pre:.3f} s; "
              f"online / precomputed = {on / pre:.2f}x")
        alone = bench_teachers(teachers, device, args.batch_size, crop, args.repeats)
        print("targets alone: " + ", ".join(f"{name} {sec:.3f} s ({sec / pre:.2f}x the precomputed step)" for name, sec in alone.items()))

        files = []
        for i in range(args.files):
            path = tmp / "audio" / f"{i}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(path, music(args.file_seconds, 100 + i), SR)
            files.append(str(path))
        rates = bench_labelling(make_rvq, files, crop, args.batch_size, tmp)
        one = rates["one at a time"]
        for name, rate in rates.items():
            if name != "codes differing":
                print(f"EnCodec labelling, {name}: {rate:.1f} audio-s/s ({rate / one:.2f}x one at a time)")
        differ, total = rates["codes differing"]
        print(f"codes differing between batched and one-at-a-time labels: {differ} of {total} ({differ / total:.1e})")


if __name__ == "__main__":
    main()
