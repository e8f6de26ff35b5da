"""Training throughput of a preset: audio-hours per hour, tokens per second,
memory and model-FLOPs utilisation, eager vs compiled, with and without
activation checkpointing.

A step is what the trainer does: forward of the student and the MERT-v1 heads
(8 x 1024 RVQ codebooks and a 336-bin CQT regression) on span-masked crops,
the loss, backward, gradient clipping and an AdamW update, with random targets.
On a GPU it runs in bf16 autocast and reports peak allocated memory and MFU
against the device's dense bf16 peak (``BF16_PEAK_TFLOPS``). On the CPU it
reports throughput and the activation memory held for the backward pass
(no MFU: a CPU has no comparable peak). The process's CPU seconds per step are
printed too: on a shared machine they are steadier than wall-clock time.

    python benchmarks/bench_throughput.py                       # tiny, CPU-sized, eager +- checkpointing
    python benchmarks/bench_throughput.py --preset 95m --batch 8 --variants eager,eager+ckpt,compiled,compiled+ckpt
    python benchmarks/bench_throughput.py --preset 330m --seconds 5.12 --batch 4   # on a GPU

Model FLOPs are counted once with ``torch.utils.flop_counter`` (matmuls,
convolutions, attention; forward + backward, without the recomputation that
checkpointing adds), so MFU compares variants on the same work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mert_core.config import ModelConfig
from mert_core.heads import TargetHeads
from mert_core.loss import MultiTargetLoss
from mert_core.masking import compute_span_mask
from mert_core.model import build_student
from mert_core.teacher import TargetSpec
from mert_core.trainer import Pretrainer

BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets; SXM unless named), matched against the device name in this order."""

SPECS = {
    "rvq-vae": TargetSpec(kind="discrete", frame_rate_hz=75.0, num_codebooks=8, num_classes=1024),
    "cqt": TargetSpec(kind="continuous", frame_rate_hz=75.0, dim=336),
}


def saved_activation_bytes(forward) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``forward()`` runs.

    Tensors that share storage (views, weights saved by several ops) count once.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def bf16_peak(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


class Setup:
    """Model, heads, loss, optimizer and one batch with targets, for one variant."""

    def __init__(self, preset: str, batch: int, seconds: float, device: torch.device, checkpointing: bool, compiled: bool):
        torch.manual_seed(0)
        student = build_student(ModelConfig(preset=preset, activation_checkpointing=checkpointing))
        final_dim = 128 if preset == "330m" else 64
        self.model = Pretrainer(student, TargetHeads(SPECS, student.embed_dim, final_dim)).to(device).train()
        self.step_model = torch.compile(self.model) if compiled else self.model
        self.loss = MultiTargetLoss(SPECS, {name: 1.0 for name in SPECS})
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        samples = int(round(seconds * 24000))
        frames = int(student.num_frames(samples))
        self.wave = (0.1 * torch.randn(batch, samples, generator=g)).to(device)
        self.lengths = torch.full((batch,), samples, device=device)
        self.mask = compute_span_mask((batch, frames), torch.full((batch,), frames), 0.8, 5, g).to(device)
        self.targets = {
            "rvq-vae": torch.randint(0, 1024, (batch, frames, 8), generator=g).to(device),
            "cqt": torch.rand(batch, frames, 336, generator=g).to(device),
        }
        self.tokens = batch * frames
        self.audio_seconds = batch * seconds
        self.device = device
        self.amp = torch.bfloat16 if device.type == "cuda" else None

    def forward_loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            predictions, _, penalty, _ = self.step_model(self.wave, self.lengths, self.mask)  # no unmasked scoring; signals unused
        loss, _ = self.loss(predictions, {k: t[self.mask] for k, t in self.targets.items()}, penalty)
        return loss

    def step(self) -> None:
        self.forward_loss().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a host sync: the timer must see the GPU's work finished


def step_flops(setup: Setup) -> int:
    """Model FLOPs of one forward + backward (eager, no recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        setup.forward_loss().backward()
    setup.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_variant(preset: str, batch: int, seconds: float, device: torch.device, variant: str, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps of one variant (``eager``, ``eager+ckpt``, ``compiled``, ``compiled+ckpt``)."""
    checkpointing, compiled = variant.endswith("+ckpt"), variant.startswith("compiled")
    setup = Setup(preset, batch, seconds, device, checkpointing, compiled)
    start = time.perf_counter()
    for _ in range(warmup):  # compilation, allocator, kernel caches
        setup.step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for _ in range(steps):
        t, cpu = time.perf_counter(), time.process_time()
        setup.step()
        synchronize(device)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - cpu)
    step_seconds = statistics.median(times)
    row = {
        "variant": variant, "step_s": step_seconds, "warmup_s": warmup_seconds, "cpu_s": statistics.median(cpu_times),
        "audio_h_per_h": setup.audio_seconds / step_seconds, "tokens_per_s": setup.tokens / step_seconds,
    }
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:  # what compiled code saves is not visible to the hooks
        row["activations_mb"] = saved_activation_bytes(setup.forward_loss) / 1e6 if not compiled else float("nan")
    return row


def throughput_table(preset: str, batch: int, seconds: float, device: torch.device, variants: list[str], steps: int,
                     warmup: int, threads: int | None = None) -> list[str]:
    """The table's lines (a header, then one row per variant), as ``main`` prints them."""
    peak = bf16_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads or torch.get_num_threads()} threads"
    memory = "peak mem GB" if device.type == "cuda" else "activations MB"
    lines = [f"preset {preset}, batch {batch} x {seconds:g} s, {name}, "
             f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, median of {steps} steps after {warmup} warm-up",
             f"| variant | step s | process CPU s | audio h/h | tokens/s | {memory} | MFU | warm-up s |",
             "|---|---|---|---|---|---|---|---|"]
    flops = step_flops(Setup(preset, batch, seconds, device, False, False))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for variant in variants:
        row = run_variant(preset, batch, seconds, device, variant, steps, warmup)
        mfu = f"{flops / row['step_s'] / peak:.1%}" if peak else "n/a"
        mem = row.get("peak_mem_gb", row.get("activations_mb"))
        lines.append(f"| {variant} | {row['step_s']:.3f} | {row['cpu_s']:.3f} | {row['audio_h_per_h']:.1f} | {row['tokens_per_s']:.0f} "
                     f"| {mem:.2f} | {mfu} | {row['warmup_s']:.1f} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines.append(f"model FLOPs per step: {flops / 1e12:.3f} TFLOP (forward + backward)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "cpu", "small", "cpu-small", "95m", "330m"])
    parser.add_argument("--batch", type=int, default=2, help="crops per step")
    parser.add_argument("--seconds", type=float, default=5.0, help="crop length (the paper: 5 s; 5.12 s for 330m)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=None,
                        help="comma-separated from eager, eager+ckpt, compiled, compiled+ckpt "
                             "(default: all four on a GPU; eager and eager+ckpt on the CPU, where inductor takes minutes)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    opts = parser.parse_args()

    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    variants = (opts.variants or ("eager,eager+ckpt,compiled,compiled+ckpt" if device.type == "cuda" else "eager,eager+ckpt")).split(",")
    for line in throughput_table(opts.preset, opts.batch, opts.seconds, device, variants, opts.steps, opts.warmup, opts.threads):
        print(line, flush=True)


if __name__ == "__main__":
    main()
