"""CQT teacher speed and faithfulness against nnAudio and librosa, in one run.

    python benchmarks/bench_cqt.py                    # 8 clips x 5 s, CPU
    python benchmarks/bench_cqt.py --threads 1 --device cuda

Prints audio-seconds per second of wall time for ours (``mert_plugins.teachers.cqt``),
nnAudio's ``CQT1992v2`` at the MERT paper's settings (the reference the paper used) and
``librosa.cqt`` at the same settings, the speed ratios, and the relative error
``||ours - ref|| / ||ref||`` against nnAudio over the whole spectrogram. librosa's
multirate CQT is shown for context, after a per-bin least-squares scale.
Never gates CI.
"""

from __future__ import annotations

import argparse
import statistics
import time

import librosa
import numpy as np
import torch
from nnAudio.features import CQT1992v2
from tqdm import tqdm

from mert_core.demo import synthetic_music
from mert_plugins.teachers.cqt import CQTOptions, CQTTeacher

SR, HOP, FMIN, N_BINS, BPO = 24000, 320, 32.7, 336, 48  # MERT's settings


def timed(fn, repeats: int, device: torch.device, bar: tqdm) -> tuple[float, object]:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()  # GPU work is asynchronous: wait before reading the clock
        times.append(time.perf_counter() - start)
        bar.update()
    return statistics.median(times), out


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (ours gets 5x as many)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--pad-mode", choices=["constant", "reflect"], default="constant")
    parser.add_argument("--device", default="cpu", help="torch device for ours and nnAudio (librosa is CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    audio = np.stack([synthetic_music(args.seconds, seed=i) for i in range(args.clips)])
    wave = torch.from_numpy(audio).to(device)
    total_seconds = args.clips * args.seconds
    frames = audio.shape[1] // HOP

    start = time.perf_counter()
    ours_teacher = CQTTeacher(CQTOptions(pad_mode=args.pad_mode), SR, HOP).to(device)
    ours_teacher.targets(wave[:1])  # builds the sparse kernels for this length
    ours_setup = time.perf_counter() - start
    start = time.perf_counter()
    nn_layer = CQT1992v2(sr=SR, hop_length=HOP, fmin=FMIN, n_bins=N_BINS, bins_per_octave=BPO, window="hann",
                         center=True, pad_mode=args.pad_mode, output_format="Magnitude", verbose=False).to(device)
    nn_setup = time.perf_counter() - start

    def ours():
        return ours_teacher.targets(wave).transpose(1, 2)  # B, K, T

    @torch.no_grad()
    def nnaudio():
        return nn_layer(wave)[..., :frames]

    def librosa_cqt():
        return np.abs(librosa.cqt(audio, sr=SR, hop_length=HOP, fmin=FMIN, n_bins=N_BINS, bins_per_octave=BPO,
                                  pad_mode=args.pad_mode))[..., :frames]

    plan = [("ours", ours, 5 * args.repeats), ("nnAudio CQT1992v2", nnaudio, args.repeats), ("librosa.cqt", librosa_cqt, args.repeats)]
    results = {}
    with tqdm(total=sum(r + 1 for _, _, r in plan), desc="timing", unit="call") as bar:
        for name, fn, repeats in plan:
            bar.set_postfix_str(name)
            seconds, out = timed(fn, repeats, device if name != "librosa.cqt" else torch.device("cpu"), bar)
            bar.update()
            results[name] = (seconds, out if isinstance(out, np.ndarray) else out.float().cpu().numpy())

    ref = results["nnAudio CQT1992v2"][1]
    ours_out = results["ours"][1]
    lib = results["librosa.cqt"][1]
    # librosa normalises its kernels differently; fit one scale per bin before comparing
    scale = (lib * ref).sum(axis=(0, 2)) / (lib * lib).sum(axis=(0, 2))
    per_bin = np.linalg.norm(ours_out - ref, axis=(0, 2)) / np.linalg.norm(ref, axis=(0, 2))

    print(f"\n{args.clips} clips x {args.seconds:g} s synthetic music, {SR} Hz, hop {HOP}, {N_BINS} bins "
          f"from {FMIN} Hz, {BPO}/octave, pad_mode={args.pad_mode}, device={device}, torch threads={torch.get_num_threads()}")
    print(f"{'method':<20}{'s/call':>10}{'audio-s/s':>12}")
    for name, (seconds, _) in results.items():
        print(f"{name:<20}{seconds:>10.3f}{total_seconds / seconds:>12.1f}")
    t_ours, t_nn, t_lib = (results[k][0] for k in ("ours", "nnAudio CQT1992v2", "librosa.cqt"))
    print(f"speed ratio ours / nnAudio: {t_nn / t_ours:.1f}x    ours / librosa: {t_lib / t_ours:.1f}x")
    print(f"setup (kernels): ours {ours_setup:.2f} s (once per clip length), nnAudio {nn_setup:.2f} s")
    print(f"relative error vs nnAudio, whole spectrogram: ours {relative_error(ours_out, ref):.2e} "
          f"(worst bin {per_bin.max():.2e}, bin {per_bin.argmax()}), "
          f"librosa (per-bin scaled) {relative_error(lib * scale[None, :, None], ref):.2e}")


if __name__ == "__main__":
    main()
