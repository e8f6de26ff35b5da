"""Training-step time of our student against transformers' HubertModel.

Same configuration (weights copied, train mode, dropouts on), batch and
threads; the two alternate over several repetitions in one process and the
medians are compared. A step is forward + backward of the mean of the last
hidden state. Prints ours/theirs (lower is better) for wall-clock time and
for this process's CPU time (steadier on a shared machine), and the load
average. Needs the test extra (transformers).

    python benchmarks/bench_student.py                  # tiny and 95m, 2 threads
    python benchmarks/bench_student.py --presets 95m --reps 5 --batch-95m 2
    python benchmarks/bench_student.py --levers         # what each CPU kernel of ours saves

With ``--levers``, each of our CPU-specific kernels is switched back to the
plain PyTorch way in turn (the same math: the outputs agree to float
rounding) and the training step is timed against the all-on student,
alternating, in the same process; the inference forward is timed for the
attention path used there. The ratio off/on is what the kernel saves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mert_core import components

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


# -- each lever switched off: the plain PyTorch way of computing the same thing ----------


def _plain_attention(self, x, attend=None):
    """``SelfAttention.forward`` with separate q, k, v projections and SDPA always."""
    batch, frames, _ = x.shape
    w, b = self.qkv.weight.chunk(3), self.qkv.bias.chunk(3)
    q, k, v = (F.linear(x, w[i], b[i]).view(batch, frames, self.num_heads, self.head_dim).transpose(1, 2) for i in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(batch, frames, self.embed_dim))


def _separate_qkv(self, x, attend=None):
    """``SelfAttention.forward`` with three projections instead of the fused one; attention as ours."""
    batch, frames, _ = x.shape
    w, b = self.qkv.weight.chunk(3), self.qkv.bias.chunk(3)
    q, k, v = (F.linear(x, w[i], b[i]).view(batch, frames, self.num_heads, self.head_dim).transpose(1, 2) for i in range(3))
    dropout_p = self.dropout if self.training else 0.0
    if dropout_p > 0 and q.device.type == "cpu":
        out = components.softmax_attention(q, k, v, attend, dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p)
    return self.out_proj(out.transpose(1, 2).reshape(batch, frames, self.embed_dim))


def _sdpa_with_dropout(self, x, attend=None):
    """``SelfAttention.forward`` with SDPA's own dropout on the CPU too."""
    batch, frames, _ = x.shape
    q, k, v = self.qkv(x).view(batch, frames, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(batch, frames, self.embed_dim))


def _written_out_attention(self, x, attend=None):
    """``SelfAttention.forward`` with the softmax written out instead of SDPA."""
    batch, frames, _ = x.shape
    q, k, v = self.qkv(x).view(batch, frames, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = components.softmax_attention(q, k, v, attend, self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(batch, frames, self.embed_dim))


class _PlainSwap:
    @staticmethod
    def apply(x):
        return x.transpose(1, 2).contiguous()


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _extractor_layout(model, channels_last):
    with _patched(model.feature_extractor, "channels_last", channels_last):
        yield


# name -> (where the kernel lives, what "off" does, a context that switches it off for a model, which step it affects)
LEVERS = {
    "waveform conv as one GEMM": ("ConvLayerBlock._conv", "oneDNN conv1d",
                                  lambda m: _patched(components.ConvLayerBlock, "_conv", lambda self, x: self.conv(x)), "train"),
    "channels-last strided-GEMM convs": ("_StridedConvGEMM", "F.conv1d on (B, C, T)", lambda m: _extractor_layout(m, False), "train"),
    "contiguous swap gradient": ("_SwapTimeChannels", "transpose().contiguous()",
                                 lambda m: _patched(components, "_SwapTimeChannels", _PlainSwap), "train"),
    "16-bit dropout masks": ("_CPUDropout", "F.dropout (bernoulli_)",
                             lambda m: _patched(components, "dropout", lambda x, p, training: F.dropout(x, p, training)), "train"),
    "fused QKV projection": ("SelfAttention.qkv", "three Linear projections",
                             lambda m: _patched(components.SelfAttention, "forward", _separate_qkv), "train"),
    "attention written out under dropout": ("softmax_attention", "SDPA with dropout_p",
                                            lambda m: _patched(components.SelfAttention, "forward", _sdpa_with_dropout), "train"),
    "SDPA at inference": ("SelfAttention.forward", "softmax written out",
                          lambda m: _patched(components.SelfAttention, "forward", _written_out_attention), "infer"),
    "all of the above": ("", "plain PyTorch everywhere", lambda m: _all_off(m), "train"),
}


@contextlib.contextmanager
def _all_off(model):
    with contextlib.ExitStack() as stack:
        for name, (_, _, off, _) in LEVERS.items():
            if name not in ("all of the above", "SDPA at inference", "fused QKV projection", "attention written out under dropout"):
                stack.enter_context(off(model))
        stack.enter_context(_patched(components.SelfAttention, "forward", _plain_attention))
        yield


def infer_step(model, wave: torch.Tensor) -> tuple[float, float]:
    """One inference forward (eval mode, no grad); (wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(wave)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_levers(preset: str, batch: int, seconds: float, reps: int, sample_rate: int = 24000) -> None:
    ours, _ = build_pair(preset)
    wave = torch.randn(batch, int(seconds * sample_rate), generator=torch.Generator().manual_seed(0))
    print(f"\n{preset}, {batch} x {seconds:g} s, {reps} alternating reps per lever (medians; off/on > 1: the kernel saves time)")
    for name, (where, plain, off, kind) in LEVERS.items():
        model = ours.train() if kind == "train" else ours.eval()

        def step():
            return train_step(model, wave, False) if kind == "train" else infer_step(model, wave)

        with off(model):  # warm-up and a check that the plain way computes the same thing
            step()
            model.eval()
            with torch.no_grad():
                plain_out = model(wave[:1, : sample_rate]).last_hidden
        with torch.no_grad():
            ours_out = model(wave[:1, : sample_rate]).last_hidden
        model.train(kind == "train")
        step()
        on_t, off_t = [], []
        for _ in range(reps):
            on_t.append(step()[1])
            with off(model):
                off_t.append(step()[1])
        on_ms, off_ms = statistics.median(on_t) * 1000, statistics.median(off_t) * 1000
        diff = float((plain_out - ours_out).abs().max())
        print(f"  {name:38s} {'(' + where + ')' if where else '':32s} on {on_ms:7.0f} ms | off ({plain}) {off_ms:7.0f} ms | "
              f"saves {off_ms / on_ms:.2f}x of the {'step' if kind == 'train' else 'forward'} (CPU time) | max |diff| {diff:.1e}")
    ours.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,95m", help="comma-separated: tiny, 95m, 330m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length (MERT's training crop: 5 s)")
    parser.add_argument("--batch-tiny", type=int, default=4)
    parser.add_argument("--batch-95m", type=int, default=2)
    parser.add_argument("--batch-330m", type=int, default=1)
    parser.add_argument("--reps", type=int, default=0, help="repetitions per model (0: 10 for tiny, 4 otherwise)")
    parser.add_argument("--levers", action="store_true", help="time each CPU kernel of ours against the plain PyTorch way instead")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.levers:
        print(f"torch {torch.__version__}, {opts.threads} threads; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for preset in opts.presets.split(","):
            batch = {"tiny": opts.batch_tiny, "95m": opts.batch_95m, "330m": opts.batch_330m}[preset]
            bench_levers(preset, batch, opts.seconds, opts.reps or (8 if preset == "tiny" else 3))
        return
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
