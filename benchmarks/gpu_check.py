"""What the first GPU should tell us, in one run of at most ``--minutes`` (default 10).

Prints, in this order:

1. the throughput table of ``bench_throughput.py`` (eager and compiled on a GPU, with MFU);
2. ``mert train`` end to end with online teachers (a paper recipe without EnCodec's weights:
   BEST-RQ + CQT, in-batch noise mixup) on the built-in demo data: audio-seconds per second,
   the fraction of step time spent waiting for the loader, and on CUDA the host syncs per step
   (``torch.cuda.set_sync_debug_mode``);
3. a learning check: the same recipe trained for the minutes left, then probed beside its random
   twin (same initial weights) on the demo pitch and key tasks, whose data it generates.

Everything is also written to ``<out>/gpu_check.json``. Nothing is downloaded.

    python benchmarks/gpu_check.py                                   # a GPU: 95m, 10 minutes
    python benchmarks/gpu_check.py --device cpu --preset tiny --minutes 1   # the CPU path (in the tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import throughput_table  # noqa: E402

RECIPE = "musicfm-style"
"""BEST-RQ + CQT on the paper's settings: MERT-v1 with a teacher that needs no fit and no weights."""
TASKS = ("demo-pitch", "demo-key")
PROBE = {"lrs": [1e-3, 5e-3], "max_epochs": 20, "hidden_units": 128}


class Clock:
    def __init__(self, minutes: float):
        self.start, self.budget = time.perf_counter(), minutes * 60

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def train_config(preset: str, device: str, out_dir: Path, max_steps: int, batch: int, workers: int, seed: int = 0):
    from mert_core import api

    return api.make_train_config(
        recipe=RECIPE, preset=preset, augment=["inbatch-mixup"], out_dir=out_dir, max_steps=max_steps,
        overrides=[f"device={device}", f"data.batch_size={batch}", f"data.num_workers={workers}", f"seed={seed}",
                   "log_every=5", f"checkpoint_every={max(max_steps, 1)}"],
    )


def count_syncs(fn) -> tuple[object, int]:
    """Run ``fn()``; on CUDA count the host syncs it made (each is one warning in "warn" mode)."""
    if not torch.cuda.is_available():
        return fn(), -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


def end_to_end(preset: str, device: str, out: Path, batch: int, workers: int) -> dict:
    """``mert train`` for 10 steps, then resumed to 30: the rate, loader wait and syncs of steps 10-30."""
    from mert_core import api

    run = out / "end-to-end"
    first = train_config(preset, device, run, 10, batch, workers)
    _, syncs_10 = count_syncs(lambda: api.train(first, progress=False, log=lambda m: None))
    second = train_config(preset, device, run, 30, batch, workers)
    started = time.perf_counter()
    _, syncs_30 = count_syncs(lambda: api.train(second, resume=True, progress=False, log=lambda m: None))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in records if r["step"] > 10]
    summary = json.loads((run / "summary.json").read_text())
    return {
        "audio_seconds_per_second": sum(r["audio_seconds_per_second"] for r in later) / len(later),
        "data_wait_fraction": sum(r["data_wait_fraction"] for r in later) / len(later),
        "seconds_for_20_steps": round(time.perf_counter() - started, 2),
        "host_syncs_per_step": (syncs_30 - syncs_10) / 20 if syncs_10 >= 0 else None,
        "audio_hours_seen": summary["audio_hours_seen"],
    }


