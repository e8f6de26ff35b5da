"""Training-step time of our student against transformers' HubertModel.

Same configuration (weights copied, train mode, dropouts on), batch and
threads; the two alternate over several repetitions in one process and the
medians are compared. A step is forward + backward of the mean of the last
hidden state. Prints ours/theirs (lower is better) for wall-clock time and
for this process's CPU time (steadier on a shared machine), and the load
average. Needs the test extra (transformers).

    python benchmarks/bench_student.py                  # tiny and 95m, 2 threads
    python benchmarks/bench_student.py --presets 95m --reps 5 --batch-95m 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from tqdm import tqdm

from mert_core.convert import hf_config_from_args, hf_state_dict_to_mert
from mert_core.model import mert_student, student_args


def build_pair(preset: str, seed: int = 0):
    """Our student and a HubertModel with the same configuration and weights, in train mode.

    layerdrop is 0 in both: skipped layers would make the timings depend on
    two different random streams.
    """
    from transformers import HubertConfig, HubertModel

    args = student_args(preset, layerdrop=0.0)
    torch.manual_seed(seed)
    theirs = HubertModel(HubertConfig(**hf_config_from_args(args)))
    ours = mert_student(**args)
    ours.load_state_dict(hf_state_dict_to_mert(theirs.state_dict(), theirs.config.to_dict()))
    return ours.train(), theirs.train()


def train_step(model, wave: torch.Tensor, hf: bool) -> tuple[float, float]:
    """One forward + backward; (wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    model.zero_grad(set_to_none=True)
    out = model(wave)
    last = out.last_hidden_state if hf else out.last_hidden
    last.float().mean().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(preset: str, batch: int, seconds: float, reps: int, sample_rate: int = 24000) -> dict:
    ours, theirs = build_pair(preset)
    wave = torch.randn(batch, int(seconds * sample_rate), generator=torch.Generator().manual_seed(0))
    for model, hf in ((ours, False), (theirs, True)):  # warm-up: allocator, oneDNN primitive caches
        train_step(model, wave, hf)
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
    for _ in tqdm(range(reps), desc=f"{preset} {batch} x {seconds:g} s", unit="rep", leave=False):
        times["ours"].append(train_step(ours, wave, False))
        times["theirs"].append(train_step(theirs, wave, True))
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    return {"preset": preset, "batch": batch, "seconds": seconds, "reps": reps, "wall": wall, "cpu": cpu,
            "ratio": wall["ours"] / wall["theirs"], "cpu_ratio": cpu["ours"] / cpu["theirs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,95m", help="comma-separated: tiny, 95m, 330m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length (MERT's training crop: 5 s)")
    parser.add_argument("--batch-tiny", type=int, default=4)
    parser.add_argument("--batch-95m", type=int, default=2)
    parser.add_argument("--batch-330m", type=int, default=1)
    parser.add_argument("--reps", type=int, default=0, help="repetitions per model (0: 10 for tiny, 4 otherwise)")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    print(f"torch {torch.__version__}, {opts.threads} threads, training step = forward + backward of mean(last hidden), "
          f"medians; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for preset in opts.presets.split(","):
        batch = {"tiny": opts.batch_tiny, "95m": opts.batch_95m, "330m": opts.batch_330m}[preset]
        reps = opts.reps or (10 if preset == "tiny" else 4)
        r = bench(preset, batch, opts.seconds, reps)
        print(f"{r['preset']:>5} {r['batch']} x {r['seconds']:g} s, {r['reps']} reps: "
              f"wall ours {r['wall']['ours'] * 1000:7.0f} ms, HubertModel {r['wall']['theirs'] * 1000:7.0f} ms, "
              f"ratio ours/theirs {r['ratio']:.3f} ({1 / r['ratio']:.2f}x) | "
              f"CPU ours {r['cpu']['ours'] * 1000:7.0f} ms, HubertModel {r['cpu']['theirs'] * 1000:7.0f} ms, "
              f"ratio {r['cpu_ratio']:.3f} ({1 / r['cpu_ratio']:.2f}x) | load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
