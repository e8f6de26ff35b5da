"""Feature extraction for evaluation: ours against a plain ``transformers.HubertModel`` forward.

Same weights, same clips, same threads, one run. Ours is what ``mert extract``
runs per batch of examples (``StudentUpstream.clip_features``: 30 s
windowing, length-sorted padded batches of ``batch_windows``, every hidden
state averaged per clip). The reference is the plain loop a user writes: one
clip at a time, ``HubertModel(wave, output_hidden_states=True)``, the mean
over time of each hidden state. Decoding and the cache's file writes are left
out of both (they are the same work). Prints audio-seconds per second and
the ratio ours / reference; never gates CI.

    python benchmarks/bench_extract.py                       # tiny and 95m, 8 clips of 10-20 s
    python benchmarks/bench_extract.py --presets tiny --clips 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mert_core.convert import hf_config_from_args, hf_state_dict_to_mert
from mert_core.evaluation.upstreams import StudentUpstream
from mert_core.model import mert_student, student_args


def build_pair(preset: str, seed: int = 0):
    """Our student and a HubertModel with the same configuration and weights, in eval mode."""
    from transformers import HubertConfig, HubertModel

    args = student_args(preset)
    torch.manual_seed(seed)
    theirs = HubertModel(HubertConfig(**hf_config_from_args(args)))
    ours = mert_student(**args)
    ours.load_state_dict(hf_state_dict_to_mert(theirs.state_dict(), theirs.config.to_dict()))
    return ours.eval(), theirs.eval()


@torch.no_grad()
def reference_clip_features(model, waves: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for w in waves:
        hidden = model(torch.from_numpy(w)[None], output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0].mean(0) for h in hidden]).numpy())  # L, D
    return out


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "95m"])
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-windows", type=int, default=8, help="As ExtractOptions.batch_windows.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(int(rng.uniform(10, 20) * 24000))).astype(np.float32) for _ in range(args.clips)]
    seconds = sum(len(w) for w in waves) / 24000
    print(f"{args.clips} clips, {seconds:.0f} s of audio; {args.threads} thread(s)")
    for preset in args.presets:
        ours, theirs = build_pair(preset)
        upstream = StudentUpstream(ours, id="bench", name=preset, batch_windows=args.batch_windows)
        reference_clip_features(theirs, waves[:1])  # warm-up
        upstream.clip_features(waves[:1])
        ref, w_ref, c_ref = timed(lambda: reference_clip_features(theirs, waves))
        got, w_ours, c_ours = timed(lambda: upstream.clip_features(waves))
        err = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)) for a, b in zip(got, ref))
        print(f"{preset:5s}: ours {seconds / w_ours:7.1f} audio-s/s wall ({seconds / c_ours:7.1f} per CPU s) | "
              f"HubertModel {seconds / w_ref:7.1f} ({seconds / c_ref:7.1f}) -> ours / reference {w_ref / w_ours:.2f}x wall, "
              f"{c_ref / c_ours:.2f}x CPU; max relative difference {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
