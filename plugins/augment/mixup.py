"""In-batch noise mixup (MERT, Li et al. 2023, "in-batch noise mixup").

With probability ``prob`` per clip, add 1 to 3 segments of 0.5 to 1.0 s cut
from *other* clips of the same batch, at random positions, at volume 1.0. The
segments are cut from the clean batch (so the order in which they are added
does not matter), only from the source clip's valid samples, and land only
inside the receiving clip's valid samples: padding stays zero. The targets were
made from the clean audio before this runs (the trainer guarantees it).

Everything is vectorised over the batch: one plan of random draws per call
(:func:`plan_mixup`), then a gather and a ``scatter_add`` per segment slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from mert_core.augment import AugmentOptions, Augmentation
from mert_core.hookspecs import hookimpl


class MixupOptions(AugmentOptions):
    prob: float = Field(0.5, ge=0, le=1, description="Probability that a clip receives segments (MERT: 0.5).")
    min_segments: int = Field(1, ge=1, description="Fewest segments added to a chosen clip (MERT: 1).")
    max_segments: int = Field(3, ge=1, description="Most segments added to a chosen clip (MERT: 3).")
    min_seconds: float = Field(0.5, gt=0, description="Shortest segment in seconds (MERT: 0.5).")
    max_seconds: float = Field(1.0, gt=0, description="Longest segment in seconds (MERT: 1.0 base, 1.5 large).")
    volume: float = Field(1.0, ge=0, description="Gain applied to each added segment (MERT: 1.0).")

    @model_validator(mode="after")
    def _check_ranges(self):
        if self.min_segments > self.max_segments:
            raise ValueError(f"min_segments ({self.min_segments}) must be <= max_segments ({self.max_segments})")
        if self.min_seconds > self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds:g}) must be <= max_seconds ({self.max_seconds:g})")
        return self


@dataclass
class MixupPlan:
    """The random draws of one call, one row per segment slot.

    All tensors are ``(K, B)`` with ``K = max_segments``; slot ``k`` of clip
    ``b`` adds ``wave[source[k, b], source_start[k, b] : source_start + length]``
    to ``wave[b, target_start[k, b] : target_start + length]`` where ``active``.
    """

    active: torch.Tensor  # bool
    source: torch.Tensor  # long, never b itself
    source_start: torch.Tensor  # long
    target_start: torch.Tensor  # long
    length: torch.Tensor  # long, 0 where inactive


def _uniform_int(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Integers uniform in ``[low, high]`` (inclusive), elementwise."""
    u = torch.rand(low.shape, generator=generator, device=low.device, dtype=torch.float64)
    return (low + (u * (high - low + 1).double()).floor().long()).minimum(high)


def plan_mixup(
    lengths: torch.Tensor,
    options: MixupOptions,
    sample_rate: int,
    generator: torch.Generator | None = None,
) -> MixupPlan:
    """Draw which clips receive segments, from where, where to, and how long.

    Args:
        lengths: ``(B,)`` valid samples per clip.
        options: the mixup options.
        sample_rate: samples per second, to turn seconds into samples.
        generator: the source of every random draw (on ``lengths.device``).

    Returns:
        A :class:`MixupPlan` of ``(max_segments, B)`` tensors. A segment is
        shortened to fit when the source's or receiver's valid length is
        shorter than the drawn length; with one clip in the batch nothing is added.
    """
    B, K, dev = lengths.shape[0], options.max_segments, lengths.device
    lengths = lengths.long()
    chosen = torch.rand(B, generator=generator, device=dev) < options.prob  # B
    count = _uniform_int(torch.full((B,), options.min_segments, device=dev), torch.full((B,), K, device=dev), generator)
    # never from the clip itself: shift b by 1..B-1 (uniform over the other clips)
    shift = _uniform_int(torch.ones(K, B, dtype=torch.long, device=dev), torch.full((K, B), max(B - 1, 1), device=dev), generator)
    source = (torch.arange(B, device=dev) + shift) % B  # K, B
    min_len, max_len = round(options.min_seconds * sample_rate), round(options.max_seconds * sample_rate)
    drawn = _uniform_int(torch.full((K, B), min_len, device=dev), torch.full((K, B), max_len, device=dev), generator)
    length = drawn.minimum(lengths[source]).minimum(lengths[None, :])  # K, B: fits both clips
    slot = torch.arange(K, device=dev)[:, None]
    active = chosen[None, :] & (slot < count[None, :]) & (length > 0)
    if B < 2:  # no other clip to cut from: a no-op
        active = torch.zeros_like(active)
    length = torch.where(active, length, torch.zeros_like(length))
    zero = torch.zeros_like(length)
    source_start = _uniform_int(zero, (lengths[source] - length).clamp(min=0), generator)
    target_start = _uniform_int(zero, (lengths[None, :] - length).clamp(min=0), generator)
    return MixupPlan(active, source, source_start, target_start, length)


def apply_mixup(wave: torch.Tensor, plan: MixupPlan, volume: float) -> torch.Tensor:
    """Add the planned segments, cut from the clean ``wave``, to a copy of it.

    Args:
        wave: ``(B, S)`` clean waveforms.
        plan: from :func:`plan_mixup`.
        volume: gain of each added segment.

    Returns:
        ``(B, S)`` mixed waveforms.
    """
    out = wave.clone()
    if not bool(plan.active.any()):  # a CPU-GPU sync point, once per batch
        return out
    B, S = wave.shape
    span = int(plan.length.max())
    offsets = torch.arange(span, device=wave.device)  # L
    for k in range(plan.active.shape[0]):  # at most max_segments slots; no loop over clips
        inside = offsets[None, :] < plan.length[k][:, None]  # B, L
        src_pos = (plan.source_start[k][:, None] + offsets).clamp(max=S - 1)  # B, L
        dst_pos = (plan.target_start[k][:, None] + offsets).clamp(max=S - 1)  # B, L
        segment = wave[plan.source[k][:, None], src_pos] * inside * volume  # B, L; zero outside the segment
        out.scatter_add_(1, dst_pos, segment.to(out.dtype))
    return out


class InBatchMixup(Augmentation):
    """In-batch noise mixup: add 1-3 segments of 0.5-1 s from other clips of the batch to half the clips."""

    name = "inbatch-mixup"
    description = "In-batch noise mixup: add 1-3 segments of 0.5-1.0 s from other clips of the batch to each clip with p=0.5 (MERT)"
    Options = MixupOptions

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mix a batch.

        Args:
            wave: ``(B, S)`` clean waveforms.
            lengths: ``(B,)`` valid samples per clip (the rest is padding).
            generator: seeded generator on ``wave.device``.

        Returns:
            ``(B, S)`` mixed waveforms (a new tensor); padding stays zero.
        """
        if wave.dim() != 2 or lengths.shape != (wave.shape[0],):
            raise ValueError(
                f"inbatch-mixup: expected wave (B, S) and lengths (B,), got {tuple(wave.shape)} and {tuple(lengths.shape)}"
            )
        plan = plan_mixup(lengths.to(wave.device).clamp(max=wave.shape[1]), self.options, self.sample_rate, generator)
        return apply_mixup(wave, plan, self.options.volume)


@hookimpl
def register_augmentations(register):
    register(InBatchMixup)