def learning_check(preset: str, device: str, out: Path, batch: int, workers: int, clock: Clock, rate: float, reserve: float) -> dict:
    """Train for the time left (minus ``reserve`` seconds for probing), then probe beside the random twin."""
    from mert_core import api
    from mert_core.evaluation import api as eval_api
    from mert_core.evaluation.upstreams import checkpoint_upstream, random_upstream

    audio_per_step = batch * 5.0
    steps = max(20, int(0.85 * max(0.0, clock.left() - reserve) * rate / audio_per_step))
    config = train_config(preset, device, out / "learning", steps, batch, workers)
    started = time.perf_counter()
    result = api.train(config, progress=False, log=lambda m: None)
    train_seconds = time.perf_counter() - started
    ups = [checkpoint_upstream(result.out_dir, device=device, name=f"{preset}-trained"),
           random_upstream(preset, seed=config.seed, device=device, name=f"{preset}-random-twin")]
    report = eval_api.evaluate(ups, list(TASKS), out_dir=out / "probe", probe_options=PROBE, progress=False)
    scores = {(r.upstream, r.task): r.test_score for r in report.results}
    verdict = {t: scores[(ups[0].name, t)] - scores[(ups[1].name, t)] for t in TASKS}
    return {"steps": steps, "train_seconds": round(train_seconds, 1), "audio_hours_seen": result.summary["audio_hours_seen"],
            "table": report.table, "gain_over_twin": verdict}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="95m")
    ap.add_argument("--minutes", type=float, default=10.0, help="Time for everything (the learning run gets what is left).")
    ap.add_argument("--batch", type=int, default=None, help="Crops of 5 s per step (default: 8 on a GPU, 4 on the CPU).")
    ap.add_argument("--workers", type=int, default=None, help="Loader processes (default: 6 on a GPU, 1 on the CPU).")
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = ap.parse_args(argv)
    clock = Clock(args.minutes)
    gpu = args.device.startswith("cuda")
    batch = args.batch or (8 if gpu else 4)
    workers = args.workers if args.workers is not None else (6 if gpu else 1)
    args.out.mkdir(parents=True, exist_ok=True)
    from mert_core import __version__
    from mert_core.demo import ensure_demo_data

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"# gpu_check: mert {__version__}, torch {torch.__version__}, {name}, preset {args.preset}, {args.minutes:g} minutes", flush=True)
    ensure_demo_data()
    out: dict = {"device": name, "preset": args.preset, "minutes": args.minutes, "batch": batch, "workers": workers}

    print("\n## 1. Throughput (benchmarks/bench_throughput.py)", flush=True)
    variants = ["eager", "compiled"] if gpu else ["eager"]
    out["throughput"] = throughput_table(args.preset, batch, 5.0, device, variants, steps=3, warmup=2 if gpu else 1)
    print("\n".join(out["throughput"]), flush=True)

    print(f"\n## 2. mert train end to end ({RECIPE} + inbatch-mixup, demo data, batch {batch} x 5 s, {workers} loader workers)", flush=True)
    e2e = end_to_end(args.preset, args.device, args.out, batch, workers)
    out["end_to_end"] = e2e
    syncs = "n/a on the CPU" if e2e["host_syncs_per_step"] is None else f"{e2e['host_syncs_per_step']:.1f}"
    print(f"{e2e['audio_seconds_per_second']:.1f} audio-s/s (= audio-h per hour), "
          f"loader wait {e2e['data_wait_fraction']:.1%} of step time, host syncs per step: {syncs}", flush=True)

    reserve = max(25.0, 0.2 * clock.budget)
    print(f"\n## 3. Learning check: {args.preset} + {RECIPE} for the time left ({max(0.0, clock.left() - reserve):.0f} s), "
          f"probed beside its random twin on {', '.join(TASKS)}", flush=True)
    learn = learning_check(args.preset, args.device, args.out, batch, workers, clock, e2e["audio_seconds_per_second"], reserve)
    out["learning"] = learn
    print(f"{learn['steps']} steps in {learn['train_seconds']:.0f} s ({learn['audio_hours_seen']:.2f} audio-hours seen)")
    print(learn["table"])
    print("gain over the random twin: " + ", ".join(f"{t} {g:+.3f}" for t, g in learn["gain_over_twin"].items()))
    out["seconds"] = round(clock.budget - clock.left(), 1)
    (args.out / "gpu_check.json").write_text(json.dumps(out, indent=2))
    print(f"\ndone in {out['seconds']:.0f} s of {clock.budget:.0f}; wrote {args.out / 'gpu_check.json'}", flush=True)
    return out


if __name__ == "__main__":
    main()
